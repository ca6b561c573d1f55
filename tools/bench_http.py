"""Latency of ``/parse`` over loopback HTTP against a freshly started service process.

Starts ``python -m skill`` on a free loopback port, measures the time until ``/health`` answers 200,
the process's resident memory after start, then per-request latency (sequential, after warm-up)
for regex-path and model-path utterances. Loopback only; bounded in count and time.

    python -m tools.bench_http [--requests 2000] [--out bench_out/http.json]
    python -m tools.bench_http --segments [--config FILE]   # single vs two-request utterances

``--segments`` adds the conversation layer's case: the same requests said one per utterance and two
per utterance (``segments`` in the answer). ``--config`` is passed to the service (e.g. a file with
``segment_max_cuts: 0`` and ``session_ttl_s: 0`` for the layer's split search and context turned off).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

REGEX_PATH = [
    "поставь будильник на 7:30",
    "turn off the kitchen light",
    "открой маркетплейс",
    "what time is it",
    "выключи свет на кухне",
    "сколько времени",
]
MODEL_PATH = [
    "слушай а разбуди меня завтра пораньше часиков в шесть",
    "could you make it a bit darker in the bedroom",
    "мне нужно чтобы ты запомнил мысль про отпуск",
    "whats the forecast looking like for paris",
    "вруби какую нибудь музыку повеселее",
    "i'd like to hear something funny",
]

# The conversation layer: requests one per utterance, then two per utterance (each answer is split).
SINGLE_REQUEST = [
    "выключи свет на кухне",
    "поставь будильник на семь",
    "turn off the kitchen light",
    "set an alarm for seven",
    "поставь таймер на пять минут",
    "включи музыку",
]
TWO_REQUESTS = [
    "выключи свет на кухне и поставь будильник на семь",
    "turn off the kitchen light and set an alarm for seven",
    "поставь таймер на пять минут и включи музыку",
    "set a timer for ten minutes and turn on the kitchen light",
    "сделай музыку погромче и выключи свет на кухне",
    "включи чайник, а ещё поставь будильник на восемь",
]


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident set size of a process from /proc, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[idx]


def summarize(values: list[float]) -> dict[str, float]:
    """p50 / p99 / mean in ms."""
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50), 3),
        "p99_ms": round(percentile(values, 99), 3),
        "mean_ms": round(statistics.fmean(values), 3),
    }


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], limit_s: float) -> float:
    """Seconds from now until /health answers 2xx (the process was just started)."""
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - start < limit_s:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode}")
            try:
                async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if 200 <= resp.status < 300:
                        return time.monotonic() - start
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"/health not ready within {limit_s} s")


async def measure(url: str, texts: list[str], count: int) -> tuple[list[float], dict[str, int]]:
    """Sequential requests; returns latencies (ms) and a histogram of (via, decision)."""
    lat: list[float] = []
    seen: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            text = texts[i % len(texts)]
            t0 = time.perf_counter()
            async with session.post(url + "/parse", json={"text": text}) as resp:
                body = await resp.json()
            lat.append((time.perf_counter() - t0) * 1000.0)
            if resp.status != 200:
                raise RuntimeError(f"{resp.status}: {body}")
            key = f"{body['via']}/{body['decision']}" + (
                f"/{len(body['segments'])}seg" if "segments" in body else ""
            )
            seen[key] = seen.get(key, 0) + 1
    return lat, seen


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the service, measure, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAOS_")}
    cmd = [sys.executable, "-m", "skill", "--port", str(port), "--log-level", "WARNING"]
    if args.models_dir:
        cmd += ["--models-dir", args.models_dir]
    if args.config:
        cmd += ["--config", args.config]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parent.parent)
    try:
        await wait_healthy(url, proc, 30.0)
        ready_s = time.monotonic() - t0  # from spawn, as AdaOS counts it
        rss_start = rss_mb(proc.pid)
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/health") as resp:
                health = await resp.json()
        await measure(url, REGEX_PATH + MODEL_PATH, 100)  # warm-up
        regex_lat, regex_seen = await measure(url, REGEX_PATH, args.requests)
        model_lat, model_seen = await measure(url, MODEL_PATH, args.requests)
        segments: dict[str, Any] = {}
        if args.segments:
            one_lat, one_seen = await measure(url, SINGLE_REQUEST, args.requests)
            two_lat, two_seen = await measure(url, TWO_REQUESTS, args.requests)
            segments = {
                "single_request": {**summarize(one_lat), "outcomes": one_seen},
                "two_requests": {**summarize(two_lat), "outcomes": two_seen},
                "two_over_single_p50": round(
                    summarize(two_lat)["p50_ms"] / max(1e-9, summarize(one_lat)["p50_ms"]), 3
                ),
            }
        rss_end = rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
    return {
        "model_id": health.get("model_id"),
        "seconds_to_health": round(ready_s, 3),
        "rss_mb_after_start": round(rss_start, 1),
        "rss_mb_after_run": round(rss_end, 1),
        "regex_path": {**summarize(regex_lat), "outcomes": regex_seen},
        "model_path": {**summarize(model_lat), "outcomes": model_seen},
        **({"segments": segments} if segments else {}),
        "exit_code_after_sigterm": code,
        "command": "python -m tools.bench_http " + " ".join(sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench_http", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests per path (max 20000)")
    parser.add_argument("--models-dir", help="model artifact root (default: the embedded models)")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--segments", action="store_true", help="also single vs two-request utterances")
    parser.add_argument("--config", help="config file for the service (passed as --config)")
    args = parser.parse_args(argv)
    args.requests = max(10, min(args.requests, 20000))
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
