"""Model switches under live traffic: requests failed and p99 while the pointer flips.

Starts ``python -m skill`` on a loopback port with a temporary model root holding two versions
(the active model and a copy of it registered under a second id, unless ``--b`` names another
version folder), drives ``/parse`` from N concurrent clients, first without switches, then while
the pointer is flipped K times. Bounded in count and time.

    python -m tools.bench_switch [--clients 50] [--switches 20] [--out bench_out/switch.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from skill.artifacts import read_manifest, write_manifest
from skill.config import load_config
from skill.registry import resolve_model_dir, write_pointer
from tools.bench_http import MODEL_PATH, REGEX_PATH, free_port, percentile, rss_mb, wait_healthy

REPO = Path(__file__).resolve().parent.parent


def second_version(src: Path, root: Path, suffix: str = "switch") -> str:
    """Register a copy of ``src`` under a new id (same bytes, its own manifest)."""
    man = read_manifest(src)
    new_id = f"{man.model_id}-{suffix}"
    shutil.copytree(src, root / new_id)
    (root / new_id / "manifest.json").unlink()
    write_manifest(
        root / new_id,
        model_id=new_id,
        created=man.created,
        data_digest=man.data_digest,
        seed=man.seed,
        code_version=man.code_version,
        parent=man.model_id,
        metrics=man.metrics,
        thresholds=man.thresholds,
    )
    return new_id


async def drive(url: str, clients: int, seconds: float, cap: int) -> dict[str, Any]:
    """``clients`` loops posting mixed utterances for ``seconds`` (at most ``cap`` requests each)."""
    texts = REGEX_PATH + MODEL_PATH
    lat: list[float] = []
    failed: list[str] = []
    models: dict[str, int] = {}
    stop = time.monotonic() + seconds

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        n = 0
        while time.monotonic() < stop and n < cap:
            t0 = time.perf_counter()
            try:
                async with session.post(url + "/parse", json={"text": texts[(i + n) % len(texts)]}) as resp:
                    body = await resp.json()
                    ok = resp.status == 200 and body.get("ok") is True
            except (TimeoutError, aiohttp.ClientError) as exc:
                ok, body = False, {"error": repr(exc)}
            lat.append((time.perf_counter() - t0) * 1000.0)
            if not ok:
                failed.append(str(body)[:200])
            else:
                models[str(body.get("model_id"))] = models.get(str(body.get("model_id")), 0) + 1
            n += 1

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    return {
        "requests": len(lat),
        "failed": len(failed),
        "failures": failed[:5],
        "p50_ms": round(percentile(lat, 50), 2) if lat else None,
        "p99_ms": round(percentile(lat, 99), 2) if lat else None,
        "by_model": models,
    }


async def flipper(root: Path, ids: list[str], switches: int, interval: float) -> list[float]:
    """Flip the pointer ``switches`` times; returns the flip times."""
    times = []
    for k in range(switches):
        await asyncio.sleep(interval)
        write_pointer(root, ids[(k + 1) % 2], who="bench_switch", why=f"switch {k + 1}")
        times.append(time.monotonic())
    return times


async def sample_rss(pid: int, samples: list[float], every: float = 0.5) -> None:
    """Append the service's RSS (MiB) every ``every`` seconds until cancelled."""
    while True:
        samples.append(rss_mb(pid))
        await asyncio.sleep(every)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set up the root, start the service, measure both phases."""
    cfg = load_config()
    src = Path(args.a) if args.a else resolve_model_dir(cfg.model_roots(), None)
    if src is None:
        raise SystemExit("no active model to switch from: train one or pass --a")
    tmp = Path(tempfile.mkdtemp(prefix="nlu-switch-"))
    root = tmp / "models"
    root.mkdir()
    shutil.copytree(src, root / src.name)
    b_id = Path(args.b).name if args.b else second_version(src, root)
    if args.b:
        shutil.copytree(args.b, root / b_id)
    ids = [src.name, b_id]
    write_pointer(root, ids[0], who="bench_switch", why="setup")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAOS_")}
    env["ADAOS_LOGS_DIR"] = str(tmp / "logs")
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    cmd = [
        sys.executable,
        "-m",
        "skill",
        "--port",
        str(port),
        "--models-dir",
        str(root),
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    rss: dict[str, float] = {}
    samples: list[float] = []
    try:
        await wait_healthy(url, proc, 30.0)
        await drive(url, args.clients, 2.0, 200)  # warm-up
        rss["after_warmup"] = rss_mb(proc.pid)
        steady = await drive(url, args.clients, args.seconds, 100_000)
        rss["after_steady_phase"] = rss_mb(proc.pid)
        interval = args.seconds / (args.switches + 1)
        sampler = asyncio.create_task(sample_rss(proc.pid, samples))
        flips, switching = await asyncio.gather(
            flipper(root, ids, args.switches, interval), drive(url, args.clients, args.seconds, 100_000)
        )
        await asyncio.sleep(2.0)  # let the last reload settle
        sampler.cancel()
        rss["after_switches"] = rss_mb(proc.pid)
        rss["max_while_switching"] = max(samples, default=float("nan"))
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as resp:
            health = await resp.json()
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "clients": args.clients,
        "switches": len(flips),
        "versions": ids,
        "without_switches": steady,
        "with_switches": switching,
        "reloads_total": health.get("reloads_total"),
        "refusals_total": health.get("refusals_total"),
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "service_env": args.env,
        "exit_code_after_sigterm": code,
        "command": "python -m tools.bench_switch " + " ".join(sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench_switch", description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase (max 300)")
    parser.add_argument("--a", help="version folder A (default: the active model)")
    parser.add_argument("--b", help="version folder B (default: a copy of A under a second id)")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the service"
    )
    args = parser.parse_args(argv)
    args.clients = max(1, min(args.clients, 200))
    args.seconds = max(2.0, min(args.seconds, 300.0))
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if report["with_switches"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
