"""Evaluate a model version through the real pipeline: golden cases and the catalog's held-out split.

python -m tools.eval [--model-dir DIR] [--catalog catalog] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from skill.canonicalize import Canonicalizer
from skill.catalog import Catalog, load_catalog
from skill.gate import GateConfig
from skill.pipeline import Pipeline
from skill.ranker import Ranker
from skill.regex_stage import RegexStage
from tools import metrics
from tools.slot_metrics import SlotScores, gold_spans, norm_text, predicted_spans


class GoldenFailure(msgspec.Struct, frozen=True):
    """A golden case the pipeline got wrong."""

    text: str
    expected_intent: str
    expected_slots: dict[str, str | list[str]]
    got_intent: str | None
    got_slots: dict[str, Any]
    decision: str


class EvalReport(msgspec.Struct, frozen=True):
    """Quality of one model version on the catalog's evaluation data."""

    model_id: str
    n: int
    accuracy: float
    ece: float
    per_intent: dict[str, float]  # recall of each intent on the held-out split
    golden_total: int
    golden_failures: list[GoldenFailure]
    slots: dict[str, Any] = msgspec.field(default_factory=dict)  # span P / R / F1, per slot too


def build_pipeline(catalog: Catalog, model_dir: Path, threads: int = 1) -> Pipeline:
    """The same pipeline ``/parse`` serves, for one model version."""
    ranker = Ranker.load(model_dir, threads=threads)
    return Pipeline(
        catalog,
        Canonicalizer(catalog),
        regex=RegexStage(catalog),
        ranker=ranker,
        gate_config=GateConfig(**ranker.thresholds),
    )


def golden_failures(pipeline: Pipeline, catalog: Catalog) -> tuple[int, list[GoldenFailure]]:
    """Every golden case must be accepted with its intent and at least its expected slots."""
    total, failures = 0, []
    for name, intent in catalog.intents.items():
        for case in intent.golden:
            total += 1
            res = pipeline.parse(case.text, case.locale)
            d = res.decision
            slots_ok = all(d.slots.get(k) == v for k, v in case.slots.items())
            if d.intent != name or d.outcome.value != "accept" or not slots_ok:
                failures.append(
                    GoldenFailure(case.text, name, dict(case.slots), d.intent, dict(d.slots), d.outcome.value)
                )
    return total, failures


def unmarked_entity_spans(
    catalog: Catalog, intent_name: str, canonical: Any, marked: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Gold spans for what the example did not mark but canonicalization found: registry names and
    parsed values of a slot the row's intent declares (the catalog's older examples mark only open
    spans, and registry names "are spans too"). Skipped where the row marks that slot or the text
    overlaps a marked span; a ``multiple`` slot takes every value, any other slot the first."""
    intent = catalog.intents.get(intent_name)
    if intent is None or canonical is None:
        return []
    marked_slots = {g["slot"] for g in marked}
    marked_text = [norm_text(g["text"]) for g in marked]
    out: list[dict[str, Any]] = []
    for name, spec in intent.slots.items():
        if name in marked_slots:
            continue
        for ent in canonical.entities:
            if ent.placeholder != (spec.source or name):
                continue
            text = norm_text(ent.text)
            if any(text in m or m in text for m in marked_text if m):
                continue
            out.append({"slot": name, "text": ent.text, "value": None})
            if not spec.multiple:
                break
    return out


def evaluate(pipeline: Pipeline, catalog: Catalog, rows: Sequence[Any]) -> EvalReport:
    """Accuracy, calibration error and per-intent recall on ``rows`` (``text, intent, locale``)."""
    golds, preds, confs, correct = [], [], [], []
    spans = SlotScores()
    for row in rows:
        res = pipeline.parse(row.text, row.locale or None)
        d = res.decision
        if row.intent != metrics.OOS and getattr(row, "spans", None) is not None:
            intent = catalog.intents.get(d.intent or "")
            sources = {n: (s.source or n) for n, s in intent.slots.items()} if intent else {}
            gold = gold_spans(row.text, [{"start": a, "end": b, "slot": n} for a, b, n in row.spans])
            gold += unmarked_entity_spans(catalog, row.intent, res.canonical, gold)
            spans.add(predicted_spans(d.slots, d.evidence, sources), gold)
        golds.append(row.intent)
        preds.append(d.intent)
        confs.append(d.confidence if d.intent else 0.0)
        correct.append(row.intent != metrics.OOS and d.intent == row.intent)
    inscope = [i for i, g in enumerate(golds) if g != metrics.OOS]
    acc = metrics.accuracy([golds[i] for i in inscope], [preds[i] for i in inscope]) or 0.0
    ece = metrics.expected_calibration_error(metrics.reliability(confs, correct)) or 0.0
    per = metrics.per_intent([golds[i] for i in inscope], [preds[i] for i in inscope])
    total, failures = golden_failures(pipeline, catalog)
    return EvalReport(
        model_id=pipeline.model_id or "",
        n=len(rows),
        accuracy=acc,
        ece=ece,
        per_intent={k: v.recall for k, v in sorted(per.items())},
        golden_total=total,
        golden_failures=failures,
        slots=spans.report(),
    )


def evaluate_model(model_dir: Path, catalog: Catalog) -> EvalReport:
    """Evaluate one version on the catalog's golden cases and held-out split."""
    from tools.train import rows_from_catalog  # noqa: PLC0415 - keeps torch out of the import path

    _, val = rows_from_catalog(catalog)
    return evaluate(build_pipeline(catalog, model_dir), catalog, val)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    from skill.config import load_config  # noqa: PLC0415
    from skill.registry import resolve_model_dir  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m tools.eval", description=__doc__)
    parser.add_argument("--model-dir", help="model folder (default: the active model)")
    parser.add_argument("--catalog", default=None, help="catalog directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    cfg = load_config()
    catalog = load_catalog(args.catalog or cfg.catalog_dir)
    model_dir = Path(args.model_dir) if args.model_dir else resolve_model_dir(cfg.model_roots(), cfg.model_id)
    if model_dir is None:
        print("no model: pass --model-dir or activate one", file=sys.stderr)
        return 2
    report = evaluate_model(model_dir, catalog)
    if args.json:
        print(json.dumps(msgspec.to_builtins(report), indent=2, ensure_ascii=False))
    else:
        print(
            f"{report.model_id}: accuracy {report.accuracy:.4f} on {report.n} rows, ECE {report.ece:.4f}, "
            f"golden {report.golden_total - len(report.golden_failures)}/{report.golden_total}"
        )
        by_slot = report.slots.get("slot_f1_by_slot") or {}
        if by_slot:
            print(
                f"  slots: P {report.slots['slot_precision']}, R {report.slots['slot_recall']}, "
                f"F1 {report.slots['slot_f1']}; F1 by slot: "
                + ", ".join(f"{k} {v['f1']}" for k, v in by_slot.items())
            )
        for f in report.golden_failures:
            print(
                f"  golden FAIL: {f.text!r} expected {f.expected_intent} {f.expected_slots}, "
                f"got {f.got_intent} {f.got_slots} ({f.decision})"
            )
    return 0 if not report.golden_failures else 1


if __name__ == "__main__":
    sys.exit(main())
