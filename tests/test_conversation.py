"""The conversation layer: split points, joint confidence, follow-ups, clarification, the session store,
and all of it over real HTTP on loopback (our own catalog in tmp_path, a scripted ranker stage)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient

from skill.app import create_app
from skill.canonicalize import Ambiguity, Canonicalizer
from skill.catalog import load_catalog
from skill.config import Config
from skill.conversation import Conversation, Request, to_wire
from skill.conversation.clarify import for_decision
from skill.conversation.context import Frame, SessionStore
from skill.conversation.followup import cancel_intent_of, is_bare_cancel, is_slot_only
from skill.conversation.lexicon import lexicon
from skill.conversation.segment import find_cuts, joint_confidence, plans, split_at
from skill.decision import Candidate, Decision, Outcome
from skill.gate import GateConfig
from skill.pipeline import Pipeline
from tests.conversation_kit import ScriptedRanker, scripted_pipeline, scripted_state, write_conv_catalog

RESULT_FIELDS = {"top_intent", "confidence", "alternatives", "slots", "via", "model_id", "evidence"}
SEGMENT_FIELDS = {"text", "start", "end", "top_intent", "confidence", "slots", "via", "decision", "reason", "alternatives"}  # fmt: skip  # noqa: E501


# -- split points ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "locale", "parts"),
    [
        ("выключи свет на кухне и поставь будильник на семь", "ru", ["выключи свет на кухне", "поставь будильник на семь"]),  # noqa: E501
        ("включи чайник, а ещё напомни позвонить маме", "ru", ["включи чайник", "напомни позвонить маме"]),
        ("включи свет, потом музыку, затем таймер", "ru", ["включи свет", "музыку", "таймер"]),
        ("turn off the lights, then play some jazz", "en", ["turn off the lights", "play some jazz"]),
        ("turn on the fan and also set a timer", "en", ["turn on the fan", "set a timer"]),
        ("set a timer for 2,5 minutes", "en", ["set a timer for 2,5 minutes"]),  # a decimal comma is no cut
        ("и ещё включи свет", "ru", ["и ещё включи свет"]),  # a connector needs words on both sides
        ("включи свет и", "ru", ["включи свет и"]),
    ],
)  # fmt: skip
def test_cuts_split_at_connectors_and_punctuation(text: str, locale: str, parts: list[str]) -> None:
    cuts = find_cuts(text, locale)
    got = split_at(text, cuts)
    assert got is not None
    assert [p.text for p in got] == parts
    for p in got:
        assert text[p.start : p.end] == p.text


def test_plans_skip_filler_parts_and_come_fewest_first() -> None:
    text = "слушай, выключи свет и поставь будильник, пожалуйста"
    cuts = find_cuts(text, "ru")
    assert len(cuts) == 3  # after "слушай", at "и", before "пожалуйста"
    found = [[p.text for p in plan] for plan in plans(text, cuts, "ru")]
    assert found == [["слушай, выключи свет", "поставь будильник, пожалуйста"]]  # no filler stands alone
    text = "включи свет, потом музыку, затем таймер"
    sizes = [len(plan) for plan in plans(text, find_cuts(text, "ru"), "ru")]
    assert sizes == [2, 2, 3]


A, AB, R = Outcome.ACCEPT, Outcome.ABSTAIN, Outcome.REJECT


@pytest.mark.parametrize(
    ("parts", "whole", "expected"),
    [
        ([(A, 1.0), (A, 1.0)], (AB, 0.46), 1.0),  # two rules, the whole abstained
        ([(A, 1.0), (A, 0.95)], (A, 0.90), 0.95),  # the whole was confident, but less than every part
        ([(A, 0.92), (A, 0.95)], (A, 0.94), None),  # a split that does not raise the floor is not taken
        ([(A, 1.0), (AB, 0.6)], (AB, 0.5), 0.6),  # one part abstains, still a request
        ([(A, 1.0), (AB, 0.6)], (A, 0.55), None),  # an accepted whole needs every part accepted
        ([(A, 1.0), (AB, 0.4)], (R, 0.1), None),  # below the reject threshold: not a request
        ([(A, 1.0), (R, 0.5)], (R, 0.1), None),  # a rejected part
        ([(AB, 0.7), (AB, 0.7)], (R, 0.1), None),  # nothing accepted
        ([(A, 1.0)], (AB, 0.1), None),  # one part is no split
    ],
)
def test_joint_confidence(
    parts: list[tuple[Outcome, float]], whole: tuple[Outcome, float], expected: float | None
) -> None:
    assert joint_confidence(parts, whole, reject=0.45) == expected


# -- follow-up shapes, cancel counterparts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_conv_catalog(tmp_path_factory.mktemp("conv") / "catalog")


@pytest.fixture(scope="module")
def canon(catalog_dir: Path) -> Canonicalizer:
    return Canonicalizer(load_catalog(catalog_dir))


@pytest.mark.parametrize(
    ("text", "slot_only", "bare_cancel"),
    [
        ("а в спальне?", True, False),
        ("and the bedroom too", True, False),
        ("сделай на восемь", True, False),
        ("make it 8:15 instead", True, False),
        ("а на 15 минут?", True, False),
        ("включи свет в спальне", False, False),  # a complete request
        ("в спальне холодно", False, False),  # a new word: not an ellipsis
        ("отмени", False, True),
        ("отмени, пожалуйста", False, True),
        ("cancel that", False, True),
        ("never mind", False, True),
        ("отмени будильник", False, False),  # names what to cancel: a request of its own
        ("cancel the timer for 10 minutes", False, False),
    ],
)
def test_follow_up_shapes(canon: Canonicalizer, text: str, slot_only: bool, bare_cancel: bool) -> None:
    c = canon.canonicalize(text)
    lex = lexicon(c.locale)
    assert is_slot_only(c, lex) is slot_only
    assert is_bare_cancel(c, lex) is bare_cancel


def test_cancel_counterparts_declared_then_by_convention(catalog_dir: Path) -> None:
    catalog = load_catalog(catalog_dir)
    assert cancel_intent_of(catalog, "alarm.set") == "alarm.cancel"  # declared
    assert cancel_intent_of(catalog, "device.turn_on") == "device.turn_off"  # declared, not by name
    assert cancel_intent_of(catalog, "voice.timer.start") == "voice.timer.cancel"  # <domain>.cancel
    assert cancel_intent_of(catalog, "alarm.cancel") is None
    assert cancel_intent_of(catalog, "music.play") is None


# -- clarification ---------------------------------------------------------------------------------------


def _abstain(top: tuple[str, float], *alts: tuple[str, float], reason: str = "low_confidence") -> Decision:
    return Decision(
        top[0], top[1], Outcome.ABSTAIN, "neural", tuple(Candidate(i, c) for i, c in alts), reason=reason
    )


@pytest.mark.parametrize(
    ("decision", "kind", "intents", "domain"),
    [
        (_abstain(("alarm.set", 0.46), ("voice.timer.start", 0.40)), "which_intent", ["alarm.set", "voice.timer.start"], None),  # noqa: E501
        (_abstain(("alarm.set", 0.45), ("alarm.cancel", 0.42)), "which_intent", ["alarm.set", "alarm.cancel"], "alarm"),  # noqa: E501
        (_abstain(("alarm.set", 0.86), ("alarm.cancel", 0.80), reason="small_margin"), "which_intent", ["alarm.set", "alarm.cancel"], "alarm"),  # noqa: E501
        (_abstain(("alarm.set", 0.70), ("weather.get", 0.12)), None, None, None),  # not close: no question
        (_abstain(("alarm.set", 0.50), ("voice.timer.start", 0.20)), None, None, None),  # together below accept  # noqa: E501
        (_abstain(("alarm.set", 0.72), ("alarm.cancel", 0.10)), None, None, None),  # one domain, not close
    ],
)  # fmt: skip
def test_clarify_only_on_close_calls(
    canon: Canonicalizer, decision: Decision, kind: str | None, intents: list[str] | None, domain: str | None
) -> None:
    q = for_decision(decision, canon.canonicalize("x"), GateConfig(), canon.catalog)
    if kind is None:
        assert q is None
        return
    assert q is not None and q.question_kind == kind
    assert [c.intent for c in q.candidates] == intents and q.domain == domain


def test_clarify_never_on_accept_or_reject(canon: Canonicalizer) -> None:
    c = canon.canonicalize("x")
    for outcome in (Outcome.ACCEPT, Outcome.REJECT):
        d = Decision("alarm.set", 0.46, outcome, "neural", (Candidate("voice.timer.start", 0.4),))
        assert for_decision(d, c, GateConfig(), canon.catalog) is None


# -- the session store ---------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _frame(canon: Canonicalizer, rid: str, at: float) -> Frame:
    return Frame("alarm.set", {"time": "07:00"}, rid, 0, canon.canonicalize("поставь будильник на семь"), at)


def test_store_ttl_drops_frames_and_their_text(canon: Canonicalizer) -> None:
    clock = Clock()
    store = SessionStore(90.0, clock=clock)
    store.update("s1", [_frame(canon, "r1", clock.t)], None)
    clock.t += 60
    store.update("s1", [_frame(canon, "r2", clock.t)], None)
    assert [f.request_id for f in store.get("s1").frames] == ["r2", "r1"]  # newest first
    clock.t += 31  # r1 is 91 s old, r2 31 s
    assert [f.request_id for f in store.get("s1").frames] == ["r2"]
    clock.t += 60
    assert store.sweep() == 1  # the periodic sweep removes it without any request
    assert len(store) == 0 and store.get("s1").frames == ()
    assert store._sessions == {} and not store._expiry  # no text left anywhere


def test_store_is_bounded_and_isolated(canon: Canonicalizer) -> None:
    clock = Clock()
    store = SessionStore(90.0, max_sessions=3, frames=2, clock=clock)
    for i in range(5):
        store.update(f"s{i}", [_frame(canon, f"r{i}", clock.t)], None)
    assert len(store) == 3 and store.evicted == 2
    assert store.get("s0").frames == () and store.get("s4").frames[0].request_id == "r4"
    for i in range(4):
        store.update("s4", [_frame(canon, f"x{i}", clock.t)], None)
    assert [f.request_id for f in store.get("s4").frames] == ["x3", "x2"]  # frames per scope bounded
    assert store.get("s3").frames[0].request_id == "r3"  # each scope sees only its own
    assert store.get(None).frames == () and store.get("nobody").frames == ()


# -- in-process: the whole layer over the real pipeline ----------------------------------------------------


@pytest.fixture(scope="module")
def pipe(catalog_dir: Path) -> Pipeline:
    return scripted_pipeline(catalog_dir)


def _ask(conv: Conversation, pipe: Pipeline, text: str, rid: str, scope: str | None = "s") -> dict[str, Any]:
    answer = conv.answer(pipe, Request(text, rid, None, None, scope))
    return to_wire(answer, pipe.gate_config.accept, rid)


@pytest.mark.parametrize(
    ("text", "frames"),
    [
        ("выключи свет на кухне и поставь будильник на 7:30",
         [("device.turn_off", {"device": "device:light:kitchen_ceiling"}), ("alarm.set", {"time": "07:30"})]),
        ("включи свет на кухне и в спальне",  # a slot carried over: one turn-on per room
         [("device.turn_on", {"device": "device:light:kitchen_ceiling"}), ("device.turn_on", {"device": "device:light:bedroom_lamp"})]),  # noqa: E501
        ("turn on the kitchen light and the kettle",
         [("device.turn_on", {"device": "device:light:kitchen_ceiling"}), ("device.turn_on", {"device": "device:plug:kettle"})]),  # noqa: E501
        ("приглуши свет на кухне и в спальне",  # a rule that matched only the first part does not win
         [("light.dim", {"device": "device:light:kitchen_ceiling"}), ("light.dim", {"device": "device:light:bedroom_lamp"})]),  # noqa: E501
        ("включи свет на кухне и музыку",  # the verb carried over, to another intent
         [("device.turn_on", {"device": "device:light:kitchen_ceiling"}), ("music.play", {})]),
        ("set an alarm for 7:30, then set a timer for 10 minutes, and turn off the kitchen light",
         [("alarm.set", {"time": "07:30"}), ("voice.timer.start", {"duration": "PT10M"}), ("device.turn_off", {"device": "device:light:kitchen_ceiling"})]),  # noqa: E501
    ],
)  # fmt: skip
def test_split_frames(pipe: Pipeline, text: str, frames: list[tuple[str, dict[str, str]]]) -> None:
    wire = _ask(Conversation(), pipe, text, "r1", None)
    segs = wire["segments"]
    assert [(s["top_intent"], s["slots"]) for s in segs] == frames
    assert all(s["decision"] == "accept" for s in segs)
    assert (wire["top_intent"], wire["slots"]) == frames[0]  # the contract's fields are the first request's


def test_no_split_when_the_whole_is_one_confident_request(pipe: Pipeline) -> None:
    repeated = _ask(Conversation(), pipe, "отмени будильник, отмени будильник", "r0", None)
    assert "segments" not in repeated  # one request said twice is not two requests
    for text in ("play simon and garfunkel", "поставь будильник на 7:30", "включи свет на кухне"):
        wire = _ask(Conversation(), pipe, text, "r1", None)
        assert "segments" not in wire, text
        assert wire["decision"] == "accept"


def test_a_confident_but_wrong_whole_loses_to_the_split(pipe: Pipeline) -> None:
    wire = _ask(Conversation(), pipe, "выключи свет на кухне и поставь будильник на семь", "r1", None)
    assert [s["top_intent"] for s in wire["segments"]] == ["device.turn_off", "alarm.set"]


# -- over HTTP ----------------------------------------------


@pytest.fixture
def http_config(tmp_path: Path, make_config: Callable[..., Config]) -> Callable[..., Config]:
    def _make(**kw: Any) -> Config:
        catalog = write_conv_catalog(tmp_path / "catalog")
        return make_config(catalog_dir=str(catalog), watch_pointer=False, **kw)

    return _make


async def _serve(aiohttp_client: Any, config: Config) -> TestClient:
    state = scripted_state(config)
    return await aiohttp_client(create_app(state))


@pytest.fixture
async def client(aiohttp_client: Any, http_config: Callable[..., Config]) -> TestClient:
    return await _serve(aiohttp_client, http_config())


async def parse(client: TestClient, text: str, **body: Any) -> dict[str, Any]:
    resp = await client.post("/parse", json={"text": text, **body})
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    assert data["ok"] is True and "context" in data
    return data


@pytest.mark.parametrize(
    "text",
    [
        "выключи свет на кухне и поставь будильник на 7:30",
        "turn off the kitchen light, then set an alarm for 7:30",
    ],
)
async def test_http_two_requests(client: TestClient, text: str) -> None:
    body = await parse(client, text, request_id="r-two")
    assert RESULT_FIELDS <= set(body) and {k: body[k] for k in RESULT_FIELDS} == {
        k: body["result"][k] for k in RESULT_FIELDS
    }
    assert body["result"]["segments"] == body["segments"]
    segs = body["segments"]
    assert [s["index"] for s in segs] == [0, 1]
    assert all(SEGMENT_FIELDS <= set(s) for s in segs)
    assert [s["top_intent"] for s in segs] == ["device.turn_off", "alarm.set"]
    assert segs[1]["slots"] == {"time": "07:30"}
    assert [text[s["start"] : s["end"]] for s in segs] == [s["text"] for s in segs]
    assert segs[0]["end"] < segs[1]["start"]
    assert (body["top_intent"], body["request_id"]) == ("device.turn_off", "r-two")
    assert body["context"] == {"action": "start", "refers_to": None}


@pytest.mark.parametrize(
    ("text", "second"),
    [
        ("выключи свет на кухне и узнай погоду на даче", "узнай погоду на даче"),
        (
            "turn off the kitchen light and check the weather at the cottage",
            "check the weather at the cottage",
        ),
    ],
)
async def test_http_one_segment_abstains_while_the_other_is_accepted(
    client: TestClient, text: str, second: str
) -> None:
    body = await parse(client, text)
    first, other = body["segments"]
    assert (first["decision"], first["top_intent"]) == ("accept", "device.turn_off")
    assert other["text"] == second and other["decision"] == "abstain"  # reported, never dropped
    assert other["top_intent"] == "weather.get" and other["confidence"] == 0.6
    assert other["context"]["action"] == "noop"


async def test_http_single_request_has_no_segments(client: TestClient) -> None:
    for text in (
        "play simon and garfunkel",
        "поставь будильник на 7:30",
        "слушай, поставь будильник на 7:30",
    ):
        body = await parse(client, text)
        assert "segments" not in body and "clarify" not in body, text


@pytest.mark.parametrize(
    ("turns"),
    [
        [  # ru: a room follow-up, a value follow-up, a cancel
            (
                "выключи свет на кухне",
                "device.turn_off",
                {"device": "device:light:kitchen_ceiling"},
                "start",
                None,
            ),
            ("а в спальне?", "device.turn_off", {"device": "device:light:bedroom_lamp"}, "update", 0),
            ("поставь будильник на семь", "alarm.set", {"time": "07:00"}, "start", None),
            ("сделай на 8:15", "alarm.set", {"time": "08:15"}, "update", 2),
            ("отмени", "alarm.cancel", {"time": "08:15"}, "cancel", 3),
        ],
        [  # en
            ("set an alarm for 7:30", "alarm.set", {"time": "07:30"}, "start", None),
            ("make it 8:15 instead", "alarm.set", {"time": "08:15"}, "update", 0),
            ("cancel that", "alarm.cancel", {"time": "08:15"}, "cancel", 1),
            (
                "turn on the kitchen light",
                "device.turn_on",
                {"device": "device:light:kitchen_ceiling"},
                "start",
                None,
            ),
            ("and the bedroom too", "device.turn_on", {"device": "device:light:bedroom_lamp"}, "update", 3),
            ("never mind", "device.turn_off", {"device": "device:light:bedroom_lamp"}, "cancel", 4),
        ],
        [  # a timer: the duration keeps its unit; the counterpart by convention
            ("поставь таймер на 10 минут", "voice.timer.start", {"duration": "PT10M"}, "start", None),
            ("а на 15?", "voice.timer.start", {"duration": "PT15M"}, "update", 0),
            ("отмени", "voice.timer.cancel", {"duration": "PT15M"}, "cancel", 1),
        ],
    ],
)
async def test_http_session_follow_ups(
    client: TestClient, turns: list[tuple[str, str, dict[str, str], str, int | None]]
) -> None:
    ids = []
    for i, (text, intent, slots, action, refers) in enumerate(turns):
        rid = f"t{i}"
        ids.append(rid)
        body = await parse(client, text, session_id="sess-1", request_id=rid)
        assert (body["decision"], body["top_intent"], body["slots"]) == ("accept", intent, slots), text
        assert body["context"]["action"] == action, text
        assert body["context"]["refers_to"] == (ids[refers] if refers is not None else None), text
        if action != "start":
            assert body["evidence"]["context"]["rewritten_text"], text


async def test_http_explicit_cancel_of_a_recent_frame(client: TestClient) -> None:
    await parse(client, "поставь будильник на 7:30", session_id="c", request_id="a1")
    body = await parse(client, "отмени будильник", session_id="c", request_id="a2")
    assert body["top_intent"] == "alarm.cancel" and body["context"] == {"action": "cancel", "refers_to": "a1"}
    await parse(client, "включи свет на кухне", session_id="c", request_id="a3")
    other = await parse(client, "выключи ночник", session_id="c")  # the counterpart, but another device
    assert other["top_intent"] == "device.turn_off" and other["context"] == {
        "action": "start",
        "refers_to": None,
    }


async def test_http_webspace_is_the_default_scope_and_sessions_do_not_leak(client: TestClient) -> None:
    await parse(client, "выключи свет на кухне", webspace_id="ws-a", request_id="w1")
    body = await parse(client, "а в спальне?", webspace_id="ws-a")
    assert body["top_intent"] == "device.turn_off" and body["context"]["refers_to"] == "w1"
    other = await parse(client, "а в спальне?", webspace_id="ws-b")  # another webspace
    assert other["decision"] != "accept" and other["context"] == {"action": "noop", "refers_to": None}
    await parse(client, "поставь будильник на 7:30", session_id="alice", request_id="al")
    bob = await parse(client, "сделай на 8:15", session_id="bob")
    assert bob["decision"] != "accept" and bob["context"]["action"] == "noop"
    same_webspace = await parse(client, "сделай на 8:15", session_id="carol", webspace_id="ws-a")
    assert same_webspace["context"]["action"] == "noop"  # a session is its own scope, not its webspace's
    alice = await parse(client, "сделай на 8:15", session_id="alice")
    assert alice["slots"] == {"time": "08:15"} and alice["context"]["refers_to"] == "al"
    stateless = await parse(client, "отмени")  # no session, no webspace: no context at all
    assert stateless["context"]["action"] == "noop"


async def test_http_ttl_expires(aiohttp_client: Any, http_config: Callable[..., Config]) -> None:
    client = await _serve(aiohttp_client, http_config(session_ttl_s=0.4))
    await parse(client, "поставь будильник на 7:30", session_id="t")
    assert (await parse(client, "сделай на 8:15", session_id="t"))["context"]["action"] == "update"
    await asyncio.sleep(0.6)
    late = await parse(client, "сделай на 8:15", session_id="t")
    assert late["decision"] != "accept" and late["context"] == {"action": "noop", "refers_to": None}
    health = await (await client.get("/health")).json()
    assert health["conversation"]["sessions"] == 0  # nothing stored (the late turn accepted nothing)


async def test_http_ttl_sweeper_removes_text_without_requests(
    aiohttp_client: Any, http_config: Callable[..., Config]
) -> None:
    client = await _serve(aiohttp_client, http_config(session_ttl_s=0.3))
    await parse(client, "поставь будильник на 7:30", session_id="idle")
    assert (await (await client.get("/health")).json())["conversation"]["sessions"] == 1
    await asyncio.sleep(0.8)  # no /parse in between: the background sweep must drop it
    assert (await (await client.get("/health")).json())["conversation"]["sessions"] == 0


async def test_http_context_never_turns_an_abstention_into_an_accept(client: TestClient) -> None:
    await parse(client, "поставь таймер на 10 минут", session_id="g", request_id="g1")
    body = await parse(client, "а на 30 часов?", session_id="g")  # the completed request is out of range
    assert body["decision"] != "accept" and body["top_intent"] == ""
    assert body["context"]["action"] == "noop"
    # and a follow-up that fits no frame stays what the pipeline said on its own words
    other = await parse(client, "а в спальне?", session_id="g")
    assert other["decision"] == "reject" and other["context"]["action"] == "noop"


@pytest.mark.parametrize(
    ("ask", "reply"), [("поставь на 7:30", "будильник"), ("set it for 7:30", "the alarm")]
)
async def test_http_clarify_between_domains_then_the_answer(client: TestClient, ask: str, reply: str) -> None:
    body = await parse(client, ask, session_id="q", request_id="q1")
    assert body["decision"] == "abstain" and body["top_intent"] in ("", "alarm.set")
    q = body["clarify"]
    assert q["question_kind"] == "which_intent" and q["domain"] is None
    assert [(c["intent"], c["domain"]) for c in q["candidates"]] == [
        ("alarm.set", "alarm"),
        ("voice.timer.start", "voice.timer"),
    ]
    answer = await parse(client, reply, session_id="q", request_id="q2")
    assert (answer["decision"], answer["top_intent"], answer["slots"]) == (
        "accept",
        "alarm.set",
        {"time": "07:30"},
    )
    assert answer["context"] == {"action": "start", "refers_to": "q1", "resolution": "clarify_answer"}
    again = await parse(client, reply, session_id="q")  # the question is closed now
    assert again["decision"] == "abstain" and again["context"]["action"] == "noop"


async def test_http_clarify_inside_a_domain_then_the_answer(client: TestClient) -> None:
    body = await parse(client, "что-то с будильником на 7:30", session_id="d", request_id="d1", locale="ru")
    q = body["clarify"]
    assert q["domain"] == "alarm" and [c["intent"] for c in q["candidates"]] == ["alarm.set", "alarm.cancel"]
    answer = await parse(client, "отменить", session_id="d")
    assert (answer["top_intent"], answer["slots"]) == ("alarm.cancel", {"time": "07:30"})
    assert answer["context"]["refers_to"] == "d1"


@pytest.mark.parametrize(
    ("first", "follow", "reply", "labels"),
    [
        ("выключи свет на кухне", "а в гостиной?", "торшер", {"торшер", "люстра"}),
        (
            "turn off the kitchen light",
            "and the living room?",
            "the floor lamp",
            {"floor lamp", "chandelier"},
        ),
    ],
)
async def test_http_clarify_which_entity_after_a_room_follow_up(
    client: TestClient, first: str, follow: str, reply: str, labels: set[str]
) -> None:
    await parse(client, first, session_id="e", request_id="e1")
    body = await parse(client, follow, session_id="e", request_id="e2")  # two lights there
    assert body["decision"] == "abstain" and body["reason"] == "ambiguous_entity"
    q = body["clarify"]
    assert q["question_kind"] == "which_entity" and q["intent"] == "device.turn_off"
    assert {c["ref"] for c in q["candidates"]} == {
        "device:light:living_floor_lamp",
        "device:light:living_chandelier",
    }
    assert {c["label"] for c in q["candidates"]} == labels
    answer = await parse(client, reply, session_id="e")
    assert (answer["top_intent"], answer["slots"]) == (
        "device.turn_off",
        {"device": "device:light:living_floor_lamp"},
    )
    assert answer["context"] == {"action": "update", "refers_to": "e1", "resolution": "clarify_answer"}


@pytest.mark.parametrize("value", [5, ["s"], {"id": 1}, True])
async def test_http_bad_session_id(client: TestClient, value: Any) -> None:
    resp = await client.post("/parse", data=json.dumps({"text": "привет", "session_id": value}),
                             headers={"Content-Type": "application/json"})  # fmt: skip
    assert resp.status == 400
    body = await resp.json()
    assert (body["ok"], body["error"], body["field"]) == (False, "invalid_field", "session_id")


async def test_http_split_search_costs_are_bounded(
    aiohttp_client: Any, http_config: Callable[..., Config]
) -> None:
    ranker = ScriptedRanker()
    state = scripted_state(http_config(), ranker)
    client = await aiohttp_client(create_app(state))
    await parse(client, "поставь будильник на 7:30")
    assert ranker.calls == []  # a rule took the whole: no split search, no ranker
    two = await parse(client, "выключи свет на кухне и поставь будильник на 7:30")
    assert len(two["segments"]) == 2 and ranker.calls == []  # rules took every part: the ranker never ran
    await parse(client, "выключи свет на кухне и узнай погоду на даче")
    assert ranker.calls[0] == "выключи {device} и узнай погоду на даче"  # now the whole's view is needed
    ranker.calls.clear()
    text = "включи свет и музыку и таймер и будильник и погоду и ещё что-нибудь и снова"
    await parse(client, text)
    assert len(ranker.calls) <= 1 + 15 + 15  # the whole, at most 15 spans of 4 cuts, their carry-overs


def test_clarify_which_entity_when_the_intent_is_settled(canon: Canonicalizer) -> None:
    c = canon.canonicalize("выключи свет")
    amb = msgspec.structs.replace(
        c,
        ambiguities=(
            Ambiguity("свет", ("device:light:living_floor_lamp", "device:light:living_chandelier")),
        ),
    )
    d = _abstain(("device.turn_off", 0.93), reason="below_intent_threshold")
    q = for_decision(d, amb, GateConfig(), canon.catalog)
    assert q is not None and q.question_kind == "which_entity"
    assert (q.intent, q.text, q.domain) == ("device.turn_off", "свет", "device")
    assert [(x.ref, x.label) for x in q.candidates] == [
        ("device:light:living_floor_lamp", "торшер"),
        ("device:light:living_chandelier", "люстра"),
    ]
    assert for_decision(d, c, GateConfig(), canon.catalog) is None  # no ambiguity: nothing to ask
