"""Fit the LLM fallback's confidence on held-out requests and store it beside the GGUF file.

python -m tools.llm_calibrate --llm-model PATH [--catalog DIR] [--model-dir DIR | --no-ranker]
                              [--data FILE.jsonl] [--rows abstain|all] [--dry-run] [--json]

Rows: the catalog's held-out split (the same every-5th carve as ``tools.train``: examples, negatives
and out-of-scope rows), or the ``val`` rows of a JSONL file in the bench format whose intents are
catalog intents or ``oos``. With ``--rows abstain`` (the default) only the requests the served
pipeline hands to the LLM are used: regex misses that the gated ranker abstains on. ``--rows all``
sends every row to the LLM with the ranker's proposal, for small data or a quick look.

The model runs uncalibrated (the sidecar's temperature, no map) through :class:`skill.llm.LlmStage`,
the code ``/parse`` uses. For each answer that names an intent the tool records the features the
service computes (:func:`skill.llm_grammar.llm_features`) and whether the intent was right (an
out-of-scope row is never right), fits the logistic map, reports the raw, fitted and 2-fold
cross-fitted expected calibration error, and writes ``calibration`` and ``calibration_report`` into
``<model>.gguf.nlu.json`` (other keys are kept; the write is atomic).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from skill.canonicalize import Canonical, Canonicalizer
from skill.catalog import Catalog, load_catalog
from skill.config import load_config
from skill.decision import Decision, Outcome
from skill.fsutil import atomic_write
from skill.gate import GateConfig
from skill.llm_grammar import LLM_FEATURES, NONE, LlmSettings, llm_features, sidecar_path
from skill.pipeline import Pipeline
from skill.regex_stage import RegexStage
from skill.registry import resolve_model_dir
from tools._calib import expected_calibration_error, fit_calibration
from tools._data import OOS, DataError, Row, rows_from_catalog, rows_from_jsonl

_LOGGER = logging.getLogger(__name__)
MIN_ANSWERS = 20  # fewer named answers than this cannot support a 3-feature fit
L2 = 1.0


class Answer(msgspec.Struct, frozen=True):
    """One LLM answer on a labelled row."""

    text: str
    gold: str  # a catalog intent or "oos"
    intent: str | None  # what the LLM named ("none" included); None on timeout or error
    reason: str
    features: tuple[float, ...] | None  # LLM_FEATURES, for answers that name an intent


class _Recorder:
    """A FallbackStage wrapper: passes every call to the real stage and keeps what it decided."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage
        self.calls: list[tuple[Canonical, Decision, Decision]] = []

    def decide_fallback(self, canonical: Canonical, proposal: Decision) -> Decision:
        decision = self.stage.decide_fallback(canonical, proposal)
        self.calls.append((canonical, proposal, decision))
        return decision


def _answer(row: Row, decision: Decision) -> Answer:
    ev = decision.evidence
    if decision.intent is not None and decision.outcome is Outcome.ACCEPT:
        cands = [(c["intent"], float(c["score"])) for c in ev.get("candidates", [])]
        feats = llm_features(float(ev["probability_tempered"]), decision.intent, cands)
        return Answer(row.text, row.intent, decision.intent, "", tuple(float(v) for v in feats))
    if decision.reason == "llm_none":
        return Answer(row.text, row.intent, NONE, decision.reason, None)
    return Answer(row.text, row.intent, None, decision.reason or decision.outcome.value, None)


def collect(
    rows: Sequence[Row], catalog: Catalog, stage: Any, ranker: Any | None, *, mode: str, progress: bool = True
) -> tuple[list[Answer], int]:
    """Run the rows; return the LLM's answers and how many rows never reached it (``abstain`` mode)."""
    canonicalizer = Canonicalizer(catalog)
    gate_cfg = GateConfig(**ranker.thresholds) if ranker is not None else GateConfig()
    answers: list[Answer] = []
    skipped = 0
    recorder = _Recorder(stage)
    pipeline = Pipeline(
        catalog, canonicalizer, regex=RegexStage(catalog), ranker=ranker, llm=recorder, gate_config=gate_cfg
    )
    started = time.monotonic()
    for n, row in enumerate(rows, 1):
        if progress and n % 100 == 0:
            _LOGGER.info(
                "%d / %d rows, %d sent to the LLM, %.0f s",
                n,
                len(rows),
                len(answers),
                time.monotonic() - started,
            )
        if mode == "abstain":
            recorder.calls.clear()
            pipeline.parse(row.text, row.locale or None)
            if not recorder.calls:
                skipped += 1
                continue
            decision = recorder.calls[-1][2]
        else:
            canonical = canonicalizer.canonicalize(row.text, row.locale or None)
            proposal = (
                ranker.decide(canonical) if ranker is not None else Decision.abstain("neural", "no_ranker")
            )
            decision = stage.decide_fallback(canonical, proposal)
        answers.append(_answer(row, decision))
    return answers, skipped


def fit(answers: Sequence[Answer]) -> tuple[Any, dict[str, Any]]:
    """The calibration map and its report, from the answers that name an intent."""
    named = [a for a in answers if a.features is not None]
    if len(named) < MIN_ANSWERS:
        raise DataError(
            f"only {len(named)} LLM answers named an intent; at least {MIN_ANSWERS} are needed to fit "
            "the confidence (use more rows, or --rows all)"
        )
    x = np.asarray([a.features for a in named], dtype=np.float64)
    correct = np.asarray([a.intent == a.gold for a in named])
    raw = 1.0 / (1.0 + np.exp(-x[:, 0]))
    cal = fit_calibration(x, correct, L2, names=LLM_FEATURES)
    w, b = cal.linear()
    fitted = 1.0 / (1.0 + np.exp(-np.clip(x @ w + b, -40, 40)))
    half = np.arange(len(named)) % 2 == 0
    cross = np.zeros(len(named))
    for part in (half, ~half):
        wp, bp = fit_calibration(x[part], correct[part], L2, names=LLM_FEATURES).linear()
        cross[~part] = 1.0 / (1.0 + np.exp(-np.clip(x[~part] @ wp + bp, -40, 40)))
    nones = [a for a in answers if a.intent == NONE]
    failed = [a for a in answers if a.intent is None]
    report: dict[str, Any] = {
        "rows": len(named),
        "answers": len(answers),
        "none_answers": len(nones),
        "none_on_oos": sum(a.gold == OOS for a in nones),
        "failed": len(failed),
        "failed_reasons": sorted({a.reason for a in failed}),
        "accuracy": round(float(correct.mean()), 4),
        "mean_raw_probability": round(float(raw.mean()), 4),
        "mean_confidence": round(float(fitted.mean()), 4),
        "ece_raw": round(expected_calibration_error(raw, correct), 4),
        "ece_fit": round(expected_calibration_error(fitted, correct), 4),
        "ece_crossfit": round(expected_calibration_error(cross, correct), 4),
    }
    return cal, report


def write_sidecar(model: Path, cal: Any, report: dict[str, Any], out: Path | None = None) -> Path:
    """Merge the calibration into the sidecar (other keys kept), validate it, and replace it atomically."""
    target = out or sidecar_path(model)
    current: dict[str, Any] = {}
    if target.exists():
        current = json.loads(target.read_text(encoding="utf-8"))
        if not isinstance(current, dict):
            raise DataError(f"{target}: not a JSON object")
    current["calibration"] = msgspec.to_builtins(cal)
    current["calibration_report"] = report
    data = json.dumps(current, indent=1, ensure_ascii=False).encode() + b"\n"
    msgspec.json.decode(data, type=LlmSettings)  # what the service will read must load
    atomic_write(target, data)
    return target


def _rows(args: argparse.Namespace, catalog: Catalog) -> list[Row]:
    if args.data:
        rows = [r for r in rows_from_jsonl(args.data) if r.split == "val"]
        if not rows:
            raise DataError(f"{args.data}: no val rows (the LLM is fitted on held-out data only)")
        unknown = sorted({r.intent for r in rows if r.intent != OOS and r.intent not in catalog.intents})
        if unknown:
            raise DataError(f"{args.data}: intents not in the catalog: {', '.join(unknown[:10])}")
        return rows
    return rows_from_catalog(catalog)[1]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m tools.llm_calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--llm-model", required=True, help="the GGUF file (its sidecar gets the result)")
    parser.add_argument("--catalog", default="catalog")
    parser.add_argument("--model-dir", help="ranker version (default: the active one)")
    parser.add_argument("--no-ranker", action="store_true", help="no ranker proposals (LLM alone)")
    parser.add_argument("--data", help="bench-format JSONL; its val rows are used")
    parser.add_argument("--rows", choices=("abstain", "all"), default="abstain")
    parser.add_argument("--limit", type=int, default=0, help="at most N rows (0 = all)")
    parser.add_argument("--budget-ms", type=int, default=60000, help="per request, generous by default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the sidecar here instead of beside the model")
    parser.add_argument("--dry-run", action="store_true", help="fit and report, write nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = Path(args.llm_model).expanduser()
    try:
        catalog = load_catalog(args.catalog)
        rows = _rows(args, catalog)
        if args.limit > 0:
            rows = rows[: args.limit]
        ranker = None
        model_id = None
        if args.no_ranker and args.rows == "abstain":
            raise DataError(
                "--no-ranker sends nothing in --rows abstain mode (the ranker decides what "
                "abstains): use --rows all"
            )
        if not args.no_ranker:
            cfg = load_config(overrides={"catalog_dir": args.catalog})
            model_dir = Path(args.model_dir) if args.model_dir else resolve_model_dir(cfg.model_roots())
            if model_dir is None:
                raise DataError("no active ranker model: pass --model-dir or --no-ranker")
            from skill.ranker import Ranker  # noqa: PLC0415 - heavy import, after argument checks

            ranker = Ranker.load(model_dir, threads=args.threads)
            model_id = ranker.model_id
        from skill.llm import LlmStage  # noqa: PLC0415

        current = LlmSettings.for_model(model) if model.is_file() else LlmSettings()
        plain = msgspec.structs.replace(current, calibration=None, calibration_report=None)
        cfg = load_config(
            overrides={
                "catalog_dir": args.catalog,
                "llm_model": str(model),
                "llm_budget_ms": args.budget_ms,
                "llm_threads": args.threads,
            }
        )
        stage = LlmStage.load(cfg, catalog, settings=plain)
        try:
            answers, skipped = collect(rows, catalog, stage, ranker, mode=args.rows)
        finally:
            stage.close()
        cal, report = fit(answers)
    except (DataError, ValueError, FileNotFoundError, ImportError) as exc:
        _LOGGER.error("%s", exc)
        return 2
    report |= {
        "mode": args.rows,
        "data": args.data or f"catalog {catalog.digest[:12]} (val split)",
        "rows_in": len(rows),
        "rows_not_sent": skipped,
        "ranker": model_id,
        "temperature": plain.temperature,
        "fitted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if not args.dry_run:
        report["written_to"] = str(write_sidecar(model, cal, report, Path(args.out) if args.out else None))
    if args.json:
        print(json.dumps({"report": report, "calibration": msgspec.to_builtins(cal)}, indent=1))
    else:
        print(
            f"{report['rows']} answers named an intent ({report['none_answers']} said none, "
            f"{report['failed']} failed) of {report['answers']} sent; accuracy {report['accuracy']:.3f}\n"
            f"ECE raw {report['ece_raw']:.3f} -> fitted {report['ece_fit']:.3f} "
            f"(2-fold cross-fitted {report['ece_crossfit']:.3f}); mean confidence "
            f"{report['mean_confidence']:.3f}\n"
            + (f"written: {report['written_to']}" if not args.dry_run else "dry run")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
