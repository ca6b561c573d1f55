"""The bridge and the conversation layer: one event per segment, fallbacks one by one, session_id through.

The real service (our catalog, the scripted ranker stage) on a loopback thread; the bridge on the
in-memory bus and on a real nats-server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from adaos_bridge.bridge import Bridge
from adaos_bridge.bus_nats import NatsBus
from adaos_bridge.config import load_bridge_config
from adaos_bridge.intake import parse_body, parse_request
from adaos_bridge.misses import idempotency_key
from skill.app import create_app
from skill.config import load_config
from tests.conversation_kit import scripted_state, write_conv_catalog
from tests.test_bridge_e2e import OUT, Harness, bridge_config, make_harness
from tests.test_bridge_support import NatsServer, ServiceThread, needs_nats, wait_until


class ScriptedService(ServiceThread):
    """The real app serving the scripted pipeline over our catalog."""

    async def _start(self, port: int) -> None:
        self.state = scripted_state(self.config)
        self.runner = web.AppRunner(create_app(self.state), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScriptedService]:
    root = tmp_path_factory.mktemp("conv-svc")
    cfg = load_config(
        env={},
        overrides={
            "catalog_dir": str(write_conv_catalog(root / "catalog")),
            "models_dir": str(root / "m"),
            "embedded_models_dir": str(root / "e"),
            "audit_dir": str(root / "logs"),
            "watch_pointer": False,
        },
    )
    svc = ScriptedService(cfg).start()
    yield svc
    svc.stop()


@pytest.fixture
async def harness(tmp_path: Path, service: ScriptedService) -> AsyncIterator[Harness]:
    h = await make_harness(bridge_config(tmp_path, service.url))
    yield h
    await h.bridge.close()


def test_session_id_is_read_and_sent() -> None:
    req = parse_request({"text": "а в спальне?", "_meta": {"session_id": " s-9 "}})
    assert req is not None and req.session_id == "s-9"
    assert parse_body(req)["session_id"] == "s-9"
    plain = parse_request({"text": "привет"})
    assert plain is not None and plain.session_id is None and "session_id" not in parse_body(plain)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("выключи свет на кухне и поставь будильник на 7:30", ["выключи свет на кухне", "поставь будильник на 7:30"]),  # noqa: E501
        ("turn off the kitchen light, then set an alarm for 7:30", ["turn off the kitchen light", "set an alarm for 7:30"]),  # noqa: E501
    ],
)  # fmt: skip
async def test_one_detected_event_per_accepted_segment(harness: Harness, text: str, parts: list[str]) -> None:
    await harness.ask({"text": text, "request_id": "m1", "session_id": "s1", "webspace_id": "ws"})
    detected = harness.of("nlp.intent.detected")
    assert [d["intent"] for d in detected] == ["device.turn_off", "alarm.set"]
    assert [d["segment_index"] for d in detected] == [0, 1]
    assert {d["request_id"] for d in detected} == {"m1"}  # shared
    assert [d["text"] for d in detected] == parts
    assert all(d["session_id"] == "s1" and d["webspace_id"] == "ws" for d in detected)
    assert [d["_meta"]["segments_total"] for d in detected] == [2, 2]
    assert detected[1]["slots"] == {"time": "07:30"} and detected[1]["_raw"]["segment_index"] == 1
    assert detected[1]["_raw"]["context"]["action"] == "start"
    assert harness.of("nlp.intent.detect.rasa") == []
    traces = harness.of("nlu.trace.stage")
    assert [(t["status"], t["segment_index"]) for t in traces] == [("hit", 0), ("hit", 1)]
    assert harness.bridge.stats.data["bridge"]["segmented_requests"] == 1
    assert harness.bridge.stats.data["totals"]["requests"] == 2  # the hub gets two requests


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
async def test_a_segment_that_abstains_goes_down_the_fallback_alone(
    harness: Harness, text: str, second: str
) -> None:
    await harness.ask({"text": text, "request_id": "m2", "_meta": {"trace": "t"}})
    (detected,) = harness.of("nlp.intent.detected")
    assert (detected["intent"], detected["segment_index"], detected["request_id"]) == (
        "device.turn_off",
        0,
        "m2",
    )
    (rasa,) = harness.of("nlp.intent.detect.rasa")
    assert rasa["text"] == second and rasa["request_id"] == "m2"
    assert rasa["segment_index"] == 1 and rasa["_meta"]["segment_index"] == 1
    assert rasa["_meta"]["neural_fallback"] is True and rasa["_meta"]["trace"] == "t"
    assert rasa["_meta"]["neural_fallback_reason"] == "neural_abstained"
    rows = await harness.bridge.queue.due(10)
    assert [r.key for r in rows] == [idempotency_key("m2", second)]  # the teacher gets the segment's words
    assert rows[0].body["text"] == second


async def test_not_obtained_per_segment_without_rasa(tmp_path: Path, service: ScriptedService) -> None:
    h = await make_harness(bridge_config(tmp_path, service.url, rasa_fallback=False))
    try:
        await h.ask({"text": "выключи свет на кухне и узнай погоду на даче", "request_id": "m3"})
        (miss,) = h.of("nlp.intent.not_obtained")
        assert (miss["text"], miss["segment_index"], miss["request_id"]) == ("узнай погоду на даче", 1, "m3")
        assert len(h.of("nlp.intent.detected")) == 1
    finally:
        await h.bridge.close()


async def test_session_follow_ups_on_the_bus(harness: Harness) -> None:
    await harness.ask({"text": "выключи свет на кухне", "request_id": "f1", "session_id": "bus-s"})
    await harness.ask({"text": "а в спальне?", "request_id": "f2", "session_id": "bus-s"})
    await harness.ask({"text": "а в спальне?", "request_id": "f3", "session_id": "other"})
    first, second = harness.of("nlp.intent.detected")
    assert second["intent"] == "device.turn_off" and second["slots"] == {
        "device": "device:light:bedroom_lamp"
    }
    assert second["session_id"] == "bus-s" and "segment_index" not in second
    assert second["_raw"]["context"] == {"action": "update", "refers_to": "f1", "resolution": "slot_update"}
    (miss,) = harness.of("nlp.intent.detect.rasa")  # the other session knows nothing of the kitchen
    assert miss["request_id"] == "f3" and miss["session_id"] == "other"


async def test_the_clarifying_question_rides_with_the_fallback(harness: Harness) -> None:
    await harness.ask({"text": "поставь на 7:30", "request_id": "c1", "session_id": "cl"})
    (rasa,) = harness.of("nlp.intent.detect.rasa")
    q = rasa["_meta"]["neural_clarify"]
    assert q["question_kind"] == "which_intent"
    assert [c["intent"] for c in q["candidates"]] == ["alarm.set", "voice.timer.start"]
    await harness.ask({"text": "будильник", "request_id": "c2", "session_id": "cl"})
    (answer,) = harness.of("nlp.intent.detected")
    assert (answer["intent"], answer["slots"]) == ("alarm.set", {"time": "07:30"})
    assert answer["_raw"]["context"]["refers_to"] == "c1"


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("js-conv")).start()
    yield server
    server.stop()


@needs_nats
async def test_segments_and_follow_ups_over_nats(
    tmp_path: Path, nats_server: NatsServer, service: ScriptedService
) -> None:
    import nats

    bus = NatsBus(nats_server.url, queue_group="adaos-nlu-conv-test")
    await bus.start()
    cfg = load_bridge_config(
        env={},
        overrides={"service_url": service.url, "state_dir": str(tmp_path / "b"), "nats_url": nats_server.url},
    )
    bridge = Bridge(cfg, bus)
    await bridge.start()
    nc = await nats.connect(nats_server.url)
    got: list[tuple[str, dict[str, Any]]] = []

    async def collect(msg: Any) -> None:
        got.append((msg.subject, json.loads(msg.data)))

    for subject in OUT:
        await nc.subscribe(subject, cb=collect)
    await nc.flush()
    try:
        for rid, text in (
            ("n1", "выключи свет на кухне и узнай погоду на даче"),
            ("n2", "turn on the kitchen light"),
            ("n3", "and the bedroom too"),
        ):
            body = {"text": text, "request_id": rid, "session_id": "nats-s", "webspace_id": "desktop"}
            await nc.publish("nlp.intent.detect.neural", json.dumps(body).encode())
            await nc.flush()
            await asyncio.sleep(0.2)  # the follow-up must come after its frame
        answers = lambda: [(s, p) for s, p in got if s != "nlu.trace.stage"]  # noqa: E731
        assert await wait_until(lambda: len(answers()) >= 4, timeout=20)
        await asyncio.sleep(0.3)
        out = answers()
        assert [(s, p["request_id"], p.get("segment_index")) for s, p in out] == [
            ("nlp.intent.detected", "n1", 0),
            ("nlp.intent.detect.rasa", "n1", 1),
            ("nlp.intent.detected", "n2", None),
            ("nlp.intent.detected", "n3", None),
        ]
        last = out[-1][1]
        assert last["slots"] == {"device": "device:light:bedroom_lamp"} and last["session_id"] == "nats-s"
        assert last["_raw"]["context"]["action"] == "update"
    finally:
        await nc.drain()
        await bridge.close()
        await bus.close()
