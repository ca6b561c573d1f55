"""The bridge on a real nats-server: a queue group shares the load, JetStream takes the misses."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adaos_bridge.bridge import Bridge
from adaos_bridge.bus_nats import NatsBus
from adaos_bridge.config import load_bridge_config
from adaos_bridge.delivery import JetStreamTeacherSink
from adaos_bridge.misses import idempotency_key
from skill.config import load_config
from tests.conftest import write_catalog
from tests.test_bridge_support import NatsServer, ServiceThread, needs_nats, wait_until

pytestmark = needs_nats
ANSWERS = ("nlp.intent.detected", "nlp.intent.detect.rasa", "nlp.intent.not_obtained")


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("jetstream")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServiceThread]]:
    """Two instances of the real service (regex-only on the mini catalog)."""
    out = []
    for i in range(2):
        root = tmp_path_factory.mktemp(f"svc{i}")
        cfg = load_config(
            env={},
            overrides={
                "catalog_dir": str(write_catalog(root / "catalog")),
                "models_dir": str(root / "m"),
                "embedded_models_dir": str(root / "e"),
                "watch_pointer": False,
            },
        )
        out.append(ServiceThread(cfg).start())
    yield out
    for svc in out:
        svc.stop()


async def _client(url: str) -> Any:
    import nats

    return await nats.connect(url)


async def test_queue_group_answers_every_request_exactly_once(
    tmp_path: Path, nats_server: NatsServer, services: list[ServiceThread]
) -> None:
    bridges: list[tuple[Bridge, NatsBus]] = []
    for i, svc in enumerate(services):
        bus = NatsBus(nats_server.url, queue_group="adaos-nlu-test")
        await bus.start()
        cfg = load_bridge_config(
            env={},
            overrides={
                "service_url": svc.url,
                "state_dir": str(tmp_path / f"b{i}"),
                "nats_url": nats_server.url,
            },
        )
        bridge = Bridge(cfg, bus)
        await bridge.start()
        bridges.append((bridge, bus))
    nc = await _client(nats_server.url)
    answers: list[tuple[str, dict[str, Any]]] = []

    async def collect(msg: Any) -> None:
        answers.append((msg.subject, json.loads(msg.data)))

    for subject in ANSWERS:
        await nc.subscribe(subject, cb=collect)
    await nc.flush()
    try:
        n = 60
        for i in range(n):
            text = "поставь будильник на 7:30" if i % 2 == 0 else f"непонятная просьба {i}"
            body = {"text": text, "request_id": f"q{i}", "webspace_id": "desktop"}
            await nc.publish("nlp.intent.detect.neural", json.dumps(body).encode())
            if i % 10 == 0:  # a hub retry of the same request: must not be answered twice
                await nc.publish("nlp.intent.detect.neural", json.dumps(body).encode())
        await nc.flush()
        assert await wait_until(lambda: len(answers) >= n, timeout=20)
        await asyncio.sleep(0.3)  # anything extra would arrive now
        per_request = Counter(payload["request_id"] for _, payload in answers)
        assert len(answers) == n and set(per_request.values()) == {1}
        assert {s for s, p in answers if int(p["request_id"][1:]) % 2 == 0} == {"nlp.intent.detected"}
        assert {s for s, p in answers if int(p["request_id"][1:]) % 2 == 1} == {"nlp.intent.detect.rasa"}
        shares = [b.stats.data["totals"]["requests"] for b, _ in bridges]
        assert all(s > 0 for s in shares), shares  # both instances took part
        dups = sum(b.stats.data["bridge"]["duplicates_dropped"] for b, _ in bridges)
        assert sum(shares) + dups == n + 6
    finally:
        await nc.drain()
        for bridge, bus in bridges:
            await bus.close()
            await bridge.close()


async def test_misses_go_to_a_jetstream_stream_once_per_key(
    tmp_path: Path, nats_server: NatsServer, services: list[ServiceThread]
) -> None:
    stream = "NLU_TEACHER_TEST"
    cfg = load_bridge_config(
        env={},
        overrides={
            "service_url": services[0].url,
            "state_dir": str(tmp_path / "js"),
            "nats_url": nats_server.url,
            "teacher_stream": stream,
            "teacher_subject": "nlu.teacher.miss.test",
        },
    )
    bus = NatsBus(nats_server.url, queue_group="adaos-nlu-js")
    await bus.start()
    bridge = Bridge(cfg, bus)
    await bridge.start()
    nc = await _client(nats_server.url)
    try:
        for i in range(4):
            body = {"text": f"что-то непонятное {i}", "request_id": f"js{i}"}
            await nc.publish("nlp.intent.detect.neural", json.dumps(body).encode())
        await nc.flush()
        assert await wait_until(lambda: bridge.stats.data["totals"]["requests"] == 4, timeout=10)
        assert await wait_until(lambda: bridge.queue.pending == 0, timeout=10)
        # A redelivery after a crash (same key) is dropped by the stream's duplicate window.
        sink = JetStreamTeacherSink(nats_server.url, stream, "nlu.teacher.miss.test")
        await sink.start()
        outcome, detail = await sink.send(idempotency_key("js0", "что-то непонятное 0"), {"again": True})
        await sink.close()
        assert (outcome.value, detail) == ("ok", "duplicate")
        js = nc.jetstream()
        info = await js.stream_info(stream)
        assert info.state.messages == 4
        sub = await js.pull_subscribe("nlu.teacher.miss.test", durable="check")
        msgs = await sub.fetch(4, timeout=5)
        keys = {m.headers["Nats-Msg-Id"] for m in msgs}
        assert keys == {idempotency_key(f"js{i}", f"что-то непонятное {i}") for i in range(4)}
        assert {json.loads(m.data)["reason"] for m in msgs} == {"neural_abstained"}
    finally:
        await nc.drain()
        await bus.close()
        await bridge.close()


async def test_examples_from_a_jetstream_stream_survive_the_bridge_being_away(
    tmp_path: Path, nats_server: NatsServer, services: list[ServiceThread]
) -> None:
    from skill.catalog import load_catalog

    stream = "NLU_EXAMPLES_TEST"
    nc = await _client(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=["nlp.teacher.example.save"])
    cfg = load_bridge_config(
        env={},
        overrides={
            "service_url": services[0].url,
            "state_dir": str(tmp_path / "ex"),
            "nats_url": nats_server.url,
            "examples_stream": stream,
            "overlay_path": str(tmp_path / "overlay" / "intents" / "teacher.yaml"),
        },
    )

    async def run_bridge_until(saved: int) -> Bridge:
        bus = NatsBus(nats_server.url, queue_group="adaos-nlu-ex")
        await bus.start()
        bridge = Bridge(cfg, bus)
        await bridge.start()
        ok = await wait_until(lambda: bridge.stats.data["bridge"]["feedback"]["saved"] >= saved, timeout=10)
        await bus.close()
        await bridge.close()
        assert ok
        return bridge

    try:
        for text in ("разбуди меня пораньше", "wake me up early"):  # published while no bridge runs
            await js.publish(
                "nlp.teacher.example.save", json.dumps({"text": text, "intent": "alarm.set"}).encode()
            )
        first = await run_bridge_until(2)
        await js.publish(
            "nlp.teacher.example.save", json.dumps({"text": "включи музыку", "intent": "music.play"}).encode()
        )
        second = await run_bridge_until(3)  # the statistics file carries the first run's 2
        assert second.stats.data["bridge"]["feedback"] == {"saved": 3, "repeated": 0, "invalid": 0}
        assert first.stats.data["bridge"]["feedback"]["saved"] == 2
        catalog = load_catalog(tmp_path / "overlay")
        assert sorted(catalog.intents) == ["alarm.set", "music.play"]
    finally:
        await js.delete_stream(stream)
        await nc.drain()
