"""Measure the LLM fallback stage: load, cached prefix, and per-call latency on real requests.

python -m tools.bench_llm (--llm-model PATH | --tiny) [--catalog DIR] [--requests N] [--threads N]
                          [--no-cache] [--out report.json]

The requests are the catalog's held-out utterances (canonicalized, with the active ranker's proposal
as the candidates), sent straight to :meth:`skill.llm.LlmStage.decide_fallback`, the call the
pipeline makes when the ranker abstains. One thread by default, after warm-up calls, with the budget
raised so no call is cut short. ``--tiny`` writes the tests' tiny random llama model (byte vocabulary,
32-dim, 2 layers) to a temporary folder: it measures the stage's own overhead and llama.cpp's
per-token cost at the smallest size, not what a real instruct model costs. ``--no-cache`` also
times re-evaluating the catalog prefix, which is what every call would pay without the cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from skill.canonicalize import Canonicalizer
from skill.catalog import load_catalog
from skill.config import load_config
from skill.decision import Decision
from skill.llm_grammar import LlmSettings, sidecar_path
from skill.registry import resolve_model_dir
from tools._data import rows_from_catalog

_LOGGER = logging.getLogger(__name__)


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else 0.0


def run(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    """Load the stage, warm it, time ``args.requests`` calls; return the report."""
    from skill.llm import LlmStage  # noqa: PLC0415 - optional dependency
    from skill.ranker import Ranker  # noqa: PLC0415

    catalog = load_catalog(args.catalog)
    cfg = load_config(
        overrides={
            "catalog_dir": args.catalog,
            "llm_model": str(model),
            "llm_budget_ms": 600_000,
            "llm_threads": args.threads,
        }
    )
    rss_start = _rss_mb()
    ranker = None
    model_dir = resolve_model_dir(cfg.model_roots())
    if model_dir is not None:
        ranker = Ranker.load(model_dir, threads=1)
    canonicalizer = Canonicalizer(catalog)
    rows = list(rows_from_catalog(catalog)[1])
    random.Random(0).shuffle(rows)  # every intent, not the first few in catalog order
    if not rows:
        raise ValueError("the catalog has no held-out rows to send")
    work = []
    for i in range(args.requests + args.warmup):
        row = rows[i % len(rows)]
        canonical = canonicalizer.canonicalize(row.text, row.locale or None)
        proposal = ranker.decide(canonical) if ranker is not None else Decision.abstain("neural", "no_ranker")
        work.append((canonical, proposal))
    rss_ready = _rss_mb()
    started = time.perf_counter()
    stage = LlmStage.load(cfg, catalog)
    load_ms = (time.perf_counter() - started) * 1000.0
    rss_loaded = _rss_mb()
    try:
        times: list[float] = []
        reasons: Counter[str] = Counter()
        prompt_tokens: list[int] = []
        generated: list[int] = []
        forced: list[int] = []
        for n, (canonical, proposal) in enumerate(work):
            t0 = time.perf_counter()
            decision = stage.decide_fallback(canonical, proposal)
            ms = (time.perf_counter() - t0) * 1000.0
            if n < args.warmup:
                continue
            times.append(ms)
            reasons[decision.reason or decision.outcome.value] += 1
            ev = decision.evidence
            if "prompt_tokens" in ev:
                prompt_tokens.append(int(ev["prompt_tokens"]))
                generated.append(int(ev["generated_tokens"]))
                forced.append(int(ev["forced_tokens"]))
        prefix_ms: list[float] = []
        if args.no_cache:
            for _ in range(5):
                t0 = time.perf_counter()
                stage._eval_prefix()  # noqa: SLF001 - what a call would pay without the cache
                prefix_ms.append((time.perf_counter() - t0) * 1000.0)
        rss_end = _rss_mb()
        report: dict[str, Any] = {
            "model": model.name,
            "model_bytes": model.stat().st_size,
            "catalog_intents": len(catalog.intents),
            "ranker": ranker.model_id if ranker is not None else None,
            "threads": args.threads,
            "settings": msgspec.to_builtins(
                msgspec.structs.replace(stage.settings, calibration=None, calibration_report=None)
            ),
            "calibrated": stage.settings.calibration is not None,
            "load_ms": round(load_ms, 1),
            "prefix_tokens": len(stage._prefix),  # noqa: SLF001
            "prefix_eval_ms_at_load": round(stage.prefix_ms, 1),
            "prefix_eval_ms_again": _pct(prefix_ms, 50) if prefix_ms else None,
            "requests": len(times),
            "warmup": args.warmup,
            "p50_ms": _pct(times, 50),
            "p90_ms": _pct(times, 90),
            "p99_ms": _pct(times, 99),
            "max_ms": round(max(times), 2) if times else 0.0,
            "mean_prompt_tokens": round(float(np.mean(prompt_tokens)), 1) if prompt_tokens else None,
            "mean_generated_tokens": round(float(np.mean(generated)), 1) if generated else None,
            "mean_forced_tokens": round(float(np.mean(forced)), 1) if forced else None,
            "outcomes": dict(reasons.most_common()),
            "rss_mb": {
                "start": round(rss_start, 1),
                "ranker_and_requests_ready": round(rss_ready, 1),
                "llm_loaded": round(rss_loaded, 1),
                "end": round(rss_end, 1),
            },
        }
    finally:
        stage.close()
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench_llm", description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--llm-model", help="a GGUF file (its .nlu.json sidecar applies)")
    which.add_argument("--tiny", action="store_true", help="write and measure the tests' tiny random model")
    parser.add_argument("--catalog", default="catalog")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-cache", action="store_true", help="also time re-evaluating the prefix")
    parser.add_argument("--out", help="write the report JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.requests < 1 or args.warmup < 0:
        parser.error("--requests must be >= 1 and --warmup >= 0")
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        if args.tiny:
            from tools.tiny_gguf import write_tiny_gguf  # noqa: PLC0415 - needs the gguf package

            model = write_tiny_gguf(Path(tmp) / "tiny-random.gguf", seed=3)
            # a byte vocabulary spells the repo catalog's prompt in ~4k tokens
            sidecar_path(model).write_text(json.dumps({"n_ctx": 8192}))
        else:
            model = Path(args.llm_model).expanduser()
        try:
            LlmSettings.for_model(model) if model.is_file() else None
            report = run(args, model)
        except (ValueError, FileNotFoundError, ImportError) as exc:
            _LOGGER.error("%s", exc)
            return 2
    text = json.dumps(report, indent=1, ensure_ascii=False)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
