"""The standalone bridge process: SIGKILL with misses queued and the teacher down loses nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from adaos_bridge.misses import idempotency_key
from skill.config import load_config
from tests.conftest import REPO, write_catalog
from tests.test_bridge_support import FakeHub, FakeTeacher, ServiceThread, free_port, wait_until


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceThread]:
    root = tmp_path_factory.mktemp("svc")
    cfg = load_config(
        env={},
        overrides={
            "catalog_dir": str(write_catalog(root / "catalog")),
            "models_dir": str(root / "m"),
            "embedded_models_dir": str(root / "e"),
            "watch_pointer": False,
        },
    )
    svc = ServiceThread(cfg).start()
    yield svc
    svc.stop()


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADAOS_", "NLU_"))}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "adaos_bridge", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def wait_ready(port: int, timeout: float = 15.0) -> None:
    async with aiohttp.ClientSession() as session:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("the bridge did not start")


async def post_events(port: int, token: str, bodies: list[dict[str, str]]) -> None:
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            payload = {"type": "nlp.intent.detect.neural", "payload": body, "webspace_id": "desktop"}
            async with session.post(
                f"http://127.0.0.1:{port}/api/node/events/publish",
                json=payload,
                headers={"X-AdaOS-Token": token},
            ) as resp:
                assert resp.status == 200, await resp.text()


async def test_sigkill_with_queued_misses_loses_nothing(tmp_path: Path, service: ServiceThread) -> None:
    hub = await FakeHub().start()
    teacher = FakeTeacher()
    teacher_port, listen = free_port(), free_port()
    log = tmp_path / "bridge.log"
    args = [
        "--bus",
        "http",
        "--hub-url",
        hub.url,
        "--hub-token",
        hub.token,
        "--listen",
        f"127.0.0.1:{listen}",
        "--service-url",
        service.url,
        "--state-dir",
        str(tmp_path / "state"),
        "--teacher-url",
        f"http://127.0.0.1:{teacher_port}/teacher/misses",
        "--teacher-token",
        teacher.token,
    ]
    proc = spawn(args, log)
    try:
        await wait_ready(listen)
        first = [{"text": f"непонятная просьба {i}", "request_id": f"k{i}"} for i in range(10)]
        first.insert(3, {"text": "поставь будильник на 7:30", "request_id": "hit"})
        await post_events(listen, hub.token, first)
        assert await wait_until(lambda: len(hub.of("nlp.intent.detect.rasa")) == 10, timeout=15)
        # More misses in flight, then SIGKILL while the teacher is still down.
        second = [{"text": f"ещё одна странная фраза {i}", "request_id": f"late{i}"} for i in range(10)]
        await post_events(listen, hub.token, second)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        answered = {e["payload"]["request_id"] for e in hub.of("nlp.intent.detect.rasa")}
        assert len(hub.of("nlp.intent.detected")) == 1

        await teacher.start(teacher_port)
        proc = spawn(args, log)
        await wait_ready(listen)
        sent = {b["request_id"]: b["text"] for b in [*first, *second] if b["request_id"] != "hit"}
        must = {idempotency_key(rid, sent[rid]) for rid in answered}  # answered ⇒ queued before the kill
        assert await wait_until(lambda: must <= set(teacher.keys()), timeout=20), log.read_text()
        await asyncio.sleep(0.5)
        keys = teacher.keys()
        assert len(keys) == len(set(keys)), "a miss was delivered twice"
        assert set(keys) <= {idempotency_key(rid, text) for rid, text in sent.items()}
        assert all(body["idempotency_key"] == key for key, body in teacher.deliveries)
        # Teacher feedback over the same HTTP ingress lands in the overlay.
        example = {"text": "разбуди меня пораньше", "intent": "alarm.set", "request_id": "k1"}
        async with aiohttp.ClientSession() as session:
            body = {"type": "nlp.teacher.example.save", "payload": example, "webspace_id": "desktop"}
            url = f"http://127.0.0.1:{listen}/api/node/events/publish"
            async with session.post(url, json=body, headers={"X-AdaOS-Token": hub.token}) as resp:
                assert resp.status == 200
        overlay = tmp_path / "state" / "teacher_catalog" / "intents" / "teacher.yaml"
        assert await wait_until(overlay.exists, timeout=10)
        assert (tmp_path / "state" / "retrain_candidate.json").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
        stats = json.loads((tmp_path / "state" / "neural_usage.json").read_text())
        assert stats["schema_version"] == 1 and stats["bridge"]["teacher_queue"]["pending"] == 0
        assert stats["bridge"]["teacher_queue"]["delivered"] == len(keys)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        await teacher.stop()
        await hub.stop()


def test_runner_refuses_a_bad_setup() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adaos_bridge", "--bus", "nats"],
        check=False,
        cwd=REPO,
        capture_output=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("ADAOS_", "NLU_"))},
        timeout=30,
    )
    assert out.returncode == 2 and b"--nats-url" in out.stderr
