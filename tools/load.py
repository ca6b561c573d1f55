"""Load and soak ``/parse`` over loopback: rising concurrency, latency percentiles, errors, memory over time.

Starts ``python -m skill`` on a free loopback port (or drives ``--url``, which must be loopback), warms
it up, then either

* steps through rising concurrency (default 1, 2, 4, ... 128), each step bounded by ``--step-seconds``
  and ``--step-requests``, reporting throughput, p50 / p99 / p99.9 latency, errors and the service's
  resident memory; or
* with ``--soak SECONDS`` holds one concurrency for that long and samples the resident memory every
  ``--sample-every`` seconds, to show that it does not grow.

Utterances are real and mixed: the catalog's examples, negatives and out-of-scope phrases plus test
rows of the shared benchmark files when they are there. With ``--novel-words`` every request has one
word replaced by a made-up word it never had before (in the text's script), as a home hears new names
and typos for months: the soak then shows whether per-word caches keep memory bounded. Every loop is
bounded in count and time and stops by itself; nothing but 127.0.0.0/8 / ::1 is ever contacted.

    python -m tools.load                       # concurrency steps, ~2 minutes
    python -m tools.load --soak 600            # 10-minute soak
    python -m tools.load --soak 600 --rate 150 # the same, paced (kind to a shared machine)
    python -m tools.load --steps 1,8 --step-seconds 3 --out /tmp/load.json
    python -m tools.load --soak 300 --novel-words  # every request brings a word never seen before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from skill.catalog import load_catalog
from skill.security import is_loopback
from tools.bench_http import free_port, rss_mb, wait_healthy

REPO = Path(__file__).resolve().parent.parent
SHARED_BENCH = REPO.parent / "shared" / "bench"
DEFAULT_STEPS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_SOAK_S = 3600.0
MAX_REQUESTS = 5_000_000  # hard cap on any one phase, whatever the flags say


def utterances(catalog_dir: Path, bench_rows: int = 300, seed: int = 7) -> list[str]:
    """Real, mixed utterances: catalog examples / negatives / out-of-scope, plus benchmark test rows."""
    catalog = load_catalog(catalog_dir)
    texts: list[str] = []
    for intent in catalog.intents.values():
        for group in (intent.examples, intent.negatives):
            for items in group.values():
                texts.extend(items)
        texts.extend(g.text for g in intent.golden)
    for items in catalog.out_of_scope.values():
        texts.extend(items)
    rng = random.Random(seed)
    for name in ("reference_ru.jsonl", "clinc150.jsonl"):
        path = SHARED_BENCH / name
        if not path.is_file():
            continue
        rows = []
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                if row.get("split") == "test":
                    rows.append(str(row["text"]))
        texts.extend(rng.sample(rows, min(bench_rows, len(rows))))
    texts = [t for t in dict.fromkeys(texts) if t.strip() and len(t) <= 1000]
    rng.shuffle(texts)
    return texts


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not ordered:
        return float("nan")
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil without floats drifting
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Phase:
    """What one phase (a concurrency step, warm-up or soak) measured."""

    name: str
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds since phase start, MiB)

    def summary(self) -> dict[str, Any]:
        """Throughput, latency percentiles, errors and memory of the phase."""
        ordered = sorted(self.latencies_ms)
        ok = len(ordered)
        err = sum(self.errors.values())
        rss = [m for _, m in self.rss_mb]
        return {
            "phase": self.name,
            "concurrency": self.concurrency,
            "requests": ok + err,
            "ok": ok,
            "errors": err,
            "error_kinds": dict(self.errors),
            "seconds": round(self.seconds, 2),
            "throughput_rps": round((ok + err) / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(percentile(ordered, 50), 2),
            "p99_ms": round(percentile(ordered, 99), 2),
            "p99_9_ms": round(percentile(ordered, 99.9), 2),
            "max_ms": round(ordered[-1], 2) if ordered else float("nan"),
            "mean_ms": round(statistics.fmean(ordered), 2) if ordered else float("nan"),
            "rss_mb_start": round(rss[0], 1) if rss else None,
            "rss_mb_end": round(rss[-1], 1) if rss else None,
            "rss_mb_max": round(max(rss), 1) if rss else None,
        }


class Target:
    """The service under load: a process we started (pid known) or a loopback URL."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes] | None, pid: int | None) -> None:
        self.url = url
        self.proc = proc
        self.pid = pid

    def rss(self) -> float | None:
        """Resident memory of the service in MiB (None when we do not know its pid)."""
        if self.pid is None:
            return None
        try:
            return rss_mb(self.pid)
        except OSError:
            return None


async def _sample_memory(target: Target, phase: Phase, every: float, stop: asyncio.Event) -> None:
    start = time.monotonic()
    while True:
        value = target.rss()
        if value is not None:
            phase.rss_mb.append((round(time.monotonic() - start, 2), value))
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
            return
        except TimeoutError:
            continue


_CYRILLIC = "бвгджзклмнпрстфхцчшщаеиоуыэюя"
_LATIN = "bcdfghjklmnpqrstvwxzaeiouy"


def novel_word(n: int, cyrillic: bool) -> str:
    """The ``n``-th made-up word (``n`` >= 0 written in the alphabet's base, at least 6 letters)."""
    abc = _CYRILLIC if cyrillic else _LATIN
    letters = []
    n += len(abc) ** 5  # six letters at least: no short real word by accident
    while n:
        n, d = divmod(n, len(abc))
        letters.append(abc[d])
    return "".join(letters)


def with_novel_word(text: str, n: int) -> str:
    """``text`` with one of its words (the ``n % words``-th) replaced by :func:`novel_word` ``n``."""
    words = text.split()
    if not words:
        return text
    at = n % len(words)
    cyrillic = any("\u0400" <= ch <= "\u04ff" for ch in text)
    words[at] = novel_word(n, cyrillic)
    return " ".join(words)


async def run_phase(
    session: aiohttp.ClientSession,
    target: Target,
    texts: list[str],
    phase: Phase,
    *,
    seconds: float,
    max_requests: int,
    sample_every: float,
    timeout_s: float,
    headers: dict[str, str],
    rate: float = 0.0,
    novel_words: bool = False,
) -> Phase:
    """``phase.concurrency`` workers post utterances until the time or the request budget is used up."""
    max_requests = min(max_requests, MAX_REQUESTS)
    deadline = time.monotonic() + seconds
    issued = 0
    stop = asyncio.Event()
    url = target.url + "/parse"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    offset = random.Random(phase.concurrency).randrange(len(texts))
    t_start = time.monotonic()

    async def worker() -> None:
        nonlocal issued
        while issued < max_requests and time.monotonic() < deadline:
            i = issued
            issued += 1
            if rate > 0:  # paced (open loop): request i is due at i / rate seconds
                due = t_start + i / rate - time.monotonic()
                if due > 0:
                    await asyncio.sleep(due)
                if time.monotonic() >= deadline:
                    break
            text = texts[(offset + i) % len(texts)]
            if novel_words:
                text = with_novel_word(text, i)
            body = {"text": text, "request_id": f"load-{phase.name}-{i}"}
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=body, headers=headers, timeout=timeout) as resp:
                    data = await resp.read()
                    status = resp.status
            except TimeoutError:
                phase.errors["timeout"] += 1
                continue
            except aiohttp.ClientError as exc:
                phase.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.01)  # a refused connection must not spin
                continue
            elapsed = (time.perf_counter() - t0) * 1000.0
            if status != 200 or not data.startswith(b'{"ok":true'):
                phase.errors[f"http_{status}"] += 1
            else:
                phase.latencies_ms.append(elapsed)

    sampler = asyncio.create_task(_sample_memory(target, phase, sample_every, stop))
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(phase.concurrency)))
    phase.seconds = time.monotonic() - started
    stop.set()
    await sampler
    value = target.rss()
    if value is not None:
        phase.rss_mb.append((round(phase.seconds, 2), value))
    return phase


def memory_verdict(samples: list[tuple[float, float]], tolerance_mb: float) -> dict[str, Any]:
    """Start / end resident memory (median of the first / last tenth of the samples) and the trend."""
    values = [m for _, m in samples]
    if len(values) < 4:
        return {"samples": len(values), "stable": None}
    tenth = max(1, len(values) // 10)
    start = statistics.median(values[:tenth])
    end = statistics.median(values[-tenth:])
    half = samples[len(samples) // 2 :]
    xs = [t / 60.0 for t, _ in half]
    ys = [m for _, m in half]
    slope = 0.0
    if len(half) >= 2 and max(xs) > min(xs):
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    growth = end - start
    return {
        "samples": len(values),
        "rss_mb_start": round(start, 1),
        "rss_mb_end": round(end, 1),
        "rss_mb_min": round(min(values), 1),
        "rss_mb_max": round(max(values), 1),
        "growth_mb": round(growth, 1),
        "slope_mb_per_min_second_half": round(slope, 3),
        "tolerance_mb": tolerance_mb,
        "stable": growth <= tolerance_mb,
    }


async def scrape_audit(
    session: aiohttp.ClientSession, target: Target, headers: dict[str, str]
) -> dict[str, float]:
    """The service's audit-log counters from /metrics (written / dropped / failed)."""
    out: dict[str, float] = {}
    try:
        async with session.get(target.url + "/metrics", headers=headers) as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return out
    for line in text.splitlines():
        if line.startswith("nlu_audit_records_total{"):
            label = line.split('result="', 1)[1].split('"', 1)[0]
            out[label] = float(line.rsplit(" ", 1)[1])
    return out


def start_service(args: argparse.Namespace, workdir: Path) -> Target:
    """``python -m skill`` on a free loopback port; state and logs in ``workdir`` (never the work tree)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADAOS_", "NLU_"))}
    env["ADAOS_STATE_DIR"] = str(workdir / "state")
    env["ADAOS_LOGS_DIR"] = str(workdir / "logs")
    cmd = [
        sys.executable,
        "-m",
        "skill",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "WARNING",
    ]
    if args.models_dir:
        cmd += ["--models-dir", args.models_dir]
    log = (workdir / "service.log").open("ab")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return Target(f"http://127.0.0.1:{port}", proc, proc.pid)


def stop_service(target: Target, timeout: float = 30.0) -> int | None:
    """SIGTERM, wait for the drain; SIGKILL only if it hangs. Returns the exit code."""
    if target.proc is None:
        return None
    target.proc.send_signal(signal.SIGTERM)
    try:
        return target.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        target.proc.kill()
        target.proc.wait(timeout=10)
        return -9


def _print_phase(s: dict[str, Any]) -> None:
    print(
        f"{s['phase']:>10} c={s['concurrency']:<4} n={s['requests']:<7} err={s['errors']:<4} "
        f"{s['throughput_rps']:>8.1f} rps  p50={s['p50_ms']:>7.2f}  p99={s['p99_ms']:>8.2f}  "
        f"p99.9={s['p99_9_ms']:>8.2f} ms  rss={s['rss_mb_end']} MiB",
        flush=True,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start (or attach), warm up, run the steps or the soak, stop; the report as a dict."""
    texts = utterances(Path(args.catalog_dir))
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    with tempfile.TemporaryDirectory(prefix="nlu-load-") as tmp:
        if args.url:
            target = Target(args.url.rstrip("/"), None, args.pid)
        else:
            target = start_service(args, Path(tmp))
        report: dict[str, Any] = {
            "command": "python -m tools.load " + " ".join(sys.argv[1:]),
            "utterances": len(texts),
            "cpu_count": os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        }
        try:
            ready_s = await wait_healthy(target.url, target.proc, 120.0) if target.proc else 0.0
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.get(target.url + "/health", headers=headers) as resp:
                    health = await resp.json()
                report.update(
                    model_id=health.get("model_id"),
                    model_loaded=health.get("model_loaded"),
                    seconds_to_health=round(ready_s, 2),
                    rss_mb_after_start=target.rss(),
                )
                common = {
                    "sample_every": args.sample_every,
                    "timeout_s": args.timeout,
                    "headers": headers,
                }
                warm = await run_phase(
                    session,
                    target,
                    texts,
                    Phase("warmup", 2),
                    seconds=args.warmup_seconds,
                    max_requests=args.warmup_requests,
                    **common,
                )
                _print_phase(warm.summary())
                report["warmup"] = warm.summary()
                if args.soak:
                    soak = await run_phase(
                        session,
                        target,
                        texts,
                        Phase("soak", args.soak_concurrency),
                        seconds=args.soak,
                        max_requests=args.max_requests,
                        rate=args.rate,
                        novel_words=args.novel_words,
                        **common,
                    )
                    summary = soak.summary()
                    _print_phase(summary)
                    report["soak"] = {
                        **summary,
                        "memory": memory_verdict(soak.rss_mb, args.memory_tolerance_mb),
                        "rss_timeline": [(t, round(m, 1)) for t, m in soak.rss_mb],
                    }
                else:
                    steps = []
                    for c in args.steps:
                        phase = await run_phase(
                            session,
                            target,
                            texts,
                            Phase(f"step-{c}", c),
                            seconds=args.step_seconds,
                            max_requests=args.step_requests,
                            **common,
                        )
                        summary = phase.summary()
                        _print_phase(summary)
                        steps.append(summary)
                        if summary["requests"] and summary["errors"] / summary["requests"] > 0.05:
                            break  # past the breaking point: do not hammer it further
                    report["steps"] = steps
                    clean = [s for s in steps if s["errors"] == 0 and s["ok"] > 0]
                    best = max(clean, key=lambda s: s["concurrency"]) if clean else None
                    report["highest_clean_concurrency"] = (
                        {
                            k: best[k]
                            for k in ("concurrency", "throughput_rps", "p50_ms", "p99_ms", "p99_9_ms")
                        }
                        if best
                        else None
                    )
                report["audit"] = await scrape_audit(session, target, headers)
                report["rss_mb_at_end"] = target.rss()
        finally:
            report["exit_code_after_sigterm"] = stop_service(target)
        report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def _steps(value: str) -> list[int]:
    steps = [int(v) for v in value.split(",") if v.strip()]
    if not steps or any(not 1 <= s <= 512 for s in steps):
        raise argparse.ArgumentTypeError("steps are concurrencies between 1 and 512")
    return steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; every limit is clamped so a run always ends by itself."""
    p = argparse.ArgumentParser(
        prog="python -m tools.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="drive a running service on loopback instead of starting one")
    p.add_argument("--pid", type=int, help="with --url: the service's pid, for its resident memory")
    p.add_argument(
        "--token", default=os.environ.get("NLU_API_TOKEN"), help="bearer token, if the service needs one"
    )
    p.add_argument("--models-dir", help="model root for the started service (default: the embedded models)")
    p.add_argument("--catalog-dir", default=str(REPO / "catalog"), help="where the utterances come from")
    p.add_argument("--steps", type=_steps, default=list(DEFAULT_STEPS), help="concurrency steps, e.g. 1,4,16")
    p.add_argument("--step-seconds", type=float, default=10.0, help="time per step (max 300)")
    p.add_argument("--step-requests", type=int, default=20_000, help="requests per step at most")
    p.add_argument("--warmup-seconds", type=float, default=5.0)
    p.add_argument("--warmup-requests", type=int, default=300)
    p.add_argument(
        "--soak", type=float, default=0.0, help="soak for this many seconds (max 3600) instead of steps"
    )
    p.add_argument("--soak-concurrency", type=int, default=8)
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="soak: at most this many requests per second (0 = as fast as the workers go)",
    )
    p.add_argument("--max-requests", type=int, default=2_000_000, help="soak request budget")
    p.add_argument(
        "--novel-words",
        action="store_true",
        help="soak: one word of every request replaced by a made-up word never sent before",
    )
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument(
        "--memory-tolerance-mb",
        type=float,
        default=16.0,
        help="soak verdict: end minus start resident memory allowed",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    if args.url:
        host = urlsplit(args.url).hostname or ""
        if not (host == "localhost" or is_loopback(host)):
            p.error(f"--url must be a loopback address, not {host!r}")
    args.step_seconds = max(0.5, min(args.step_seconds, 300.0))
    args.soak = max(0.0, min(args.soak, MAX_SOAK_S))
    args.soak_concurrency = max(1, min(args.soak_concurrency, 512))
    args.sample_every = max(0.2, min(args.sample_every, 60.0))
    args.rate = max(0.0, args.rate)
    args.warmup_seconds = max(0.0, min(args.warmup_seconds, 120.0))
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: prints one line per phase and the JSON report; exit 1 on errors or memory growth."""
    args = parse_args(argv)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    failed = report.get("exit_code_after_sigterm") not in (0, None)
    if "soak" in report:
        failed |= report["soak"]["errors"] > 0 or report["soak"]["memory"].get("stable") is False
    else:
        failed |= report.get("highest_clean_concurrency") is None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
