"""Measure the LLM fallback stage: what it is worth on the rows the pipeline hands it, and what it costs.

python -m tools.bench_llm (--llm-model PATH | --tiny) [--catalog DIR] [--home-probe FILE | --no-home-probe]
                          [--requests N] [--threads N] [--budget-ms MS] [--no-cache] [--out report.json]

The rows: the catalog's held-out split and, when the file is there, ``home_probe.jsonl`` from the
shared bench folder (a test set written apart from the catalog: it is run, never tuned on). Each row
goes through the served pipeline (canonicalization, regex, the active ranker, its gate); the rows on
which the ranker abstains are handed to :meth:`skill.llm.LlmStage.decide_fallback` with the real
budget, and the pipeline's gate decides on the LLM's answer. Reported per set and over both
(top-level keys): ``rows_handed``, ``rescue_rate`` (accepted and right / handed),
``wrong_accept_rate``, ``accepted_precision``, ``p50_ms`` / ``p95_ms`` / ``p99_ms`` of the LLM calls,
with load time, prefix, tokens per call and resident memory. A row whose intent the catalog lacks
counts as out of scope: only "no answer" is right for it.

A sidecar whose calibration turned the stage off (``accept: false``) is measured as if it were on,
and ``stage_on`` says so: the service would not load it. ``--requests N`` sends at most N handed
rows per set (0 = all). ``--tiny`` writes the tests' tiny random llama model (byte vocabulary,
32-dim, 2 layers): it measures the stage's own overhead, not what a real model is worth.
``--no-cache`` also times re-evaluating the few-shot prefix, what every call would pay without the
KV cache (and what a load pays without the disk cache: ``prefix_from`` says which one it had).
"""

from __future__ import annotations

import argparse
import json
import logging
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
from skill.catalog import Catalog, load_catalog
from skill.config import load_config
from skill.decision import Outcome
from skill.gate import GateConfig
from skill.llm_prompt import LlmSettings
from skill.pipeline import Pipeline
from skill.regex_stage import RegexStage
from skill.registry import resolve_model_dir
from tools._data import OOS, Row, rows_from_catalog, rows_from_jsonl
from tools.llm_calibrate import Recorder, gold_of

_LOGGER = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
HOME_PROBE = REPO.parent / "shared" / "bench" / "home_probe.jsonl"


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else 0.0


def _usefulness(handed: int, rescued: int, wrong: int, times: list[float]) -> dict[str, Any]:
    accepted = rescued + wrong
    return {
        "rows_handed": handed,
        "rescued": rescued,
        "wrong_accepts": wrong,
        "rescue_rate": round(rescued / handed, 4) if handed else 0.0,
        "wrong_accept_rate": round(wrong / handed, 4) if handed else 0.0,
        "accepted_precision": round(rescued / accepted, 4) if accepted else None,
        "p50_ms": _pct(times, 50),
        "p95_ms": _pct(times, 95),
        "p99_ms": _pct(times, 99),
        "max_ms": round(max(times), 2) if times else 0.0,
    }


def _run_set(  # noqa: PLR0917
    pipeline: Pipeline,
    recorder: Recorder,
    rows: list[Row],
    catalog: Catalog,
    limit: int,
    skip: frozenset[str],
) -> tuple[dict[str, Any], list[float], Counter[str], list[dict[str, Any]]]:
    """Parse the rows; score what the LLM is handed and how the gate takes its answers."""
    handed = rescued = wrong = in_prefix = oos = 0
    times: list[float] = []
    outcomes: Counter[str] = Counter()
    evidence: list[dict[str, Any]] = []
    for row in rows:
        if limit and handed >= limit:
            break
        if row.text in skip:
            in_prefix += 1
            continue
        row = gold_of(row, catalog)  # noqa: PLW2901
        recorder.calls.clear()
        result = pipeline.parse(row.text, row.locale or None)
        if not recorder.calls:
            continue
        handed += 1
        oos += row.intent == OOS
        decision, ms = recorder.calls[-1][2], recorder.calls[-1][3]
        times.append(ms)
        evidence.append(decision.evidence)
        final = result.decision
        if final.via == "llm" and final.outcome is Outcome.ACCEPT:
            outcomes["accepted"] += 1
            if final.intent == row.intent:
                rescued += 1
            else:
                wrong += 1
        else:
            outcomes[decision.reason or decision.outcome.value] += 1
    report = _usefulness(handed, rescued, wrong, times) | {
        "rows": len(rows),
        "rows_in_prefix": in_prefix,
        "out_of_scope_handed": oos,
        "outcomes": dict(outcomes.most_common()),
    }
    return report, times, outcomes, evidence


def run(args: argparse.Namespace, model: Path) -> dict[str, Any]:  # noqa: PLR0914
    """Load the stage, warm it, run the sets; return the report."""
    from skill.llm import LlmStage  # noqa: PLC0415 - optional dependency
    from skill.ranker import Ranker  # noqa: PLC0415

    catalog = load_catalog(args.catalog)
    cfg = load_config(
        overrides={
            "catalog_dir": args.catalog,
            "llm_model": str(model),
            "llm_budget_ms": args.budget_ms,
            "llm_threads": args.threads,
        }
    )
    rss_start = _rss_mb()
    ranker = None
    model_dir = resolve_model_dir(cfg.model_roots())
    if model_dir is not None:
        ranker = Ranker.load(model_dir, threads=1)
    canonicalizer = Canonicalizer(catalog)
    sets: dict[str, list[Row]] = {"catalog_val": list(rows_from_catalog(catalog)[1])}
    if args.home_probe and Path(args.home_probe).is_file():
        sets["home_probe"] = rows_from_jsonl(args.home_probe)
    if not sets["catalog_val"]:
        raise ValueError("the catalog has no held-out rows to send")
    rss_ready = _rss_mb()
    sidecar = LlmSettings.for_model(model)
    served = sidecar.accept
    started = time.perf_counter()
    stage = LlmStage.load(cfg, catalog, settings=msgspec.structs.replace(sidecar, accept=True))
    load_ms = (time.perf_counter() - started) * 1000.0
    rss_loaded = _rss_mb()
    try:
        recorder = Recorder(stage)
        gate_cfg = GateConfig(**ranker.thresholds) if ranker is not None else GateConfig()
        pipeline = Pipeline(
            catalog,
            canonicalizer,
            regex=RegexStage(catalog),
            ranker=ranker,
            llm=recorder,
            gate_config=gate_cfg,
        )
        warm = sets["catalog_val"][: args.warmup]
        for row in warm:  # first calls touch the model's pages: not what a warm service pays
            stage.score(row.text, list(catalog.intents)[: stage.settings.max_candidates])
        skip = frozenset(t for t, _ in stage.prefix_examples)
        per_set: dict[str, Any] = {}
        all_times: list[float] = []
        outcomes: Counter[str] = Counter()
        evidence: list[dict[str, Any]] = []
        totals = Counter[str]()
        for name, rows in sets.items():
            one, times, outs, ev = _run_set(pipeline, recorder, rows, catalog, args.requests, skip)
            per_set[name] = one
            all_times += times
            outcomes += outs
            evidence += ev
            for key in ("rows_handed", "rescued", "wrong_accepts"):
                totals[key] += one[key]
        prefix_ms: list[float] = []
        if args.no_cache:
            for _ in range(3):
                t0 = time.perf_counter()
                stage.engine.eval_prefix(stage.engine.prefix)  # what a call would pay without the cache
                prefix_ms.append((time.perf_counter() - t0) * 1000.0)
        rss_end = _rss_mb()

        def mean(key: str) -> float | None:
            vals = [float(e[key]) for e in evidence if key in e]
            return round(float(np.mean(vals)), 1) if vals else None

        report: dict[str, Any] = _usefulness(
            totals["rows_handed"], totals["rescued"], totals["wrong_accepts"], all_times
        ) | {
            "model": model.name,
            "model_bytes": model.stat().st_size,
            "catalog_intents": len(catalog.intents),
            "catalog_digest": catalog.digest[:12],
            "ranker": ranker.model_id if ranker is not None else None,
            "threads": args.threads,
            "budget_ms": args.budget_ms,
            "settings": msgspec.to_builtins(
                msgspec.structs.replace(stage.settings, calibration=None, calibration_report=None)
            ),
            "calibrated": stage.settings.calibration is not None,
            "stage_on": served,
            "load_ms": round(load_ms, 1),
            "prefix_tokens": len(stage.engine.prefix),
            "prefix_examples": len(stage.prefix_examples),
            "prefix_from": stage.prefix_from,  # "evaluated", or "disk cache" (an earlier load's)
            "prefix_eval_ms_at_load": round(stage.prefix_ms, 1),
            "prefix_eval_ms_again": _pct(prefix_ms, 50) if prefix_ms else None,
            "requests": len(all_times),
            "warmup": len(warm),
            "mean_prompt_tokens": mean("prompt_tokens"),
            "mean_batch_tokens": mean("batch_tokens"),
            "mean_logit_rows": mean("logit_rows"),
            "outcomes": dict(outcomes.most_common()),
            "sets": per_set,
            "rss_mb": {
                "start": round(rss_start, 1),
                "ranker_and_rows_ready": round(rss_ready, 1),
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
    parser.add_argument("--home-probe", default=str(HOME_PROBE), help="bench JSONL run as a second set")
    parser.add_argument("--no-home-probe", dest="home_probe", action="store_const", const="")
    parser.add_argument("--requests", type=int, default=0, help="at most N handed rows per set (0 = all)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget-ms", type=int, default=1500, help="the service's llm_budget_ms")
    parser.add_argument("--no-cache", action="store_true", help="also time re-evaluating the prefix")
    parser.add_argument("--out", help="write the report JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.requests < 0 or args.warmup < 0 or args.budget_ms < 1:
        parser.error("--requests and --warmup must be >= 0, --budget-ms >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        if args.tiny:
            from tools.tiny_gguf import write_tiny_gguf  # noqa: PLC0415 - needs the gguf package

            model = write_tiny_gguf(Path(tmp) / "tiny-random.gguf", seed=3)
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
