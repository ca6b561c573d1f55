"""Faults: damaged models, a full disk, the teacher down for an hour, SIGTERM under load, SIGKILL and restart.

Plus the security guards that belong with them: no pickle-family loading in the service or the
bridge, loopback by default, and a lock file that pins what pyproject asks for. Every file these
tests write lives in tmp_path; the full-disk tests mount a 64 KiB tmpfs there (root only) and skip
cleanly where mounting is not permitted.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

import adaos_bridge.queue as queue_mod
from adaos_bridge.bridge import Bridge
from adaos_bridge.bus import InMemoryBus, Recorder
from adaos_bridge.config import load_bridge_config
from adaos_bridge.delivery import Deliverer, HttpTeacherSink, Sent
from adaos_bridge.queue import SqliteQueue
from skill.app import DECISIONS, create_app
from skill.artifacts import ALLOWED_SUFFIXES, write_manifest
from skill.audit import AUDIT_FILE
from skill.config import Config, load_config
from skill.registry import write_pointer
from skill.service import ServiceState
from tests.conftest import REPO, write_catalog
from tests.test_bridge_support import FakeTeacher, ServiceThread, free_port
from tests.test_fuzz_http import Service

_SKIP_UNLESS_SLOW = pytest.mark.skipif(
    "os.environ.get('NLU_SLOW') != '1' and 'slow' not in (config.option.markexpr or '')",
    reason="slow: set NLU_SLOW=1 or run `python -m pytest -m slow`",
)


def slow(fn: Any) -> Any:
    """Marked ``slow`` and skipped unless NLU_SLOW=1 or ``-m slow`` (CI runs plain ``pytest -q``)."""
    return pytest.mark.slow(_SKIP_UNLESS_SLOW(fn))


async def wait_for(cond: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll ``cond`` on the loop until it holds (bounded)."""
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Damage one byte in place (the middle one by default)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# --- damaged model files -----------------------------------------------------------------------


def embedded_model() -> Path | None:
    """The repository's active model version, if one is committed."""
    pointer = REPO / "models" / "active.json"
    if not pointer.is_file():
        return None
    folder = REPO / "models" / json.loads(pointer.read_text(encoding="utf-8"))["model_id"]
    return folder if folder.is_dir() else None


def fake_version(root: Path, model_id: str) -> Path:
    """A hash-listed folder of inert files (refused as a ranker either way, but checked first)."""
    d = root / model_id
    d.mkdir(parents=True)
    (d / "ranker_config.json").write_text(json.dumps({"intents": ["a", "b"], "payload": "x" * 100}))
    (d / "examples_manifest.jsonl").write_text('{"text": "a", "intent": "a"}\n' * 20)
    write_manifest(d, model_id=model_id, created="2026-11-24T00:00:00Z", seed=1)
    return d


async def started(aiohttp_client: Any, config: Config) -> tuple[TestClient, ServiceState]:
    """The app on loopback, once its first load finished."""
    state = ServiceState(config)
    client = await aiohttp_client(create_app(state))
    await wait_for(lambda: state.ready or state.load_error is not None, 60)
    return client, state


async def test_damaged_model_is_refused_at_start_and_reported(
    aiohttp_client: Any, tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    """A damaged active version never loads: /health says why, /parse still answers (regex stage)."""
    root = tmp_path / "node"
    source = embedded_model()
    if source is not None:
        version = Path(shutil.copytree(source, root / source.name))
        victim = max(
            (p for p in version.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size
        )
    else:
        version = fake_version(root, "fake-1")
        victim = version / "ranker_config.json"
    write_pointer(root, version.name)
    flip_byte(victim)
    client, state = await started(aiohttp_client, make_config(models_dir=str(root), watch_pointer=False))
    health = await (await client.get("/health")).json()
    assert health["ok"] is True and health["model_loaded"] is False and health["status"] == "degraded"
    assert "damaged (sha256 mismatch)" in health["load_error"] and victim.name in health["load_error"]
    resp = await client.post("/parse", json={"text": "поставь будильник на 7:30"})
    body = await resp.json()
    assert resp.status == 200 and body["top_intent"] == "alarm.set" and body["via"] == "regex"
    print(f"\ndamaged model at start ({'real ' + source.name if source else 'fake'}): {health['load_error']}")


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "unlisted_pickle", "manifest_edit"])
async def test_damage_on_disk_is_refused_on_reload(
    aiohttp_client: Any, tmp_path: Path, make_config: Callable[..., Config], damage: str
) -> None:
    """Damage under a serving model: the reload is refused, counted, and the old pipeline keeps serving."""
    root = tmp_path / "node"
    source = embedded_model()
    version = Path(shutil.copytree(source, root / source.name)) if source else fake_version(root, "fake-1")
    write_pointer(root, version.name)
    client, state = await started(aiohttp_client, make_config(models_dir=str(root), watch_pointer=False))
    before = state.pipeline
    loaded_before = (await (await client.get("/health")).json())["model_loaded"]
    victim = max((p for p in version.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    if damage == "flip_byte":
        flip_byte(victim)
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "unlisted_pickle":
        (version / "extra.pkl").write_bytes(b"\x80\x04K\x01.")  # pickle of 1: must never be loaded
    else:
        manifest = json.loads((version / "manifest.json").read_text())
        manifest["files"][0]["sha256"] = "0" * 64
        (version / "manifest.json").write_text(json.dumps(manifest))
    resp = await client.post("/reindex", json={})
    body = await resp.json()
    assert resp.status == 200 and body["ok"] is False
    assert body["error"] and any(w in body["error"] for w in ("damaged", "not listed", "not allowed"))
    health = body["health"]
    assert health["model_loaded"] is False or loaded_before  # never *gains* a model from damage
    if loaded_before:
        assert state.pipeline is before and health["model_loaded"] is True and health["refusals_total"] == 1
    resp = await client.post("/parse", json={"text": "turn off the kitchen light"})
    assert resp.status == 200 and (await resp.json())["top_intent"] == "device.turn_off"
    print(
        f"\n{damage}: reload refused ({body['error'][-60:]}); serving {health['model_id']}, "
        f"model_loaded={health['model_loaded']}, refusals_total={health['refusals_total']}"
    )


@slow
async def test_trained_model_keeps_serving_after_damaged_reload(
    aiohttp_client: Any, tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    """With a real ranker serving (a tiny one trained here), a damaged new version is refused."""
    from tests.test_train import train_tiny  # noqa: PLC0415 - needs torch (the train extra)

    good = train_tiny(tmp_path / "train")
    root = good.parent
    client, state = await started(
        aiohttp_client,
        make_config(
            models_dir=str(root), catalog_dir=str(tmp_path / "train" / "catalog"), watch_pointer=False
        ),
    )
    assert state.pipeline is not None and state.pipeline.ranker is not None
    bad = Path(shutil.copytree(good, root / "damaged-v2"))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["model_id"] = "damaged-v2"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    flip_byte(bad / "model.onnx")
    write_pointer(root, "damaged-v2")
    body = await (await client.post("/reindex", json={})).json()
    assert body["ok"] is False and "model.onnx is damaged" in body["error"]
    assert body["health"]["model_id"] == good.name and body["health"]["refusals_total"] == 1
    parsed = await (await client.post("/parse", json={"text": "play some jazz"})).json()
    assert parsed["model_id"] == good.name


# --- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A tiny tmpfs under tmp_path (64 KiB unless the test asks for more, ``indirect``), with a
    ``ballast`` file that takes all but ~16 KiB; deleting it is the operator freeing space."""
    size_kib = getattr(request, "param", 64)
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        (mnt / "ballast").write_bytes(b"\0" * (size_kib - 24) * 1024)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


async def test_audit_log_on_a_full_disk(
    aiohttp_client: Any, tiny_fs: Path, mini_catalog: Path, make_config: Callable[..., Config]
) -> None:
    """/parse keeps answering; every record is written or counted failed; writing resumes; no torn lines."""
    audit_dir = tiny_fs / "logs"
    client, state = await started(
        aiohttp_client,
        make_config(catalog_dir=str(mini_catalog), audit_dir=str(audit_dir), audit_max_bytes=1 << 20),
    )
    log = client.app[DECISIONS]
    writer = log.writer
    assert writer is not None
    texts = ["поставь будильник на 7:30 " + "и ещё " * 120, "turn off the kitchen light " + "x " * 300]
    sent = 0
    for i in range(80):  # ~1.5 KiB per record: far more than the ~20 KiB left
        resp = await client.post("/parse", json={"text": texts[i % 2][:1000]})
        assert resp.status == 200
        sent += 1
    await wait_for(lambda: writer.written + writer.failed + writer.dropped >= sent)
    assert writer.failed > 0, "the disk never filled up"
    full_stats = dict(log.stats())
    metrics = await (await client.get("/metrics")).text()
    assert f'nlu_audit_records_total{{result="failed"}} {float(writer.failed)}' in metrics
    assert (await client.get("/health")).status == 200
    (tiny_fs / "ballast").unlink()  # the operator frees space
    for i in range(10):
        assert (await client.post("/parse", json={"text": f"turn off the kitchen light {i}"})).status == 200
    sent += 10
    await wait_for(lambda: writer.written + writer.failed + writer.dropped >= sent)
    assert writer.written > full_stats["written"], "writing did not resume"
    data = (audit_dir / AUDIT_FILE).read_bytes()
    lines = data.split(b"\n")
    assert lines[-1] == b""
    records = [json.loads(line) for line in lines[:-1]]  # no torn or merged line anywhere
    assert records[-1]["text"] == "turn off the kitchen light 9"
    print(
        f"\naudit on a full disk: {sent} decisions, written {writer.written}, failed {writer.failed}, "
        f"dropped {writer.dropped}; lines in file {len(records)}"
    )


@pytest.mark.parametrize("tiny_fs", [256], indirect=True)  # opening takes ~76 KiB (WAL index, schema)
async def test_teacher_queue_on_a_full_disk(tiny_fs: Path) -> None:
    """A put that cannot commit raises (the bridge counts it); what was committed stays whole, deliverable."""
    (tiny_fs / "ballast").write_bytes(b"\0" * 64 * 1024)  # leaves room for a handful of commits
    q = SqliteQueue(tiny_fs / "teacher_queue.sqlite3", max_items=10_000, sync="full")
    await q.open()
    committed: list[str] = []
    error: Exception | None = None
    for i in range(500):
        try:
            assert await q.put(f"k{i}", {"text": f"miss {i} " + "ж" * 400})
        except sqlite3.Error as exc:
            error = exc
            break
        committed.append(f"k{i}")
    assert error is not None and "full" in str(error), error
    assert committed, "nothing fitted at all"
    stats = await q.stats()
    assert stats["pending"] == len(committed) == stats["enqueued"]
    rows = await q.due(10_000)
    assert [r.key for r in rows] == committed
    (tiny_fs / "ballast").unlink()
    assert await q.put("after", {"text": "space again"})
    await q.ack([r.id for r in rows[:5]])
    await q.close()
    q2 = SqliteQueue(tiny_fs / "teacher_queue.sqlite3")
    await q2.open()
    try:
        assert (await q2._call(lambda: q2._require().execute("PRAGMA integrity_check").fetchone()[0])) == "ok"
        keys = [r.key for r in await q2.due(10_000)]
        assert keys == committed[5:] + ["after"]
        stats = await q2.stats()
        assert stats["delivered"] == 5 and stats["pending"] == len(keys)
    finally:
        await q2.close()
    print(
        f"\nteacher queue on a full disk: {len(committed)} committed before {type(error).__name__}: {error}"
    )


@pytest.mark.parametrize("tiny_fs", [256], indirect=True)
async def test_bridge_on_a_full_disk_still_answers(tiny_fs: Path, tmp_path: Path) -> None:
    """The bridge state dir on a full disk: requests still get their fallback events; close() is clean."""
    svc_root = tmp_path / "svc"
    cfg = load_config(
        env={},
        overrides={
            "catalog_dir": str(write_catalog(svc_root / "catalog")),
            "models_dir": str(svc_root / "m"),
            "embedded_models_dir": str(svc_root / "e"),
            "audit_dir": str(svc_root / "logs"),
            "watch_pointer": False,
        },
    )
    svc = ServiceThread(cfg).start()
    try:
        bcfg = load_bridge_config(
            env={},
            overrides={
                "service_url": svc.url,
                "state_dir": str(tiny_fs / "bridge"),
                "stats_flush_s": 0.05,
            },
        )
        bus, rec = InMemoryBus(), Recorder()
        for t in ("nlp.intent.detected", "nlp.intent.detect.rasa"):
            await bus.subscribe(t, rec)
        (tiny_fs / "ballast").unlink()  # room for SQLite to open (WAL index 32 KiB) ...
        bridge = Bridge(bcfg, bus)
        await bridge.start()
        with contextlib.suppress(OSError), (tiny_fs / "filler").open("wb") as fh:
            for _ in range(256):  # ... then fill it up to the last byte
                fh.write(b"\0" * 1024)
                fh.flush()
        n = 40
        for i in range(n):
            bus.publish_nowait(
                "nlp.intent.detect.neural",
                {"text": f"что-то совсем непонятное {i} " + "ы" * 300, "request_id": f"r{i}"},
                source="hub",
            )
            bus.publish_nowait(
                "nlp.intent.detect.neural",
                {"text": "Поставь будильник на 7:30", "request_id": f"a{i}"},
                source="hub",
            )
        assert await bus.wait_idle(30)
        assert len(rec.of("nlp.intent.detect.rasa")) == n  # every miss still got its fallback
        assert len(rec.of("nlp.intent.detected")) == n
        errors = bridge.stats.data.get("bridge", {}).get("queue_errors", 0)
        pending = bridge.queue.pending
        assert errors + pending == n and errors > 0, (errors, pending)
        await bridge.close()  # statistics cannot be written: logged, not raised
        print(f"\nbridge on a full disk: {n} misses, queued {pending}, queue_errors {errors}")
    finally:
        svc.stop()


# --- the teacher down for an hour --------------------------------------------------------------


class Clock:
    """Simulated wall clock for the queue (``time.time`` inside adaos_bridge.queue)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now


@pytest.mark.parametrize("bound", [10_000, 50])
async def test_teacher_down_for_an_hour(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bound: int) -> None:
    """A miss every 40 s for a simulated hour while the teacher's port is closed, then it comes back.

    Below the bound nothing is lost and each miss arrives once; above it the oldest go and are counted.
    """
    clock = Clock()
    monkeypatch.setattr(queue_mod, "time", SimpleNamespace(time=clock.time))
    port = free_port()
    teacher = FakeTeacher()
    sink = HttpTeacherSink(f"http://127.0.0.1:{port}/teacher/misses", teacher.token, timeout_s=2.0)
    q = SqliteQueue(tmp_path / "q.sqlite3", max_items=bound, sync="normal")
    await q.open()
    deliverer = Deliverer(q, sink, batch=64, backoff_s=0.5, backoff_max_s=60.0, rng=random.Random(1))
    await sink.start()
    put: list[str] = []
    attempts = 0

    async def drain_due() -> int:
        """What the delivery loop does at one instant: keep going while rows are due (bounded)."""
        nonlocal attempts
        done = 0
        for _ in range(50):
            rows = await q.due(deliverer.batch)
            if not rows:
                break
            attempts += len(rows)
            done += await deliverer.deliver_due()
        return done

    try:
        for second in range(0, 3600, 2):  # the delivery loop looks at least every 5 s
            if second % 40 == 0:
                key = f"miss-{second:04d}"
                assert await q.put(key, {"text": f"непонятное {second}", "request_id": key})
                put.append(key)
            assert await drain_due() == 0  # nothing gets through while the teacher is down
            clock.now += 2.0
        down_attempts = attempts
        stats = await q.stats()
        assert stats["pending"] == min(bound, len(put))
        await teacher.start(port)  # back after an hour
        for _ in range(300):  # at most 10 simulated minutes to catch up
            await drain_due()
            if q.pending == 0:
                break
            clock.now += 2.0
        stats = await q.stats()
    finally:
        await sink.close()
        await teacher.stop()
        await q.close()
    keys = teacher.keys()
    expected = put[-bound:]
    assert stats["pending"] == 0
    assert sorted(set(keys)) == sorted(expected) and len(keys) == len(expected)  # each once, none lost
    assert stats["enqueued"] == len(put)
    assert stats["delivered"] == len(expected)
    assert stats["dropped_overflow"] == len(put) - len(expected)
    assert stats["enqueued"] == stats["delivered"] + stats["dropped_overflow"]
    print(
        f"\nteacher down 1 h (bound {bound}): {len(put)} misses, {down_attempts} failed attempts, "
        f"delivered {stats['delivered']}, dropped_overflow {stats['dropped_overflow']}"
    )


# --- signals -----------------------------------------------------------------------------------


async def _burst(url: str, n: int, text: str, ready: asyncio.Event) -> tuple[list[int], list[str]]:
    """``n`` concurrent /parse on kept-alive connections; statuses and error kinds."""
    statuses: list[int] = []
    errors: list[str] = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n), timeout=timeout) as session:

        async def warm() -> None:
            async with session.get(url + "/health") as resp:
                await resp.read()

        await asyncio.gather(*(warm() for _ in range(n)))  # n open connections before the burst

        async def one(i: int) -> None:
            try:
                async with session.post(
                    url + "/parse", json={"text": f"{text} {i}", "request_id": f"b{i}"}
                ) as resp:
                    await resp.read()
                    statuses.append(resp.status)
            except aiohttp.ClientError as exc:
                errors.append(type(exc).__name__)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0.1)  # every request is on the wire and read by now; most are still queued
        ready.set()
        _AT_SIGNAL.append(len(statuses) + len(errors))
        await asyncio.gather(*tasks)
    return statuses, errors


_AT_SIGNAL: list[int] = []


def _parse_text() -> str:
    return ("десять минут " * 80)[:990]  # ~20 ms of canonicalization each: 48 of them take a while


async def test_sigterm_under_load_drains_in_flight_requests(tmp_path: Path) -> None:
    """SIGTERM while 48 requests are in flight: every one completes with 200, audit has them all, exit 0."""
    svc = Service(tmp_path)
    try:
        svc.wait_healthy()
        ready = asyncio.Event()
        burst = asyncio.create_task(_burst(svc.url, 48, _parse_text(), ready))
        await asyncio.wait_for(ready.wait(), 30)
        t0 = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        statuses, errors = await burst
        drained_s = time.monotonic() - t0
        code = await asyncio.to_thread(svc.proc.wait, 30)
    finally:
        svc.stop()
    in_flight = 48 - _AT_SIGNAL[-1]
    assert in_flight >= 10, "the burst finished before the signal: nothing was in flight"
    assert errors == [] and statuses == [200] * 48, (statuses, errors)
    assert code == 0
    log = svc.log.read_text(errors="replace")
    assert "stopping: draining in-flight requests" in log and "Traceback" not in log
    audit = [json.loads(x) for x in (tmp_path / "logs" / AUDIT_FILE).read_bytes().split(b"\n")[:-1]]
    assert {r["request_id"] for r in audit} >= {f"b{i}" for i in range(48)}
    print(
        f"\nSIGTERM under load: {in_flight} of 48 in flight at the signal, all 48 answered 200 "
        f"(last {drained_s:.2f} s after it), exit {code}"
    )


async def _hammer(url: str, seconds: float) -> int:
    """Requests until the time is up or the service goes away; how many got an answer."""
    done = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            try:
                async with session.post(url + "/parse", json={"text": "turn off the kitchen light"}) as resp:
                    await resp.read()
                    done += 1
            except aiohttp.ClientError:
                return done
    return done


async def test_sigkill_under_load_and_restart(tmp_path: Path) -> None:
    """SIGKILL mid-load, then a restart on the same state and logs: healthy, serving, audit log whole."""
    svc = Service(tmp_path)
    try:
        svc.wait_healthy()
        load = [asyncio.create_task(_hammer(svc.url, 10.0)) for _ in range(8)]
        await asyncio.sleep(1.0)
        svc.proc.send_signal(signal.SIGKILL)
        answered = sum(await asyncio.gather(*load))
        assert svc.proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        svc.stop()
    audit_path = tmp_path / "logs" / AUDIT_FILE
    # A kill between two write() calls of one flush leaves half a line: make sure that case is covered.
    with audit_path.open("ab") as fh:
        fh.write(b'{"v":1,"ts":"2026-11-24T23:59:59.999+00:00","request_id":"torn-by-kill","mod')
    again = Service(tmp_path)
    try:
        again.wait_healthy()
        for i in range(5):
            status, _, data = again.request(
                "POST",
                "/parse",
                json.dumps({"text": "turn off the kitchen light", "request_id": f"after-{i}"}).encode(),
                {"Content-Type": "application/json"},
            )
            assert status == 200 and json.loads(data)["top_intent"] == "device.turn_off"
    finally:
        assert again.stop() == 0
    data = audit_path.read_bytes()
    assert data.endswith(b"\n")
    records = [json.loads(x) for x in data.split(b"\n")[:-1]]  # every line whole: the torn tail was cut
    ids = [r["request_id"] for r in records]
    assert ids[-5:] == [f"after-{i}" for i in range(5)] and "torn-by-kill" not in data.decode()
    print(
        f"\nSIGKILL under load: {answered} answered before the kill, "
        f"{len(records)} whole audit lines after restart"
    )


_KILL_WRITER = """
import asyncio, sys
from adaos_bridge.queue import SqliteQueue

async def main(path):
    q = SqliteQueue(path, max_items=100_000, sync="full")
    await q.open()
    for i in range(100_000):
        await q.put(f"k{i:06d}", {"text": "miss " * 20, "i": i})
        print(f"committed k{i:06d}", flush=True)

asyncio.run(main(sys.argv[1]))
"""


async def test_sigkill_while_committing_to_the_teacher_queue(tmp_path: Path) -> None:
    """Kill -9 a writer mid-commit: the database is intact, every acknowledged put is there, it reopens."""
    db = tmp_path / "teacher_queue.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_WRITER, str(db)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    acknowledged: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while len(acknowledged) < 200 and time.monotonic() < deadline:
        line = await asyncio.to_thread(proc.stdout.readline)
        if not line:
            break
        acknowledged.append(line.decode().split()[1])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert len(acknowledged) >= 50, proc.stderr.read().decode() if proc.stderr else ""
    q = SqliteQueue(db)
    await q.open()  # the dead writer's lock is gone with it
    try:
        check = await q._call(lambda: q._require().execute("PRAGMA integrity_check").fetchone()[0])
        assert check == "ok"
        keys = [r.key for r in await q.due(100_000)]
        assert set(acknowledged) <= set(keys)  # durability: every acknowledged commit survived
        stats = await q.stats()
        assert stats["enqueued"] == stats["pending"] == len(keys)

        class Collect:
            got: list[str] = []

            async def start(self) -> None: ...

            async def send(self, key: str, body: dict[str, Any]) -> tuple[Sent, str]:
                self.got.append(key)
                return Sent.OK, "ok"

            async def close(self) -> None: ...

        sink = Collect()
        deliverer = Deliverer(q, sink, batch=500)
        while await deliverer.deliver_due():
            pass
        assert sorted(sink.got) == sorted(keys) and (await q.stats())["pending"] == 0
    finally:
        await q.close()
    print(
        f"\nSIGKILL mid-commit: {len(acknowledged)} acknowledged, {len(keys)} in the queue after restart, "
        f"integrity {check}"
    )


# --- security ----------------------------------------------------------------------------------

_PICKLE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
    "torch",
}


def unsafe_uses(source: str) -> list[str]:
    """Imports of the pickle family and unpickling calls (``torch.load``, ``np.load(allow_pickle=True)``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLE_MODULES]
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in _PICKLE_MODULES
        ):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.endswith(("torch.load", "pickle.load", "pickle.loads", "joblib.load", "Unpickler")):
                found.append(name)
            if any(
                k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                found.append(f"{name}(allow_pickle=...)")
    return found


# A plain grep as well, so a dynamic import (importlib.import_module("pickle")) cannot hide either.
_PICKLE_TEXT = re.compile(
    r"""["'](?:pickle|cPickle|_pickle|dill|cloudpickle|joblib)["']|torch\.load|\.pkl\b"""
)


def test_no_pickle_anywhere_in_the_service_or_the_bridge() -> None:
    files = sorted([*(REPO / "skill").rglob("*.py"), *(REPO / "adaos_bridge").rglob("*.py")])
    assert len(files) > 20
    offenders = [
        f"{f.relative_to(REPO)}: {u}" for f in files for u in unsafe_uses(f.read_text(encoding="utf-8"))
    ]
    assert offenders == []
    # One file may name a pickle: skill/artifacts.py finds the pickle inside a torch state_dict
    # (AdaOS's model.pt) to disassemble it with pickletools, which never unpickles (the AST check
    # above still covers it). Everything it may say about pickles is inside check_state_dict.
    grep = [
        f"{f.relative_to(REPO)}:{n}: {line.strip()}"
        for f in files
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if _PICKLE_TEXT.search(line) and not (f.name == "artifacts.py" and n in _state_dict_checker_lines())
    ]
    assert grep == []


def _state_dict_checker_lines() -> range:
    source = (REPO / "skill" / "artifacts.py").read_text(encoding="utf-8")
    (fn,) = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name == "check_state_dict"
    ]
    assert "pickletools.genops" in ast.get_source_segment(source, fn)
    return range(fn.lineno, (fn.end_lineno or fn.lineno) + 1)


def test_the_guard_catches_pickle() -> None:
    source = "import pickle\nimport numpy as np\nnp.load('a.npy', allow_pickle=True)\ntorch.load('m.pt')\n"
    assert unsafe_uses(source) == ["import pickle", "np.load(allow_pickle=...)", "torch.load"]
    assert _PICKLE_TEXT.search("importlib.import_module('pickle')")


def test_secure_defaults() -> None:
    cfg = load_config(env={}, overrides={})
    assert cfg.host == "127.0.0.1" and cfg.api_token is None
    # The one pickle-based format a model folder may hold is a torch state_dict (AdaOS's model.pt),
    # and only one whose pickle rebuilds tensors and nothing else: tests/test_adaos_dropin.py plants
    # one that names another object and sees write_manifest and verify_model_dir refuse it.
    risky = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".npz", ".py", ".so"}
    assert ALLOWED_SUFFIXES & risky == {".pt"}


def test_lock_file_pins_every_declared_dependency() -> None:
    """requirements.lock pins (==) every run-time and dev dependency, at a version pyproject accepts."""
    from packaging.requirements import Requirement  # noqa: PLC0415
    from packaging.utils import canonicalize_name  # noqa: PLC0415

    try:
        import tomllib  # noqa: PLC0415
    except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
        pytest.skip("tomllib needs Python 3.11")
    lock: dict[str, str] = {}
    for raw in (REPO / "requirements.lock").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            lock[canonicalize_name(name.split("[")[0])] = version.split(";")[0].strip()
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        declared += [Requirement(r) for r in extra if not r.startswith(project["name"])]
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(lock[name], prereleases=True), f"{req.name}=={lock[name]} breaks {req}"
    assert metadata.version("msgspec")  # the lock was made from an installed environment


# --- the load script itself --------------------------------------------------------------------


def test_novel_words_are_new_every_request_and_keep_the_script() -> None:
    from tools.load import novel_word, with_novel_word  # noqa: PLC0415

    words = {novel_word(n, n % 2 == 0) for n in range(5000)}
    assert len(words) == 5000 and min(map(len, words)) >= 6
    ru, en = with_novel_word("включи свет на кухне", 1), with_novel_word("turn on the light", 1)
    assert ru.split()[0] == "включи" and ru.split()[1] != "свет" and ru.split()[1].isalpha()
    assert all("а" <= c <= "я" for c in ru.split()[1]) and en.split()[1].isascii()
    assert with_novel_word("", 3) == ""


@slow
def test_load_script_steps_and_a_short_soak(tmp_path: Path) -> None:
    """``python -m tools.load`` end to end, small: zero errors at every step, a clean exit, flat memory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADAOS_", "NLU_"))}

    def run(*args: str) -> dict[str, Any]:
        out = tmp_path / f"load{len(list(tmp_path.iterdir()))}.json"
        done = subprocess.run(
            [sys.executable, "-m", "tools.load", "--warmup-seconds", "2", *args, "--out", str(out)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads(out.read_text(encoding="utf-8"))

    steps = run("--steps", "1,4,16", "--step-seconds", "3")
    assert [s["concurrency"] for s in steps["steps"]] == [1, 4, 16]
    assert all(s["errors"] == 0 and s["ok"] > 0 for s in steps["steps"])
    assert steps["highest_clean_concurrency"]["concurrency"] == 16 and steps["exit_code_after_sigterm"] == 0
    soak = run("--soak", "20", "--soak-concurrency", "4", "--sample-every", "1")
    assert soak["soak"]["errors"] == 0 and soak["soak"]["memory"]["stable"] is True
    assert soak["audit"].get("failed", 0) == 0 and soak["exit_code_after_sigterm"] == 0
