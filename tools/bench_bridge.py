"""Bridge overhead over a direct ``/parse`` call, and the teacher queue's throughput.

Starts ``python -m skill`` on a free loopback port, then, in this process, a bridge on an in-memory
bus. For each utterance it times a direct ``POST /parse`` and the bridge round trip (request event
in → ``nlp.intent.detected`` / ``nlp.intent.detect.rasa`` out), interleaved so both see the same
machine load, on two paths: accepted answers and misses (which also commit to the teacher queue).
Then the queue alone: ``put`` with ``synchronous=FULL`` and ``NORMAL``, and draining to a loopback
teacher endpoint. All state goes to a temporary directory.

    python -m tools.bench_bridge [--requests 500] [--queue-items 2000] [--out bench_out/bridge.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from adaos_bridge.bridge import Bridge
from adaos_bridge.bus import BusEvent, InMemoryBus
from adaos_bridge.config import load_bridge_config
from adaos_bridge.delivery import Deliverer, HttpTeacherSink
from adaos_bridge.queue import SqliteQueue
from tools.bench_http import MODEL_PATH, REGEX_PATH, free_port, percentile, summarize, wait_healthy

REPO = Path(__file__).resolve().parent.parent
OUTCOMES = ("nlp.intent.detected", "nlp.intent.detect.rasa", "nlp.intent.not_obtained")


class Waiter:
    """Resolves a future per request id when the bridge's answer event arrives."""

    def __init__(self) -> None:
        self.futures: dict[str, asyncio.Future[str]] = {}

    async def __call__(self, event: BusEvent) -> None:
        fut = self.futures.pop(str(event.payload.get("request_id")), None)
        if fut is not None and not fut.done():
            fut.set_result(event.type)


async def _direct(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    async with session.post(url + "/parse", json=body) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"/parse answered {resp.status}")
    return (time.perf_counter() - t0) * 1000.0


async def _via_bridge(bus: InMemoryBus, waiter: Waiter, body: dict[str, Any]) -> tuple[float, str]:
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    waiter.futures[body["request_id"]] = fut
    t0 = time.perf_counter()
    bus.publish_nowait("nlp.intent.detect.neural", body, source="bench")
    outcome = await asyncio.wait_for(fut, 30)
    return (time.perf_counter() - t0) * 1000.0, outcome


async def overhead(url: str, state: Path, texts: list[str], count: int, tag: str) -> dict[str, Any]:
    """Interleaved direct and bridged calls for one set of utterances."""
    cfg = load_bridge_config(env={}, overrides={"service_url": url, "state_dir": str(state / tag)})
    bus = InMemoryBus()
    waiter = Waiter()
    for t in OUTCOMES:
        await bus.subscribe(t, waiter)
    bridge = Bridge(cfg, bus)
    await bridge.start()
    direct: list[float] = []
    bridged: list[float] = []
    seen: dict[str, int] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(count + 20):  # the first 20 warm both paths up
                text = texts[i % len(texts)]
                body = {"text": text, "webspace_id": "desktop", "request_id": f"d{i}"}
                d = await _direct(session, url, body)
                b, outcome = await _via_bridge(bus, waiter, {"text": text, "request_id": f"{tag}{i}"})
                if i >= 20:
                    direct.append(d)
                    bridged.append(b)
                    seen[outcome] = seen.get(outcome, 0) + 1
    finally:
        await bridge.close()
    diffs = [b - d for b, d in zip(bridged, direct, strict=True)]
    return {
        "direct": summarize(direct),
        "bridge": summarize(bridged),
        "added_p50_ms": round(percentile(bridged, 50) - percentile(direct, 50), 3),
        "added_p99_ms": round(percentile(bridged, 99) - percentile(direct, 99), 3),
        "paired_diff": summarize(diffs),
        "outcomes": seen,
    }


async def queue_puts(path: Path, items: int, sync: str) -> float:
    """Sequential committed puts per second."""
    q = SqliteQueue(path, max_items=items + 1, sync=sync)
    await q.open()
    body = {"text": "непонятная просьба", "reason": "neural_abstained", "alternatives": [], "ts": 0.0}
    t0 = time.perf_counter()
    for i in range(items):
        await q.put(f"k{i}", body)
    rate = items / (time.perf_counter() - t0)
    await q.close()
    return rate


async def queue_drain(path: Path, items: int) -> float:
    """Items per second from a full queue to a loopback teacher endpoint."""
    got: list[str] = []

    async def teacher(request: web.Request) -> web.Response:
        got.append(request.headers["Idempotency-Key"])
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/t", teacher)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    q = SqliteQueue(path, max_items=items + 1, sync="full")
    await q.open()
    for i in range(items):
        await q.put(f"k{i}", {"text": f"miss {i}"})
    deliverer = Deliverer(q, HttpTeacherSink(f"http://127.0.0.1:{port}/t", "token"), batch=64, parallel=8)
    t0 = time.perf_counter()
    deliverer.start()
    while q.pending:
        await asyncio.sleep(0.005)
    rate = items / (time.perf_counter() - t0)
    await deliverer.stop()
    await q.close()
    await runner.cleanup()
    if len(set(got)) != items:
        raise RuntimeError(f"delivered {len(set(got))} of {items}")
    return rate


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the service, measure, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAOS_")}
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        state = Path(tmp)
        env["ADAOS_STATE_DIR"] = str(state / "service")
        cmd = [sys.executable, "-m", "skill", "--port", str(port), "--log-level", "WARNING"]
        proc = subprocess.Popen(cmd, env=env, cwd=REPO)
        try:
            await wait_healthy(url, proc, 30.0)
            async with aiohttp.ClientSession() as session, session.get(url + "/health") as resp:
                health = await resp.json()
            accepted = await overhead(url, state, REGEX_PATH, args.requests, "acc")
            misses = await overhead(url, state, MODEL_PATH, args.requests, "miss")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        puts_full = await queue_puts(state / "q-full.sqlite3", args.queue_items, "full")
        puts_normal = await queue_puts(state / "q-normal.sqlite3", args.queue_items, "normal")
        drain = await queue_drain(state / "q-drain.sqlite3", args.queue_items)
    return {
        "model_id": health.get("model_id"),
        "cpu_count": os.cpu_count(),
        "accepted_path": accepted,
        "miss_path": misses,
        "queue": {
            "items": args.queue_items,
            "put_per_s_sync_full": round(puts_full, 1),
            "put_per_s_sync_normal": round(puts_normal, 1),
            "deliver_per_s_http_loopback": round(drain, 1),
        },
        "command": "python -m tools.bench_bridge " + " ".join(sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench_bridge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=500, help="timed requests per path (max 20000)")
    parser.add_argument("--queue-items", type=int, default=2000, help="items for the queue runs (max 100000)")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    args.requests = max(10, min(args.requests, 20000))
    args.queue_items = max(10, min(args.queue_items, 100_000))
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
