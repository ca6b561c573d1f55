"""Fit the LLM fallback's confidence on held-out requests, decide whether it earns its place, and
store both beside the GGUF file.

python -m tools.llm_calibrate --llm-model PATH [--catalog DIR] [--model-dir DIR | --no-ranker]
                              [--data FILE.jsonl] [--rows abstain|all] [--precision-target 0.9]
                              [--dry-run] [--json]

Rows: the catalog's held-out split (the same every-5th carve as ``tools.train``: examples, negatives
and out-of-scope rows), or the ``val`` rows of a JSONL file in the bench format whose intents are
catalog intents or ``oos``. With ``--rows abstain`` (the default) only the requests the served
pipeline hands to the LLM are used: regex misses that the gated ranker abstains on. ``--rows all``
sends every row to the LLM with the ranker's proposal, for small data or a quick look. Rows that
appear in the stage's few-shot prefix are left out (``rows_in_prefix``).

The model runs uncalibrated (the sidecar's temperature, no map) through :class:`skill.llm.LlmStage`,
the code ``/parse`` uses. For each answer that names an intent the tool records the features the
service computes (:func:`skill.llm_prompt.llm_features`) and whether the intent was right (an
out-of-scope row is never right), fits the logistic map, and reports the raw, fitted and 2-fold
cross-fitted expected calibration error. The cross-fitted confidences then go through the gate the
pipeline uses (the ranker's thresholds and the catalog's per-intent ones): that gives the stage's
worth on rows its map has not seen, ``held_out``: ``rows_handed``, ``rescued``, ``rescue_rate``,
``wrong_accepts``, ``wrong_accept_rate``, ``accepted_precision``. Below ``--precision-target``, or
with nothing rescued, or when the same map without the model's features (the ranker's view
alone, ``held_out_ranker_only``) rescues as much at the target, the verdict is ``accept: false``
and the service keeps the stage off. The map,
the report and the verdict go into ``<model>.gguf.nlu.json`` (other keys are kept; atomic write).
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
from skill.decision import Candidate, Decision, Outcome
from skill.fsutil import atomic_write
from skill.gate import GateConfig, IntentPolicy, gate
from skill.llm_prompt import LLM_FEATURES, NONE, LlmSettings, calibrated_shares, llm_features, sidecar_path
from skill.pipeline import Pipeline
from skill.regex_stage import RegexStage
from skill.registry import resolve_model_dir
from skill.scoring import calibrate
from tools._calib import expected_calibration_error, fit_calibration
from tools._data import OOS, DataError, Row, rows_from_catalog, rows_from_jsonl

_LOGGER = logging.getLogger(__name__)
MIN_ANSWERS = 20  # fewer named answers than this cannot support the fit
L2 = 1.0


class Answer(msgspec.Struct, frozen=True):
    """The stage's scores on one labelled row."""

    text: str
    gold: str  # a catalog intent or "oos"
    intent: str | None  # the model's own choice ("none" included); None on timeout or error
    reason: str
    shares: dict[str, float] | None = None  # the normalised likelihoods (candidates and "none")
    candidates: tuple[tuple[str, float], ...] = ()  # the ranker's candidates and scores, in order
    ms: float = 0.0

    def features(self) -> dict[str, np.ndarray]:
        """LLM_FEATURES of every candidate (the map is fitted on all of them, right or not)."""
        shares = self.shares or {}
        return {n: llm_features(shares, n, self.candidates) for n, _ in self.candidates}


class Recorder:
    """A FallbackStage wrapper: passes every call to the real stage and keeps what it decided."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage
        self.calls: list[tuple[Canonical, Decision, Decision, float]] = []

    def decide_fallback(self, canonical: Canonical, proposal: Decision) -> Decision:
        started = time.perf_counter()
        decision = self.stage.decide_fallback(canonical, proposal)
        self.calls.append((canonical, proposal, decision, (time.perf_counter() - started) * 1000.0))
        return decision


def answer(row: Row, decision: Decision, ms: float = 0.0) -> Answer:
    """What the stage scored on ``row`` (it runs uncalibrated here, so its choice is the model's)."""
    ev = decision.evidence
    shares = ev.get("llm_shares")
    if shares is None:  # a timeout, an error, a request too long
        return Answer(row.text, row.intent, None, decision.reason or decision.outcome.value, ms=ms)
    cands = tuple((c["intent"], float(c["score"])) for c in ev.get("candidates", []) if c["intent"] != NONE)
    return Answer(row.text, row.intent, ev.get("llm_choice"), decision.reason or "", dict(shares), cands, ms)


def gold_of(row: Row, catalog: Catalog) -> Row:
    """A row whose intent the catalog does not have is out of scope for it."""
    return (
        row
        if row.intent == OOS or row.intent in catalog.intents
        else msgspec.structs.replace(row, intent=OOS)
    )


def collect(
    rows: Sequence[Row],
    catalog: Catalog,
    stage: Any,
    ranker: Any | None,
    *,
    mode: str,
    progress: bool = True,
    skip_texts: frozenset[str] = frozenset(),
) -> tuple[list[Answer], int, Pipeline]:
    """Run the rows; the LLM's answers, how many rows never reached it, and the pipeline used."""
    canonicalizer = Canonicalizer(catalog)
    gate_cfg = GateConfig(**ranker.thresholds) if ranker is not None else GateConfig()
    answers: list[Answer] = []
    skipped = 0
    recorder = Recorder(stage)
    pipeline = Pipeline(
        catalog, canonicalizer, regex=RegexStage(catalog), ranker=ranker, llm=recorder, gate_config=gate_cfg
    )
    # without a ranker every catalog intent is a candidate (--no-ranker: small catalogs only)
    everything = Decision(
        None,
        0.0,
        Outcome.ABSTAIN,
        "neural",
        tuple(Candidate(n, 0.0) for n in catalog.intents),
        reason="no_ranker",
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
        if row.text in skip_texts:
            continue
        row = gold_of(row, catalog)  # noqa: PLW2901
        if mode == "abstain":
            recorder.calls.clear()
            pipeline.parse(row.text, row.locale or None)
            if not recorder.calls:
                skipped += 1
                continue
            decision, ms = recorder.calls[-1][2], recorder.calls[-1][3]
        else:
            canonical = canonicalizer.canonicalize(row.text, row.locale or None)
            proposal = ranker.decide(canonical) if ranker is not None else everything
            started_call = time.perf_counter()
            decision = stage.decide_fallback(canonical, proposal)
            ms = (time.perf_counter() - started_call) * 1000.0
        answers.append(answer(row, decision, ms))
    return answers, skipped, pipeline


def gated(intent: str, q: dict[str, float], gate_cfg: GateConfig, policies: dict[str, IntentPolicy]) -> bool:
    """Whether the pipeline's gate accepts ``intent`` served with the map's outputs ``q``."""
    shown = calibrated_shares(q, intent, q[intent])
    alts = sorted((Candidate(n, p) for n, p in shown.items() if n != intent), key=lambda c: -c.confidence)
    d = Decision(intent, q[intent], Outcome.ACCEPT, "llm", alternatives=tuple(alts[:4]))
    return gate(d, gate_cfg, policies.get(intent)).outcome is Outcome.ACCEPT


def usefulness(
    answers: Sequence[Answer],
    served: dict[int, dict[str, float]],
    gate_cfg: GateConfig,
    policies: dict[str, IntentPolicy],
) -> dict[str, Any]:
    """Rescued / wrongly accepted among the rows handed to the LLM.

    ``served`` maps an answer's index to the map's output per candidate; the stage serves the best
    one. Answers without (timeouts, errors) are never accepted.
    """
    rescued = wrong = 0
    for i, a in enumerate(answers):
        q = served.get(i)
        if not q:
            continue
        intent = max(q, key=q.__getitem__)
        if gated(intent, q, gate_cfg, policies):
            if intent == a.gold:
                rescued += 1
            else:
                wrong += 1
    handed = len(answers)
    accepted = rescued + wrong
    return {
        "rows_handed": handed,
        "accepted": accepted,
        "rescued": rescued,
        "wrong_accepts": wrong,
        "rescue_rate": round(rescued / handed, 4) if handed else 0.0,
        "wrong_accept_rate": round(wrong / handed, 4) if handed else 0.0,
        "accepted_precision": round(rescued / accepted, 4) if accepted else None,
    }


_RANKER_ONLY = np.array([0.0 if f.startswith("llm_") else 1.0 for f in LLM_FEATURES])


def _stack(answers: Sequence[Answer], mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rows = [(f, name == a.gold) for a in answers for name, f in a.features().items()]
    x = np.asarray([f for f, _ in rows], dtype=np.float64)
    return (x if mask is None else x * mask), np.asarray([y for _, y in rows])


def _serve(a: Answer, cal: Any, mask: np.ndarray | None = None) -> dict[str, float]:
    return {n: float(calibrate(f if mask is None else f * mask, cal)[()]) for n, f in a.features().items()}


def _crossfit(
    scored: Sequence[Answer], idx: Sequence[int], mask: np.ndarray | None = None
) -> dict[int, dict[str, float]]:
    """2-fold: each half served by the map fitted on the other half."""
    half = np.arange(len(scored)) % 2 == 0
    cross: dict[int, dict[str, float]] = {}
    for part in (half, ~half):
        train = [a for a, p in zip(scored, part, strict=True) if p]
        fold = fit_calibration(*_stack(train, mask), L2, names=LLM_FEATURES)
        for k in np.flatnonzero(~part).tolist():
            cross[idx[k]] = _serve(scored[k], fold, mask)
    return cross


def fit(
    answers: Sequence[Answer],
    gate_cfg: GateConfig | None = None,
    policies: dict[str, IntentPolicy] | None = None,
    precision_target: float = 0.9,
) -> tuple[Any, dict[str, Any]]:
    """The map, fitted on every candidate of every scored row, and its report.

    The report has the raw, fitted and 2-fold cross-fitted calibration error of the served choice,
    the cross-fitted ``held_out`` figures through the pipeline's gate, and the verdict ``accept``.
    """
    gate_cfg = gate_cfg or GateConfig()
    policies = policies or {}
    idx = [i for i, a in enumerate(answers) if a.shares is not None and a.candidates]
    if len(idx) < MIN_ANSWERS:
        raise DataError(
            f"only {len(idx)} requests were scored with candidates; at least {MIN_ANSWERS} are needed to "
            "fit the confidence (use more rows, or --rows all)"
        )
    scored = [answers[i] for i in idx]
    x, y = _stack(scored)
    cal = fit_calibration(x, y, L2, names=LLM_FEATURES)
    cross = _crossfit(scored, idx)

    def choice(q: dict[str, float]) -> tuple[str, float]:
        best = max(q, key=q.__getitem__)
        return best, q[best]

    fitted = [choice(_serve(a, cal)) for a in scored]
    crossed = [choice(cross[i]) for i in idx]
    own = [(a.intent, (a.shares or {}).get(a.intent or "", 0.0)) for a in scored]
    gold = [a.gold for a in scored]

    def ece(pairs: Sequence[tuple[str | None, float]]) -> float:
        conf = np.asarray([c for _, c in pairs])
        right = np.asarray(
            [n == g or (n == NONE and g == OOS) for (n, _), g in zip(pairs, gold, strict=True)]
        )
        return round(expected_calibration_error(conf, right), 4)

    held = usefulness(answers, cross, gate_cfg, policies)
    # the same map without the model's features: what re-gating the ranker alone would rescue
    alone = usefulness(answers, _crossfit(scored, idx, _RANKER_ONLY), gate_cfg, policies)

    def good(h: dict[str, Any]) -> bool:
        return (
            h["rescued"] > 0
            and h["accepted_precision"] is not None
            and h["accepted_precision"] >= precision_target
        )

    # on only when the model reaches the target and rescues more than the ranker's view alone would
    accept = good(held) and held["rescued"] > (alone["rescued"] if good(alone) else 0)
    failed = [a for a in answers if a.shares is None]
    report: dict[str, Any] = {
        "rows": len(scored),
        "candidates": len(y),
        "answers": len(answers),
        "none_answers": sum(a.intent == NONE for a in scored),
        "none_on_oos": sum(a.intent == NONE and a.gold == OOS for a in scored),
        "failed": len(failed),
        "failed_reasons": sorted({a.reason for a in failed}),
        "llm_accuracy": round(
            float(np.mean([n == g or (n == NONE and g == OOS) for (n, _), g in zip(own, gold, strict=True)])),
            4,
        ),
        "ranker_top_accuracy": round(float(np.mean([a.candidates[0][0] == a.gold for a in scored])), 4),
        "accuracy": round(float(np.mean([n == g for (n, _), g in zip(crossed, gold, strict=True)])), 4),
        "mean_raw_probability": round(float(np.mean([c for _, c in own])), 4),
        "mean_confidence": round(float(np.mean([c for _, c in fitted])), 4),
        "ece_raw": ece(own),
        "ece_fit": ece(fitted),
        "ece_crossfit": ece(crossed),
        "held_out": held | {"how": "2-fold cross-fitted map, the pipeline's gate"},
        "held_out_ranker_only": alone,
        "precision_target": precision_target,
        "accept": accept,
    }
    return cal, report


def write_sidecar(
    model: Path, cal: Any, report: dict[str, Any], out: Path | None = None, precision_target: float = 0.9
) -> Path:
    """Merge the map and the verdict into the sidecar (other keys kept), validate, replace atomically."""
    target = out or sidecar_path(model)
    current: dict[str, Any] = {}
    if target.exists():
        current = json.loads(target.read_text(encoding="utf-8"))
        if not isinstance(current, dict):
            raise DataError(f"{target}: not a JSON object")
    current["calibration"] = msgspec.to_builtins(cal)
    current["calibration_report"] = report
    current["accept"] = bool(report.get("accept", True))
    current["precision_target"] = precision_target
    data = json.dumps(current, indent=1, ensure_ascii=False).encode() + b"\n"
    msgspec.json.decode(data, type=LlmSettings).check(str(target))  # what the service will read must load
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


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0914
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
    parser.add_argument("--precision-target", type=float, default=0.9, help="below it the stage stays off")
    parser.add_argument("--out", help="write the sidecar here instead of beside the model")
    parser.add_argument("--dry-run", action="store_true", help="fit and report, write nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = Path(args.llm_model).expanduser()
    try:
        if not 0.0 < args.precision_target <= 1.0:
            raise DataError("--precision-target must be in (0, 1]")
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
        current = LlmSettings.for_model(model) if model.is_file() else LlmSettings()
        if args.no_ranker and len(catalog.intents) > current.max_candidates:
            raise DataError(
                f"--no-ranker scores every intent as a candidate: the catalog has {len(catalog.intents)}, "
                f"more than max_candidates={current.max_candidates}"
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

        plain = msgspec.structs.replace(current, calibration=None, calibration_report=None, accept=True)
        cfg = load_config(
            overrides={
                "catalog_dir": args.catalog,
                "llm_model": str(model),
                "llm_budget_ms": args.budget_ms,
                "llm_threads": args.threads,
            }
        )
        stage = LlmStage.load(cfg, catalog, settings=plain)
        in_prefix = frozenset(t for t, _ in stage.prefix_examples)
        try:
            answers, skipped, pipeline = collect(
                rows, catalog, stage, ranker, mode=args.rows, skip_texts=in_prefix
            )
        finally:
            stage.close()
        cal, report = fit(answers, pipeline.gate_config, pipeline.policies, args.precision_target)
    except (DataError, ValueError, FileNotFoundError, ImportError) as exc:
        _LOGGER.error("%s", exc)
        return 2
    report |= {
        "mode": args.rows,
        "data": args.data or f"catalog {catalog.digest[:12]} (val split)",
        "catalog_digest": catalog.digest[:12],
        "rows_in": len(rows),
        "rows_in_prefix": sum(r.text in in_prefix for r in rows),
        "rows_not_sent": skipped,
        "ranker": model_id,
        "temperature": plain.temperature,
        "prefix_tokens": len(stage.engine.prefix),
        "fitted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if not args.dry_run:
        out = Path(args.out) if args.out else None
        report["written_to"] = str(write_sidecar(model, cal, report, out, args.precision_target))
    held = report["held_out"]
    if args.json:
        print(json.dumps({"report": report, "calibration": msgspec.to_builtins(cal)}, indent=1))
    else:
        precision = held["accepted_precision"]
        print(
            f"{report['rows']} requests scored ({report['none_answers']} liked none best, "
            f"{report['failed']} failed) of {report['answers']} sent; the model alone right on "
            f"{report['llm_accuracy']:.3f}, the ranker's first on {report['ranker_top_accuracy']:.3f}, "
            f"the map's choice (cross-fitted) on {report['accuracy']:.3f}\n"
            f"ECE raw {report['ece_raw']:.3f} -> fitted {report['ece_fit']:.3f} "
            f"(2-fold cross-fitted {report['ece_crossfit']:.3f}); mean confidence "
            f"{report['mean_confidence']:.3f}\n"
            f"held out: rescues {held['rescued']} of {held['rows_handed']} handed rows "
            f"({100 * held['rescue_rate']:.1f} %), {held['wrong_accepts']} wrong accepts, accepted precision "
            + (f"{100 * precision:.1f} %" if precision is not None else "n/a")
            + f" -> stage {'on' if report['accept'] else 'OFF'}"
            + f" (target {100 * args.precision_target:.0f} %)\n"
            + (f"written: {report['written_to']}" if not args.dry_run else "dry run")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
