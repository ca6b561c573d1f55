"""The bridge end to end on loopback: the real service, an in-memory bus, the gates, the events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from adaos_bridge.bridge import Bridge
from adaos_bridge.bus import InMemoryBus, Recorder
from adaos_bridge.config import BridgeConfig, load_bridge_config
from adaos_bridge.misses import idempotency_key
from skill.config import load_config
from tests.conftest import write_catalog
from tests.test_bridge_support import FakeTeacher, ServiceThread, free_port, wait_until

CONTRACT_DETECTED = {
    "intent",
    "confidence",
    "slots",
    "text",
    "webspace_id",
    "request_id",
    "via",
    "_raw",
    "_meta",
}
OUT = ("nlp.intent.detected", "nlp.intent.detect.rasa", "nlp.intent.not_obtained", "nlu.trace.stage")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceThread]:
    """The regex-only service on the mini catalog (no model: unknown text abstains)."""
    root = tmp_path_factory.mktemp("svc")
    cfg = load_config(
        env={},
        overrides={
            "catalog_dir": str(write_catalog(root / "catalog")),
            "models_dir": str(root / "node-models"),
            "embedded_models_dir": str(root / "no-models"),
            "watch_pointer": False,
        },
    )
    svc = ServiceThread(cfg).start()
    yield svc
    svc.stop()


def bridge_config(tmp_path: Path, url: str, **overrides: Any) -> BridgeConfig:
    """A bridge config isolated from the environment, state in tmp_path."""
    values: dict[str, Any] = {
        "service_url": url,
        "state_dir": str(tmp_path / "bridge"),
        "stats_flush_s": 0.05,
    }
    values.update(overrides)
    return load_bridge_config(env={}, overrides=values)


class Harness:
    """A bridge on an in-memory bus with a recorder on every outgoing event type."""

    def __init__(self, bridge: Bridge, bus: InMemoryBus, rec: Recorder) -> None:
        self.bridge, self.bus, self.rec = bridge, bus, rec

    async def ask(self, payload: dict[str, Any], type_: str = "nlp.intent.detect.neural") -> None:
        self.bus.publish_nowait(type_, payload, source="hub")
        assert await self.bus.wait_idle(15)

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [e.payload for e in self.rec.of(type_)]


async def make_harness(config: BridgeConfig, **kwargs: Any) -> Harness:
    bus = InMemoryBus()
    rec = Recorder()
    for t in OUT:
        await bus.subscribe(t, rec)
    bridge = Bridge(config, bus, **kwargs)
    await bridge.start()
    return Harness(bridge, bus, rec)


@pytest.fixture
async def harness(tmp_path: Path, service: ServiceThread) -> AsyncIterator[Harness]:
    h = await make_harness(bridge_config(tmp_path, service.url))
    yield h
    await h.bridge.close()


async def test_accepted_request_yields_exactly_one_detected(harness: Harness) -> None:
    await harness.ask(
        {
            "text": "Поставь будильник на 7:30",
            "request_id": "r-acc",
            "webspace_id": "ws1",
            "_meta": {"trace": "t1"},
        }
    )
    detected = harness.of("nlp.intent.detected")
    assert len(detected) == 1
    out = detected[0]
    assert set(out) == CONTRACT_DETECTED
    assert out["intent"] == "alarm.set" and out["confidence"] == 1.0
    assert out["slots"] == {"time": "07:30"}
    assert (out["text"], out["webspace_id"], out["request_id"]) == (
        "Поставь будильник на 7:30",
        "ws1",
        "r-acc",
    )
    assert out["via"] == "regex"  # the stage that decided, as the service says
    assert {"top_intent", "alternatives", "model_id", "evidence", "decision"} <= set(out["_raw"])
    assert out["_meta"]["trace"] == "t1" and out["_meta"]["event"] == "nlp.intent.detected"
    assert harness.of("nlp.intent.detect.rasa") == [] and harness.of("nlp.intent.not_obtained") == []
    (trace,) = harness.of("nlu.trace.stage")
    assert trace["status"] == "hit" and trace["intent"] == "alarm.set" and trace["stage"] == "neural"
    assert harness.bridge.queue.pending == 0


async def test_uncertain_request_falls_back_to_rasa_and_queues_the_miss(harness: Harness) -> None:
    await harness.ask(
        {"utterance": "расскажи что-нибудь интересное", "request_id": "r-unc", "_meta": {"k": 1}}
    )
    assert harness.of("nlp.intent.detected") == []
    (rasa,) = harness.of("nlp.intent.detect.rasa")
    assert rasa["_meta"]["neural_fallback"] is True
    assert rasa["_meta"]["neural_fallback_reason"] == "neural_abstained"
    assert rasa["_meta"]["k"] == 1 and "nlu_pipeline" in rasa["_meta"]
    assert (rasa["text"], rasa["webspace_id"], rasa["request_id"]) == (
        "расскажи что-нибудь интересное",
        "desktop",
        "r-unc",
    )
    (trace,) = harness.of("nlu.trace.stage")
    assert (trace["status"], trace["reason"]) == ("miss", "neural_abstained")
    rows = await harness.bridge.queue.due(10)
    assert [r.key for r in rows] == [idempotency_key("r-unc", "расскажи что-нибудь интересное")]
    assert (
        rows[0].body["reason"] == "neural_abstained" and rows[0].body["service_reason"] == "model_not_loaded"
    )


async def test_fallback_disabled_emits_not_obtained(tmp_path: Path, service: ServiceThread) -> None:
    h = await make_harness(bridge_config(tmp_path, service.url, rasa_fallback=False))
    try:
        await h.ask({"text": "что-то совсем непонятное", "request_id": "r-no"})
        (miss,) = h.of("nlp.intent.not_obtained")
        assert set(miss) == {"reason", "text", "via", "webspace_id", "request_id", "_meta"}
        assert (miss["reason"], miss["via"], miss["request_id"]) == ("neural_abstained", "neural", "r-no")
        assert h.of("nlp.intent.detect.rasa") == []
        statuses = {(t["stage"], t["status"]) for t in h.of("nlu.trace.stage")}
        assert statuses == {("neural", "miss"), ("rasa", "skipped")}
    finally:
        await h.bridge.close()


async def test_duplicates_within_the_window_are_dropped(harness: Harness) -> None:
    for _ in range(3):
        await harness.ask({"text": "поставь будильник на 7:30", "request_id": "dup-1"})
    await harness.ask({"text": "поставь будильник на 7:30", "request_id": "dup-2"})
    await harness.ask({"text": "поставь будильник на 7:30"})  # no id: synthesised, never a duplicate
    await harness.ask({"text": "поставь будильник на 7:30"})
    ids = [d["request_id"] for d in harness.of("nlp.intent.detected")]
    assert ids[:2] == ["dup-1", "dup-2"] and len(ids) == 4 and len(set(ids)) == 4
    assert harness.bridge.stats.data["bridge"]["duplicates_dropped"] == 2


async def test_standalone_takes_detect_request(tmp_path: Path, service: ServiceThread) -> None:
    h = await make_harness(bridge_config(tmp_path, service.url, standalone=True))
    try:
        await h.ask({"text": "turn off the kitchen light", "request_id": "s1"}, "nlp.intent.detect.request")
        await h.ask(
            {"text": "turn off the kitchen light", "request_id": "s1"}
        )  # the same request via the hub
        (out,) = h.of("nlp.intent.detected")
        assert out["intent"] == "device.turn_off" and out["slots"] == {
            "device": "device:light:kitchen_ceiling"
        }
    finally:
        await h.bridge.close()


async def test_usage_statistics_file(tmp_path: Path, harness: Harness) -> None:
    await harness.ask({"text": "поставь будильник на 7:30", "request_id": "u1"})
    await harness.ask({"text": "непонятная фраза", "request_id": "u2"})
    await harness.bridge.stats.flush()
    data = json.loads(harness.bridge.config.resolved_stats().read_text())
    assert data["schema_version"] == 1
    assert data["totals"] == {"requests": 2, "fallback_to_rasa": 1, "fallback_ratio": 0.5}
    assert data["by_status"] == {"accepted": 1, "abstained": 1}
    assert data["by_reason"] == {"neural_accepted": 1, "neural_abstained": 1}
    assert data["by_intent"] == {"alarm.set": {"accepted": 1}}
    assert data["confidence_bands"] == {"0.80-1.00": 1, "0.00-0.24": 1}
    assert set(data["canonicalization"]) <= {"hit", "miss", "ambiguity", "unresolved"}
    assert data["canonicalization"].get("hit") == 1  # {time} was canonicalized
    assert data["latency_ms"]["count"] == 2 and data["latency_ms"]["min"] <= data["latency_ms"]["max"]
    assert [r["request_id"] for r in data["recent"]] == ["u1", "u2"]
    assert [s["text"] for s in data["review_samples"]] == ["непонятная фраза"]
    assert data["bridge"]["by_intent_decision"] == {"alarm.set": {"accept": 1}}
    assert data["bridge"]["by_model"] == {"none": 2}


# --- a scripted service: every gate outcome, hung and dead services ---------------------------------


class ScriptedService:
    """Answers /parse from a table keyed by text; records the bodies it got."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        self.bodies: list[dict[str, Any]] = []
        self.delay_s = 0.0
        self.status = 200

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.json_response(
                {"ok": False, "error": "not_ready", "message": "x", "field": None}, status=self.status
            )
        result = {
            "top_intent": "",
            "confidence": 0.0,
            "alternatives": [],
            "slots": {},
            "via": "neural",
            "model_id": "m1",
            "evidence": {},
            "decision": "abstain",
            "reason": None,
            "locale": "ru",
            "stages": [],
        }
        result.update(self.answers.get(body["text"], {}))
        result = {k: v for k, v in result.items() if v != "<absent>"}
        return web.json_response({"ok": True, **result, "result": result})


@pytest.fixture
async def scripted(aiohttp_server: Any) -> tuple[ScriptedService, str]:
    svc = ScriptedService()
    app = web.Application()
    app.router.add_post("/parse", svc.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    return svc, f"http://127.0.0.1:{server.port}"


@pytest.mark.parametrize(
    ("answer", "event", "reason"),
    [
        ({"top_intent": "alarm.set", "confidence": 0.91, "decision": "accept"}, "nlp.intent.detected", None),
        ({"top_intent": "alarm.set", "confidence": 0.80, "decision": "accept"}, "nlp.intent.detected", None),
        (
            {"top_intent": "alarm.set", "confidence": 0.85, "decision": "<absent>"},
            "nlp.intent.detected",
            None,
        ),
        (
            {"top_intent": "alarm.set", "confidence": 0.6, "decision": "accept"},
            "nlp.intent.detect.rasa",
            "neural_low_confidence",
        ),
        (
            {"top_intent": "alarm.set", "confidence": 0.3, "decision": "accept"},
            "nlp.intent.detect.rasa",
            "neural_rejected",
        ),
        (
            {"top_intent": "alarm.set", "confidence": 0.95, "decision": "reject"},
            "nlp.intent.detect.rasa",
            "neural_rejected",
        ),
        (
            {"top_intent": "alarm.set", "confidence": 0.95, "decision": "abstain"},
            "nlp.intent.detect.rasa",
            "neural_abstained",
        ),
        (
            {
                "top_intent": "",
                "confidence": 0.0,
                "decision": "abstain",
                "alternatives": [{"intent": "alarm.set", "confidence": 0.93}],
            },
            "nlp.intent.detect.rasa",
            "neural_abstained",
        ),
    ],
)
async def test_gates(
    tmp_path: Path,
    scripted: tuple[ScriptedService, str],
    answer: dict[str, Any],
    event: str,
    reason: str | None,
) -> None:
    svc, url = scripted
    svc.answers["x"] = answer
    h = await make_harness(bridge_config(tmp_path, url))
    try:
        await h.ask({"text": "x", "request_id": "g1"})
        outs = [e.type for e in h.rec.events if e.type != "nlu.trace.stage"]
        assert outs == [event]
        if reason is not None:
            assert h.of(event)[0]["_meta"]["neural_fallback_reason"] == reason
            assert h.bridge.queue.pending == 1  # every teachable miss is queued
        else:
            assert h.of(event)[0]["via"] == "neural" and h.bridge.queue.pending == 0
    finally:
        await h.bridge.close()


async def test_request_fields_reach_the_service(
    tmp_path: Path, scripted: tuple[ScriptedService, str]
) -> None:
    svc, url = scripted
    h = await make_harness(bridge_config(tmp_path, url))
    try:
        await h.ask(
            {
                "utterance": "a",
                "workspace_id": "kitchen",
                "_meta": {"locale": "en-US"},
                "preferred_locales": "ru, en",
                "request_id": "f1",
            }
        )
        await h.ask(
            {"text": "b", "_meta": {"webspace_id": "ws9"}, "request_locale": "ru", "request_id": "f2"}
        )
        first, second = svc.bodies
        assert first == {
            "text": "a",
            "webspace_id": "kitchen",
            "request_id": "f1",
            "locale": "en-US",
            "preferred_locales": ["ru", "en"],
        }
        assert second["webspace_id"] == "ws9" and second["locale"] == "ru"
        rasa = h.of("nlp.intent.detect.rasa")
        assert [r["webspace_id"] for r in rasa] == ["kitchen", "ws9"]
        assert rasa[0]["preferred_locales"] == ["ru", "en"] and rasa[1]["request_locale"] == "ru"
    finally:
        await h.bridge.close()


async def test_hung_service_falls_back_within_the_timeout(
    tmp_path: Path, scripted: tuple[ScriptedService, str]
) -> None:
    svc, url = scripted
    svc.delay_s = 3.0
    h = await make_harness(bridge_config(tmp_path, url, timeout_s=0.4))
    try:
        started = time.monotonic()
        await h.ask({"text": "x", "request_id": "t1"})
        assert time.monotonic() - started < 1.2
        (rasa,) = h.of("nlp.intent.detect.rasa")
        assert rasa["_meta"]["neural_fallback_reason"] == "neural_parse_failed"
        assert rasa["_meta"]["neural_error"] == "timeout"
        assert h.bridge.queue.pending == 0  # an outage is not a lesson for the teacher
    finally:
        await h.bridge.close()


async def test_stopped_service_fails_fast_and_opens_the_breaker(
    tmp_path: Path, service: ServiceThread
) -> None:
    root = tmp_path / "own"
    cfg = load_config(
        env={},
        overrides={
            "catalog_dir": str(write_catalog(root / "catalog")),
            "models_dir": str(root / "m"),
            "embedded_models_dir": str(root / "e"),
        },
    )
    own = ServiceThread(cfg).start()
    h = await make_harness(
        bridge_config(tmp_path, own.url, timeout_s=1.0, breaker_failures=3, breaker_reset_s=0.5)
    )
    try:
        await h.ask({"text": "поставь будильник на 7:30", "request_id": "before"})
        assert len(h.of("nlp.intent.detected")) == 1
        port = own.port
        own.stop()
        for i in range(6):
            started = time.monotonic()
            await h.ask({"text": "поставь будильник на 7:30", "request_id": f"down-{i}"})
            assert time.monotonic() - started < 1.0  # never longer than the timeout
        rasa = h.of("nlp.intent.detect.rasa")
        assert len(rasa) == 6 and len(h.of("nlp.intent.detected")) == 1
        errors = [r["_meta"]["neural_error"] for r in rasa]
        assert errors[:3] == ["connection"] * 3 and errors[3:] == ["circuit_open"] * 3
        assert {r["_meta"]["neural_fallback_reason"] for r in rasa} == {"neural_parse_failed"}
        assert h.bridge.client.breaker.state.value == "open"
        # The service comes back on the same port: after reset_s one trial call closes the breaker.
        back = ServiceThread(cfg).start(port)
        try:
            await asyncio.sleep(0.6)
            await h.ask({"text": "поставь будильник на 7:30", "request_id": "after"})
            assert [d["request_id"] for d in h.of("nlp.intent.detected")] == ["before", "after"]
            assert h.bridge.client.breaker.state.value == "closed"
        finally:
            back.stop()
        assert h.bridge.stats.data["bridge"]["breaker_opens"] == 1
    finally:
        await h.bridge.close()


async def test_service_503_counts_for_the_breaker(
    tmp_path: Path, scripted: tuple[ScriptedService, str]
) -> None:
    svc, url = scripted
    svc.status = 503
    h = await make_harness(bridge_config(tmp_path, url, breaker_failures=2))
    try:
        for i in range(3):
            await h.ask({"text": "x", "request_id": f"n{i}"})
        errors = [r["_meta"]["neural_error"] for r in h.of("nlp.intent.detect.rasa")]
        assert errors == ["http_error:not_ready", "http_error:not_ready", "circuit_open"]
        assert len(svc.bodies) == 2
    finally:
        await h.bridge.close()


async def test_misses_reach_the_teacher_once_per_key(tmp_path: Path, service: ServiceThread) -> None:
    teacher = await FakeTeacher().start()
    teacher.status = 503  # down at first: the misses wait in the queue
    cfg = bridge_config(
        tmp_path,
        service.url,
        teacher_url=teacher.url,
        teacher_token=teacher.token,
        delivery_backoff_s=0.05,
        delivery_backoff_max_s=0.2,
    )
    h = await make_harness(cfg)
    try:
        texts = [f"непонятная фраза номер {i}" for i in range(5)]
        for i, text in enumerate(texts):
            await h.ask({"text": text, "request_id": f"m{i}"})
        await h.ask({"text": "поставь будильник на 7:30", "request_id": "hit"})  # accepted: not a miss
        await asyncio.sleep(0.3)
        assert teacher.deliveries == [] and h.bridge.queue.pending == 5
        teacher.status = 200
        assert await wait_until(lambda: len(teacher.deliveries) == 5, timeout=10)
        await asyncio.sleep(0.2)
        expected = {idempotency_key(f"m{i}", t) for i, t in enumerate(texts)}
        assert sorted(teacher.keys()) == sorted(expected)
        assert all(body["idempotency_key"] == key for key, body in teacher.deliveries)
        assert {body["text"] for _, body in teacher.deliveries} == set(texts)
        stats = await h.bridge.queue.stats()
        assert stats["delivered"] == 5 and stats["pending"] == 0
    finally:
        await h.bridge.close()
        await teacher.stop()


async def test_refused_misses_are_dropped_and_counted(tmp_path: Path, service: ServiceThread) -> None:
    teacher = await FakeTeacher().start()
    teacher.status = 422
    cfg = bridge_config(tmp_path, service.url, teacher_url=teacher.url, teacher_token=teacher.token)
    h = await make_harness(cfg)
    try:
        await h.ask({"text": "непонятно", "request_id": "bad"})
        assert await wait_until(lambda: h.bridge.queue.pending == 0, timeout=5)
        assert (await h.bridge.queue.stats())["dropped_refused"] == 1
    finally:
        await h.bridge.close()
        await teacher.stop()


async def test_redaction_before_queueing(tmp_path: Path, service: ServiceThread) -> None:
    cfg = bridge_config(
        tmp_path,
        service.url,
        redact_digits=True,
        redact_names=True,
        catalog_dir=str(Path(__file__).resolve().parent.parent / "catalog"),
    )
    h = await make_harness(cfg)
    try:
        await h.ask({"text": "сделай что-то с кухонный свет в 7 часов 15 минут", "request_id": "red"})
        (row,) = await h.bridge.queue.due(1)
        assert row.body["redacted"] is True
        assert "7" not in row.body["text"] and "15" not in row.body["text"]
        assert "кухонный свет" not in row.body["text"] and "{device}" in row.body["text"]
    finally:
        await h.bridge.close()


async def test_teacher_examples_go_to_a_loadable_overlay(tmp_path: Path, service: ServiceThread) -> None:
    from skill.catalog import load_catalog

    overlay = tmp_path / "overlay" / "intents" / "teacher.yaml"
    h = await make_harness(bridge_config(tmp_path, service.url, overlay_path=str(overlay)))
    try:
        save = {
            "text": "разбуди меня пораньше",
            "intent": "alarm.set",
            "target": {"type": "skill", "id": "alarm"},
            "slots": {},
            "request_id": "r-miss",
        }
        for payload in (
            save,
            save,
            {"text": "wake me up early", "intent": "alarm.set"},
            {"text": "x", "intent": "Not An Intent"},
        ):
            h.bus.publish_nowait("nlp.teacher.example.save", payload)
            await h.bus.wait_idle()
        catalog = load_catalog(tmp_path / "overlay")
        assert catalog.owners["alarm.set"].type == "teacher" and catalog.owners["alarm.set"].id == "teacher"
        assert catalog.intents["alarm.set"].examples == {
            "ru": ["разбуди меня пораньше"],
            "en": ["wake me up early"],
        }
        marker = json.loads(h.bridge.config.resolved_marker().read_text())
        assert marker["reason"] == "teacher_examples" and marker["new_examples"] == 2
        assert marker["intents"] == ["alarm.set"] and marker["targets"] == [{"type": "skill", "id": "alarm"}]
        assert marker["overlay_path"] == str(overlay) and marker["examples_total"] == 2
        assert h.bridge.stats.data["bridge"]["feedback"] == {"saved": 2, "repeated": 1, "invalid": 1}
    finally:
        await h.bridge.close()


async def test_dead_port_without_breaker_history(tmp_path: Path) -> None:
    h = await make_harness(bridge_config(tmp_path, f"http://127.0.0.1:{free_port()}", timeout_s=2.0))
    try:
        started = time.monotonic()
        await h.ask({"text": "x", "request_id": "dead"})
        assert time.monotonic() - started < 1.0  # connection refused: retried with jitter, then fallback
        (rasa,) = h.of("nlp.intent.detect.rasa")
        assert rasa["_meta"]["neural_error"] == "connection"
    finally:
        await h.bridge.close()
