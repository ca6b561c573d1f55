"""Slot markup in the catalog, the new value parsers, and slot checks (kinds, ranges, missing slots)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import msgspec
import pytest

from skill.canonicalize import Canonicalizer, EntityMatch
from skill.catalog import CatalogError, MarkupError, Span, load_catalog, parse_markup
from skill.decision import Candidate, Decision, Outcome
from skill.pipeline import Pipeline
from skill.regex_stage import RegexStage
from skill.slots import drop_kind_conflicts, duration_seconds, fill_slots
from tests.conftest import MINI_INTENTS, REPO, write_catalog

NEW_INTENTS = {
    "device.query_state",
    "climate.set_temperature",
    "climate.get_temperature",
    "cover.open",
    "cover.close",
    "cover.set_position",
    "lock.lock",
    "lock.unlock",
    "light.set_color",
    "music.next",
    "music.previous",
    "music.resume",
    "voice.timer.status",
    "voice.timer.pause",
    "voice.timer.resume",
    "voice.timer.add",
    "voice.date.now",
    "list.add_item",
    "assistant.cancel",
}
HOME = ("device.", "light.", "climate.", "cover.", "lock.", "music.", "voice.timer.", "alarm.", "reminder.")


@pytest.fixture(scope="module")
def repo_catalog() -> Any:
    return load_catalog(REPO / "catalog")


@pytest.fixture(scope="module")
def canon(repo_catalog: Any) -> Canonicalizer:
    return Canonicalizer(repo_catalog)


def _with(intents_change: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(MINI_INTENTS)
    data["intents"][1].update(intents_change)
    return data


# -- markup


def test_markup_strips_and_keeps_spans() -> None:
    text, spans = parse_markup("turn on the [ceiling fan](device) in the [bedroom](room)")
    assert text == "turn on the ceiling fan in the bedroom"
    assert spans == (Span(12, 23, "device"), Span(31, 38, "room"))
    assert text[12:23] == "ceiling fan" and text[31:38] == "bedroom"
    assert parse_markup("выключи [ночную лампу](device)") == (
        "выключи ночную лампу",
        (Span(8, 20, "device"),),
    )


@pytest.mark.parametrize(
    "bad", ["turn on [the fan", "turn on the fan]", "[[a](device)](room)", "[ a](device)"]
)
def test_markup_errors(bad: str) -> None:
    with pytest.raises(MarkupError):
        parse_markup(bad)


def test_unknown_slot_in_markup_names_file_and_line(tmp_path: Path) -> None:
    data = _with({"examples": {"en": ["turn off the kitchen light", "switch off the [fan](gadget)"]}})
    root = write_catalog(tmp_path / "c", data)
    with pytest.raises(CatalogError) as err:
        load_catalog(root)
    assert "mini.yaml" in str(err.value) and "unknown slot 'gadget'" in str(err.value)
    assert "line " in str(err.value)


def test_unbalanced_markup_is_refused_with_line(tmp_path: Path) -> None:
    root = write_catalog(tmp_path / "c", _with({"examples": {"en": ["switch off the [fan(device)"]}}))
    with pytest.raises(CatalogError, match=r"line \d+: unbalanced"):
        load_catalog(root)


def test_markup_in_a_negative_is_refused(tmp_path: Path) -> None:
    root = write_catalog(tmp_path / "c", _with({"negatives": {"en": ["who made the [fan](device)"]}}))
    with pytest.raises(CatalogError, match="negative"):
        load_catalog(root)


def test_kind_constraint_naming_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    slots = {"device": {"source": "device", "value": "ref", "required": True, "kinds": ["spaceship"]}}
    root = write_catalog(tmp_path / "c", _with({"slots": slots}))
    with pytest.raises(CatalogError, match="unknown entity kind 'spaceship'"):
        load_catalog(root)


def test_cancel_intent_must_exist(tmp_path: Path) -> None:
    root = write_catalog(tmp_path / "c", _with({"cancel_intent": "device.explode"}))
    with pytest.raises(CatalogError, match="cancel_intent"):
        load_catalog(root)


def test_shipped_catalog_has_the_home_intents_with_depth(repo_catalog: Any) -> None:
    assert NEW_INTENTS <= set(repo_catalog.intents)
    for name, intent in repo_catalog.intents.items():
        need = 60 if name.startswith(HOME) or name == "desktop.open_weather" else 40
        for locale in ("ru", "en"):
            assert len(intent.examples.get(locale, [])) >= need, (name, locale)
    counts = repo_catalog.markup_counts()
    assert counts["examples_marked"] > 2500 and counts["spans"] > counts["examples_marked"]
    assert repo_catalog.intents["lock.unlock"].risky
    assert repo_catalog.intents["alarm.set"].cancel_intent == "alarm.cancel"
    # spans point at the right words of the stripped text
    for ex in repo_catalog.examples():
        for sp in ex.spans:
            surface = ex.text[sp.start : sp.end]
            assert surface and surface == surface.strip(), (ex.text, sp)


def test_open_slots_on_existing_intents(repo_catalog: Any) -> None:
    play = repo_catalog.intents["music.play"].slots
    assert {"artist", "genre", "song", "playlist"} <= set(play) and play["song"].open
    assert repo_catalog.intents["reminder.create"].slots["text"].open
    assert repo_catalog.intents["notebook.create_note"].slots["text"].open


# -- values


@pytest.mark.parametrize(
    ("text", "locale", "placeholder", "value"),
    [
        ("set a timer for 1/2 an hour", "en", "duration", "PT30M"),
        ("set a timer for 1 and a 1/2 hours", "en", "duration", "PT1H30M"),
        ("timer for half an hour", "en", "duration", "PT30M"),
        ("timer for an hour and a half", "en", "duration", "PT1H30M"),
        ("поставь таймер на полтора часа", "ru", "duration", "PT1H30M"),
        ("поставь таймер на полчаса", "ru", "duration", "PT30M"),
        ("set the thermostat to 21", "en", "temperature", "21"),
        ("make it seventy two degrees", "en", "temperature", "72"),
        ("поставь двадцать один градус в спальне", "ru", "temperature", "21"),
        ("set temperature to 30°", "en", "temperature", "30"),
        ("make the kitchen light red", "en", "color", "red"),
        ("сделай свет в спальне теплым", "ru", "color", "warm white"),
        ("яркость на максимум", "ru", "number", "max"),
        ("brightness to the lowest", "en", "number", "min"),
        ("открой шторы наполовину", "ru", "number", "50"),
        ("play some jazz", "en", "genre", "jazz"),
        ("поставь что-нибудь из классики", "ru", "genre", "classical"),
        ("хочу послушать старый рок-н-ролл", "ru", "genre", "rock and roll"),
        ("put on some hip hop in the kitchen", "en", "genre", "hip hop"),
        ("play classic rock", "en", "genre", "classic rock"),
    ],
)
def test_value_parsers(canon: Canonicalizer, text: str, locale: str, placeholder: str, value: str) -> None:
    c = canon.canonicalize(text, locale)
    got = [(e.placeholder, e.value) for e in c.entities]
    assert (placeholder, value) in got, got


def test_temperature_keeps_the_unit_said(canon: Canonicalizer) -> None:
    c = canon.canonicalize("set it to seventy two degrees fahrenheit", "en")
    kinds = {e.kind for e in c.entities if e.placeholder == "temperature"}
    assert kinds == {"temperature.fahrenheit"}


@pytest.mark.parametrize(
    "text", ["play some blues", "pour me red wine", "купи белый хлеб", "включи теплый пол"]
)
def test_colour_words_need_a_light_word(canon: Canonicalizer, text: str) -> None:
    assert "color" not in {e.placeholder for e in canon.canonicalize(text).entities}


@pytest.mark.parametrize(
    "text",
    [
        "what is jazz",  # no music or play word
        "rock the baby to sleep",
        "это классика",
        "play music in the house",  # "house" alone is not listed: a home, not a genre
        "stop the music in the kitchen and the lounge",  # "lounge" alone is a room
        "play Daft Punk",  # a bare "punk" is mostly this band
    ],
)
def test_genre_words_need_a_music_word_and_stay_out_of_names(canon: Canonicalizer, text: str) -> None:
    assert "genre" not in {e.placeholder for e in canon.canonicalize(text).entities}


def test_genre_fills_the_open_slot_and_the_tagger_the_rest(repo_catalog: Any, canon: Canonicalizer) -> None:
    play = repo_catalog.intents["music.play"]
    c = canon.canonicalize("включи джаза немного на кухне", "ru")
    assert c.masked == "включи {genre} немного на {room}"
    assert fill_slots(play, c, {}).slots["genre"] == "jazz"
    # An unlisted genre is the tagger's: canonicalization leaves it, and the tagged span (as the
    # pipeline adds it after canonicalization's entities) fills the same slot with its text.
    c = canon.canonicalize("play something relaxing", "en")
    assert "genre" not in fill_slots(play, c, {}).slots
    span = EntityMatch("genre", "genre", "relaxing", 15, 23, "relaxing", source="tagger", match_type="tagged")
    tagged = msgspec.structs.replace(c, entities=(*c.entities, span))
    assert fill_slots(play, tagged, {}).slots["genre"] == "relaxing"


def test_half_stays_a_time_or_duration(canon: Canonicalizer) -> None:
    assert canon.canonicalize("wake me at half past six", "en").masked == "wake me at {time}"


# -- slot checks


def test_duration_seconds() -> None:
    assert duration_seconds("PT1H30M") == 5400
    assert duration_seconds("PT0S") == 0
    assert duration_seconds("P1D") == 86400
    assert duration_seconds("nonsense") is None


def _decision(intent: str, conf: float = 0.95, alts: tuple[Candidate, ...] = ()) -> Decision:
    return Decision(intent=intent, confidence=conf, outcome=Outcome.ACCEPT, via="neural", alternatives=alts)


def test_range_and_extremes(repo_catalog: Any, canon: Canonicalizer) -> None:
    bright = repo_catalog.intents["light.set_brightness"]
    check = fill_slots(bright, canon.canonicalize("set the kitchen light to 250 percent", "en"), {})
    assert [i["slot"] for i in check.invalid] == ["level"]
    check = fill_slots(bright, canon.canonicalize("kitchen light to max", "en"), {})
    assert check.slots["level"] == "100" and not check.invalid
    timer = repo_catalog.intents["voice.timer.start"]
    check = fill_slots(timer, canon.canonicalize("set a timer for 0 minutes", "en"), {})
    assert [i["slot"] for i in check.invalid] == ["duration"]
    temp = repo_catalog.intents["climate.set_temperature"]
    ok = fill_slots(temp, canon.canonicalize("set the thermostat to seventy two degrees", "en"), {})
    assert ok.slots["temperature"] == "72" and not ok.invalid  # Fahrenheit, 22 °C
    hot = fill_slots(temp, canon.canonicalize("поставь термостат на 90 градусов", "ru"), {})
    assert [i["slot"] for i in hot.invalid] == ["temperature"]


def test_multiple_slot_keeps_every_value_in_order(repo_catalog: Any, canon: Canonicalizer) -> None:
    calc = repo_catalog.intents["calculator.compute"]
    assert calc.slots["number"].multiple
    check = fill_slots(calc, canon.canonicalize("сколько будет 15 процентов от 200", "ru"), {})
    assert check.slots["number"] == ["15", "200"]
    check = fill_slots(calc, canon.canonicalize("add 4, 8 and fifteen", "en"), {})
    assert check.slots["number"] == ["4", "8", "15"]
    assert fill_slots(calc, canon.canonicalize("square root of 400", "en"), {}).slots["number"] == ["400"]
    # A stage's own single value becomes a one-element list; a single-valued slot keeps the first value.
    assert fill_slots(calc, canon.canonicalize("square root", "en"), {"number": "9"}).slots["number"] == ["9"]
    bright = repo_catalog.intents["light.set_brightness"]
    one = fill_slots(bright, canon.canonicalize("set the kitchen light to 30 or 40 percent", "en"), {})
    assert not bright.slots["level"].multiple and isinstance(one.slots.get("level"), str)


def test_multiple_slot_scores_one_span_per_value() -> None:
    from tools.slot_metrics import SlotScores, predicted_spans  # noqa: PLC0415

    ents = [
        {"placeholder": "number", "text": "fifteen", "value": "15"},
        {"placeholder": "number", "text": "200", "value": "200"},
    ]
    pred = predicted_spans({"number": ["15", "200"]}, {"entities": ents}, {"number": "number"})
    assert [(p["text"], p["value"]) for p in pred] == [("fifteen", "15"), ("200", "200")]
    scores = SlotScores()
    scores.add(
        pred, [{"slot": "number", "text": "fifteen", "value": None}, {"slot": "number", "text": "200"}]
    )
    assert scores.report()["slot_f1"] == 1.0


def test_missing_required_slot(repo_catalog: Any, canon: Canonicalizer) -> None:
    check = fill_slots(repo_catalog.intents["device.turn_on"], canon.canonicalize("turn it on", "en"), {})
    assert check.missing == ("device",)


def test_kind_conflict_drops_the_candidate(repo_catalog: Any, canon: Canonicalizer) -> None:
    c = canon.canonicalize("set the tv to 50", "en")
    proposal = _decision("light.set_brightness", 0.9, (Candidate("music.volume", 0.08),))
    out = drop_kind_conflicts(proposal, repo_catalog, c)
    assert out.intent == "music.volume"
    assert out.confidence == pytest.approx(0.8, abs=1e-6)  # 0.08 of the 0.1 left
    assert out.evidence["kind_conflicts"][0]["intent"] == "light.set_brightness"
    same = drop_kind_conflicts(
        _decision("light.set_brightness"), repo_catalog, canon.canonicalize("dim the kitchen light to 20")
    )
    assert same.intent == "light.set_brightness" and "kind_conflicts" not in same.evidence


class _Fixed:
    """A ranker stand-in that always proposes the same decision (the real ranker is tested elsewhere)."""

    model_id = "fixed"
    thresholds: dict[str, float] = {}

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def decide(self, canonical: Any) -> Decision:
        return self.decision


def test_pipeline_does_not_accept_an_out_of_range_value(repo_catalog: Any, canon: Canonicalizer) -> None:
    pipe = Pipeline(
        repo_catalog, canon, regex=RegexStage(repo_catalog), ranker=_Fixed(_decision("light.set_brightness"))
    )
    res = pipe.parse("please make the kitchen light 250 percent bright", "en")
    assert res.decision.intent == "light.set_brightness"
    assert res.decision.outcome is Outcome.ABSTAIN and res.decision.reason == "invalid_slot_value"
    assert res.invalid_slots == ("level",)


def test_pipeline_never_turns_tv_volume_into_brightness(repo_catalog: Any, canon: Canonicalizer) -> None:
    proposal = _decision("light.set_brightness", 0.93, (Candidate("music.volume", 0.06),))
    pipe = Pipeline(repo_catalog, canon, regex=RegexStage(repo_catalog), ranker=_Fixed(proposal))
    res = pipe.parse("set the TV volume to 50", "en")
    assert res.decision.intent != "light.set_brightness"


def test_bridge_event_carries_missing_slots() -> None:
    from adaos_bridge import events
    from adaos_bridge.client import ServiceReply
    from adaos_bridge.gates import Verdict
    from adaos_bridge.intake import IntentRequest

    req = IntentRequest(text="turn it on", webspace_id="desktop", request_id="r1")
    raw = {"top_intent": "device.turn_on", "confidence": 0.9, "slots": {}, "missing_slots": ["device"]}
    reply = ServiceReply(top_intent="device.turn_on", confidence=0.9, raw=raw)
    verdict = Verdict(status="accept", reason="", trace_status="hit", intent="device.turn_on", confidence=0.9)
    assert events.detected(req, reply, verdict)["missing_slots"] == ["device"]
    full = ServiceReply(top_intent="device.turn_on", confidence=0.9, raw={**raw, "missing_slots": []})
    assert "missing_slots" not in events.detected(req, full, verdict)


def test_eval_gold_counts_unmarked_registry_names(repo_catalog: Any, canon: Canonicalizer) -> None:
    from tools.eval import unmarked_entity_spans  # noqa: PLC0415

    c = canon.canonicalize("перейди на сценарий вечер", "ru")
    gold = unmarked_entity_spans(repo_catalog, "desktop.switch_scenario", c, [])
    assert [(g["slot"], g["text"]) for g in gold] == [("scenario_id", "вечер")]
    # A slot the row marks, or text inside a marked span, is the markup's, not canonicalization's.
    marked = [{"slot": "scenario_id", "text": "сценарий вечер"}]
    assert unmarked_entity_spans(repo_catalog, "desktop.switch_scenario", c, marked) == []
    calc = canon.canonicalize("what is 15 percent of 200", "en")
    nums = unmarked_entity_spans(repo_catalog, "calculator.compute", calc, [])
    assert [g["text"] for g in nums] == ["15", "200"]  # a multiple slot: every value
