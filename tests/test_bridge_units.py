"""Unit tables for the bridge: intake, dedup, gates, breaker, redaction, queue, config, the AdaOS bus."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adaos_bridge.bus import BusEvent
from adaos_bridge.bus_adaos import AdaosBus
from adaos_bridge.client import CallFailed, CircuitBreaker, ServiceReply
from adaos_bridge.config import ConfigError, load_bridge_config
from adaos_bridge.gates import Status, Thresholds, judge, judge_failure
from adaos_bridge.intake import Deduper, parse_body, parse_request
from adaos_bridge.misses import Redactor, idempotency_key
from adaos_bridge.queue import QueueLocked, SqliteQueue
from adaos_bridge.stats import canonicalization_bucket, confidence_band


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"text": " hi ", "request_id": "r"}, ("hi", "desktop", "r", None, ())),
        ({"utterance": "hi", "workspace_id": "w"}, ("hi", "w", None, None, ())),
        ({"text": "hi", "_meta": {"webspace_id": "m", "locale": "ru"}}, ("hi", "m", None, "ru", ())),
        ({"text": "hi", "webspace_id": "a", "_meta": {"webspace_id": "b"}}, ("hi", "a", None, None, ())),
        (
            {"text": "hi", "request_locale": "en-US", "preferred_locales": "ru, en,,ru"},
            ("hi", "desktop", None, "en-US", ("ru", "en")),
        ),
        (
            {"text": "hi", "_meta": {"preferred_locales": ["en", "", "ru"]}},
            ("hi", "desktop", None, None, ("en", "ru")),
        ),
        ({"text": "hi", "locale": "ru", "request_locale": "en"}, ("hi", "desktop", None, "ru", ())),
    ],
)
def test_parse_request_variants(payload: dict[str, Any], expected: tuple[Any, ...]) -> None:
    req = parse_request(payload)
    assert req is not None
    text, webspace, rid, locale, prefs = expected
    assert (req.text, req.webspace_id, req.locale, req.preferred_locales) == (text, webspace, locale, prefs)
    if rid is None:
        assert req.request_id_synthesized and req.request_id.startswith("nlu-")
    else:
        assert req.request_id == rid and not req.request_id_synthesized


@pytest.mark.parametrize("payload", [{}, {"text": ""}, {"text": "   "}, {"text": 5}, {"utterance": None}])
def test_parse_request_without_text(payload: dict[str, Any]) -> None:
    assert parse_request(payload) is None


def test_parse_body_carries_hub_entities() -> None:
    ents = {"normalized_text": "turn off the lamp", "resolved_entities": []}
    req = parse_request({"text": "Turn off the lamp", "entities": ents, "request_id": "r"})
    assert req is not None
    assert parse_body(req) == {
        "text": "Turn off the lamp",
        "webspace_id": "desktop",
        "request_id": "r",
        "entities": ents,
        "canonicalized_text": "turn off the lamp",
    }


def test_dedup_window() -> None:
    now = [0.0]
    d = Deduper(60.0, clock=lambda: now[0])
    assert d.seen("a") is False and d.seen("a") is True
    now[0] = 59.9
    assert d.seen("a") is True
    now[0] = 120.0
    assert d.seen("a") is False  # the window is over: a new request
    assert d.seen("b") is False


TH = Thresholds(0.80, 0.45)


@pytest.mark.parametrize(
    ("reply", "status", "reason", "trace", "intent"),
    [
        (ServiceReply("a.b", 0.95, decision="accept"), Status.ACCEPTED, "neural_accepted", "hit", "a.b"),
        (ServiceReply("a.b", 0.80, decision="accept"), Status.ACCEPTED, "neural_accepted", "hit", "a.b"),
        (
            ServiceReply("a.b", 0.79, decision="accept"),
            Status.LOW_CONFIDENCE,
            "neural_low_confidence",
            "miss",
            "a.b",
        ),
        (
            ServiceReply("a.b", 0.45, decision="accept"),
            Status.LOW_CONFIDENCE,
            "neural_low_confidence",
            "miss",
            "a.b",
        ),
        (ServiceReply("a.b", 0.44, decision="accept"), Status.REJECTED, "neural_rejected", "reject", "a.b"),
        (ServiceReply("a.b", 0.99, decision="reject"), Status.REJECTED, "neural_rejected", "reject", "a.b"),
        (ServiceReply("a.b", 0.99, decision="abstain"), Status.ABSTAINED, "neural_abstained", "miss", "a.b"),
        (
            ServiceReply("", 0.0, decision="abstain", alternatives=[{"intent": "c.d", "confidence": 0.9}]),
            Status.ABSTAINED,
            "neural_abstained",
            "miss",
            "c.d",
        ),
        (
            ServiceReply("", 0.0, decision="abstain", evidence={"ambiguities": [{"text": "x"}]}),
            Status.ABSTAINED,
            "neural_abstained",
            "ambiguous",
            None,
        ),
        (ServiceReply("a.b", 0.99, decision="error"), Status.ERROR, "neural_parse_failed", "miss", None),
        (
            ServiceReply("a.b", 0.99, decision="something_new"),
            Status.ABSTAINED,
            "neural_abstained",
            "miss",
            "a.b",
        ),
        (ServiceReply("a.b", 0.99, decision=None), Status.ACCEPTED, "neural_accepted", "hit", "a.b"),
        (ServiceReply("", 0.99, decision="accept"), Status.ABSTAINED, "neural_abstained", "miss", None),
    ],
)
def test_judge(reply: ServiceReply, status: Status, reason: str, trace: str, intent: str | None) -> None:
    v = judge(reply, TH)
    assert (v.status, v.reason, v.trace_status, v.intent) == (status, reason, trace, intent)
    assert v.accepted == (status is Status.ACCEPTED)
    assert v.teachable == (status in (Status.LOW_CONFIDENCE, Status.REJECTED, Status.ABSTAINED))


@pytest.mark.parametrize(
    ("failure", "reason", "error"),
    [
        (CallFailed("timeout"), "neural_parse_failed", "timeout"),
        (CallFailed("circuit_open"), "neural_parse_failed", "circuit_open"),
        (CallFailed("bad_request", code="text_too_long"), "neural_parse_failed", "bad_request:text_too_long"),
        (
            CallFailed("bad_request", code="unsupported_locale"),
            "neural_unsupported_locale",
            "bad_request:unsupported_locale",
        ),
    ],
)
def test_judge_failure(failure: CallFailed, reason: str, error: str) -> None:
    v = judge_failure(failure)
    assert (v.status, v.reason, v.error, v.teachable, v.accepted) == (
        Status.ERROR,
        reason,
        error,
        False,
        False,
    )


def test_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=2, reset_s=5.0, clock=lambda: now[0])
    assert b.allow()
    b.failure()
    assert b.allow() and b.state.value == "closed"
    b.failure()
    assert b.state.value == "open" and not b.allow() and b.opens == 1
    now[0] = 5.1
    assert b.allow() and b.state.value == "half_open"
    assert not b.allow()  # one trial at a time
    b.failure()  # the trial failed: open again at once
    assert b.state.value == "open" and not b.allow() and b.opens == 2
    now[0] = 10.2
    assert b.allow()
    b.success()
    assert b.state.value == "closed" and b.allow() and b.consecutive == 0


@pytest.mark.parametrize(
    ("digits", "names", "spans", "text", "expected"),
    [
        (True, False, [], "будильник на 7:30 и 15", "будильник на #:## и ##"),
        (False, True, [("свет на кухне", "device")], "Выключи свет на кухне", "Выключи {device}"),
        (False, True, [], "open Marketplace now", "open {app} now"),
        (True, True, [("лампа", "device")], "лампа 2 и лампами", "{device} # и лампами"),
        (False, False, [("лампа", "device")], "лампа 2", "лампа 2"),
    ],
)
def test_redaction(digits: bool, names: bool, spans: list[tuple[str, str]], text: str, expected: str) -> None:
    r = Redactor(digits=digits, names=names, registry=[("marketplace", "app")])
    assert r.redact(text, spans) == expected


def test_idempotency_key_is_stable_and_text_bound() -> None:
    assert idempotency_key("r1", "a") == idempotency_key("r1", "a")
    assert idempotency_key("r1", "a") != idempotency_key("r1", "b") != idempotency_key("r2", "b")


@pytest.mark.parametrize(
    ("conf", "band"),
    [(None, None), (0.0, "0.00-0.24"), (0.3, "0.25-0.44"), (0.45, "0.45-0.79"), (0.8, "0.80-1.00")],
)
def test_confidence_bands(conf: float | None, band: str | None) -> None:
    assert confidence_band(conf) == band


@pytest.mark.parametrize(
    ("evidence", "hub", "bucket"),
    [
        ({"entities": [{"ref": "x"}]}, None, "hit"),
        ({"entities": []}, None, "miss"),
        ({"entities": [{"ref": "x"}], "ambiguities": [{"text": "t"}]}, None, "ambiguity"),
        ({}, {"unresolved_entity_spans": ["lamp"]}, "unresolved"),
    ],
)
def test_canonicalization_bucket(evidence: dict[str, Any], hub: dict[str, Any] | None, bucket: str) -> None:
    req = parse_request({"text": "t", "entities": hub} if hub else {"text": "t"})
    assert req is not None
    assert canonicalization_bucket(ServiceReply(evidence=evidence), req) == bucket


async def test_queue_bound_duplicates_and_persistence(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q.sqlite3", max_items=3)
    await q.open()
    for i in range(5):
        assert await q.put(f"k{i}", {"i": i})
    assert await q.put("k4", {"i": 4}) is False
    assert q.pending == 3
    rows = await q.due(10)
    assert [r.key for r in rows] == ["k2", "k3", "k4"]  # the oldest were dropped
    await q.ack([rows[0].id])
    await q.retry_later(rows[1].id, 60.0, "HTTP 503")
    assert [r.key for r in await q.due(10)] == ["k4"]
    assert await q.next_due_in() == 0.0
    with pytest.raises(QueueLocked):
        await SqliteQueue(tmp_path / "q.sqlite3").open()
    await q.close()
    assert sqlite3.connect(tmp_path / "q.sqlite3").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = SqliteQueue(tmp_path / "q.sqlite3", max_items=3)
    await again.open()
    stats = await again.stats()
    assert stats == {
        "enqueued": 5,
        "duplicates": 1,
        "delivered": 1,
        "dropped_overflow": 2,
        "dropped_refused": 0,
        "pending": 2,
    }
    await again.close()


def test_config_reads_the_hub_variables(tmp_path: Path) -> None:
    env = {
        "ADAOS_NLU_NEURAL_TIMEOUT_S": "2.5",
        "ADAOS_NLU_NEURAL_ACCEPT_CONFIDENCE": "0.9",
        "ADAOS_NLU_NEURAL_REJECT_CONFIDENCE": "0.3",
        "ADAOS_NLU_RASA": "0",
        "ADAOS_STATE_DIR": str(tmp_path),
    }
    cfg = load_bridge_config(env=env)
    assert (cfg.timeout_s, cfg.accept_confidence, cfg.reject_confidence, cfg.rasa_fallback) == (
        2.5,
        0.9,
        0.3,
        False,
    )
    assert cfg.state_dir == str(tmp_path / "nlu" / "bridge")
    assert (
        cfg.resolved_overlay() == tmp_path / "nlu" / "bridge" / "teacher_catalog" / "intents" / "teacher.yaml"
    )
    default = load_bridge_config(env={"ADAOS_STATE_DIR": str(tmp_path)})
    assert (default.timeout_s, default.accept_confidence, default.reject_confidence) == (6.0, 0.80, 0.45)
    with pytest.raises(ConfigError):
        load_bridge_config(env={"ADAOS_NLU_NEURAL_ACCEPT_CONFIDENCE": "1.5"})
    with pytest.raises(ConfigError):
        load_bridge_config(env={"ADAOS_NLU_NEURAL_TIMEOUT_S": "soon"})


# --- the AdaOS adapter against a fake `adaos` package implementing the documented API -----------------


@dataclass
class FakeEvent:
    """adaos.domain.Event(type, payload, source, ts)."""

    type: str
    payload: dict[str, Any]
    source: str
    ts: float


@dataclass
class FakeLocalEventBus:
    """LocalEventBus: subscribe(type_prefix, handler), publish(Event); async handlers become tasks."""

    subs: list[tuple[str, Any]] = field(default_factory=list)
    published: list[FakeEvent] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def subscribe(self, type_prefix: str, handler: Any) -> None:
        self.subs.append((type_prefix, handler))

    def publish(self, event: FakeEvent) -> None:
        self.published.append(event)
        for prefix, handler in self.subs:
            if prefix in ("", "*") or event.type.startswith(prefix):
                res = handler(event)
                if asyncio.iscoroutine(res):
                    self.tasks.append(asyncio.get_running_loop().create_task(res))


@pytest.fixture
def fake_adaos(monkeypatch: pytest.MonkeyPatch) -> FakeLocalEventBus:
    bus = FakeLocalEventBus()
    emitted: list[str] = []

    def emit(bus_: FakeLocalEventBus, type_: str, payload: dict[str, Any], source: str) -> None:
        emitted.append(type_)
        meta = dict(payload.get("_meta") or {})
        meta["event"] = type_
        bus_.publish(FakeEvent(type_, {**payload, "_meta": meta}, source, time.time()))

    eventbus = types.ModuleType("adaos.services.eventbus")
    eventbus.LocalEventBus = FakeLocalEventBus  # type: ignore[attr-defined]
    eventbus.emit = emit  # type: ignore[attr-defined]
    agent_context = types.ModuleType("adaos.services.agent_context")
    agent_context.get_ctx = lambda: types.SimpleNamespace(bus=bus)  # type: ignore[attr-defined]
    domain = types.ModuleType("adaos.domain")
    domain.Event = FakeEvent  # type: ignore[attr-defined]
    for name, mod in {
        "adaos": types.ModuleType("adaos"),
        "adaos.services": types.ModuleType("adaos.services"),
        "adaos.services.eventbus": eventbus,
        "adaos.services.agent_context": agent_context,
        "adaos.domain": domain,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    bus.emitted = emitted  # type: ignore[attr-defined]
    return bus


async def test_adaos_adapter_subscribes_and_emits(fake_adaos: FakeLocalEventBus) -> None:
    adapter = AdaosBus.from_adaos(source="nlu.neural")
    got: list[BusEvent] = []

    async def handler(event: BusEvent) -> None:
        got.append(event)

    await adapter.subscribe("nlp.intent.detect.neural", handler)
    fake_adaos.publish(FakeEvent("nlp.intent.detect.neural", {"text": "hi"}, "hub", 1.0))
    fake_adaos.publish(FakeEvent("nlp.intent.detect.rasa", {"text": "no"}, "hub", 1.0))
    await asyncio.gather(*fake_adaos.tasks)
    assert [(e.type, e.payload, e.source) for e in got] == [
        ("nlp.intent.detect.neural", {"text": "hi"}, "hub")
    ]
    await adapter.publish("nlp.intent.detected", {"intent": "a.b", "_meta": {"trace": 1}})
    out = fake_adaos.published[-1]
    assert (out.type, out.source) == ("nlp.intent.detected", "nlu.neural")
    assert out.payload["_meta"] == {"trace": 1, "event": "nlp.intent.detected"}
    assert fake_adaos.emitted == ["nlp.intent.detected"]  # type: ignore[attr-defined]


async def test_adaos_adapter_without_emit_marks_meta_itself() -> None:
    bus = FakeLocalEventBus()
    adapter = AdaosBus(bus, event_cls=FakeEvent, source="nlu.neural")
    await adapter.publish("nlu.trace.stage", {"stage": "neural"})
    assert bus.published[0].payload == {"stage": "neural", "_meta": {"event": "nlu.trace.stage"}}
