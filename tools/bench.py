"""Benchmark: train on a public data set, evaluate through the real pipeline in a torch-free child, report.

``python -m tools.bench --data FILE.jsonl --out DIR [--seed 13] [--threads 1] [--limit N]``

Training (torch) runs in this process; the evaluation runs in a child process
(``--evaluate-only``) that loads only the serving code, so its peak memory is the service's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import logging
import math
import os
import random
import resource
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from skill.canonicalize import Canonicalizer
from skill.catalog import load_catalog
from skill.features import model_text
from skill.gate import GateConfig
from skill.pipeline import Pipeline

from . import metrics
from ._teacher import TEACHER_CHOICES
from .slot_metrics import SlotScores, gold_spans, predicted_spans

_LOGGER = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
VAL_SHARE = 0.10
WARMUP_ROWS = 32
CURVE_POINTS = 200
PREDICTIONS_NAME = "predictions.json"
EVAL_ROWS_NAME = "eval_rows.jsonl"
# The figures at the top level of report.json, in the order of the issue.
HEADLINE = (
    "inscope_accuracy macro_f1 accept_rate abstain_rate reject_rate accepted_precision"
    " coverage_at_99_precision coverage_at_val_threshold precision_at_val_threshold"
    " oos_recall oos_precision oos_auroc ece neural_p50_ms neural_p99_ms pipeline_p50_ms pipeline_p99_ms"
).split()


class BenchError(RuntimeError):
    """The benchmark cannot run (bad data, failed child)."""


class BenchRow(msgspec.Struct, frozen=True):
    """One labelled utterance; the shared files say ``lang``, rows written by this tool say ``locale``."""

    text: str
    intent: str
    split: str = "test"
    locale: str = ""
    lang: str = ""
    spans: list[dict[str, Any]] | None = None  # [{start, end, slot, value?}] over text; None: intent only


class EvalOutput(msgspec.Struct, frozen=True):
    """What the evaluation child reports: predictions plus its own resource use."""

    model_id: str
    threads: int
    warmup: int
    torch_loaded: bool
    peak_rss_mb: float
    ru_maxrss_mb: float
    gate: dict[str, float]
    ranker_info: dict[str, Any]
    policy_overlap: list[str]
    val: list[metrics.Prediction]
    test: list[metrics.Prediction]
    slots: dict[str, Any] = msgspec.field(default_factory=dict)  # span scores over test rows with spans


class _Labelled(Protocol):
    @property
    def intent(self) -> str: ...


R = TypeVar("R", bound=_Labelled)


def read_rows(path: Path) -> list[BenchRow]:
    """Parse a bench JSONL file (one object per line, blank lines skipped)."""
    rows = []
    decoder = msgspec.json.Decoder(BenchRow)
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                rows.append(decoder.decode(line))
            except msgspec.DecodeError as exc:
                raise BenchError(f"{path}:{n}: {exc}") from exc
    return rows


def _by_intent(rows: Sequence[R]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for idx, row in enumerate(rows):
        groups[row.intent].append(idx)
    return groups


def carve_val(rows: Sequence[R], seed: int, share: float = VAL_SHARE) -> tuple[list[R], list[R]]:
    """Deterministic stratified split: ~``share`` of each intent (>= 1 if it has >= 2 rows) goes to val."""
    picked: set[int] = set()
    for intent, idxs in sorted(_by_intent(rows).items()):
        k = round(len(idxs) * share)
        k = max(k, 1) if len(idxs) >= 2 else 0
        picked.update(random.Random(f"{seed}:{intent}").sample(idxs, k))
    keep = [r for i, r in enumerate(rows) if i not in picked]
    val = [r for i, r in enumerate(rows) if i in picked]
    return keep, val


def subsample(rows: Sequence[R], limit: int | None, seed: int) -> list[R]:
    """At most ``limit`` rows, spread evenly over intents (round-robin), in the original order."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    queues = [random.Random(f"{seed}:{k}").sample(v, len(v)) for k, v in sorted(_by_intent(rows).items())]
    picked: list[int] = []
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop())
    return [rows[i] for i in sorted(picked)]


def _peak_rss_mb() -> tuple[float, float]:
    """(VmHWM, ru_maxrss) in MiB. ru_maxrss of an exec'd child starts from the parent's peak on Linux,
    so the per-address-space high-water mark from /proc is the honest figure when it exists."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0, ru
    except OSError:
        pass
    return ru, ru


def evaluate(
    model_dir: Path, rows: Sequence[BenchRow], catalog_root: Path, threads: int, index_val: bool = False
) -> EvalOutput:
    """Run every val and test row through ``skill.pipeline`` (regex off) and time it, after a warm-up.

    ``index_val``: after the val rows are scored, add them to the ranker's example indexes (in-scope
    rows as examples, ``oos`` rows as negatives), as the service does with catalog examples the model
    was not trained on, then score test.
    """
    from skill.ranker import ExampleRow, Ranker  # noqa: PLC0415 - serving runtime, loaded where used

    catalog = load_catalog(catalog_root)
    ranker = Ranker.load(model_dir, threads=threads)
    known = set(GateConfig.__struct_fields__)
    gate_cfg = GateConfig(**{k: float(v) for k, v in ranker.thresholds.items() if k in known})
    pipeline = Pipeline(catalog, Canonicalizer(catalog), regex=None, ranker=ranker, gate_config=gate_cfg)
    warm = [r for r in rows if r.split == "test"][:WARMUP_ROWS] or list(rows[:WARMUP_ROWS])
    for row in warm:
        pipeline.parse(row.text, row.locale or row.lang or None)
    out: dict[str, list[metrics.Prediction]] = {"val": [], "test": []}
    slot_scores = SlotScores()
    frames = [0, 0]  # right frames, test rows with spans
    ordered = [r for r in rows if r.split == "val"] + [r for r in rows if r.split == "test"]
    added: dict[str, int] | None = None
    for row in ordered:
        if index_val and added is None and row.split == "test":
            canon = pipeline.canonicalizer
            added = ranker.add_examples(
                [
                    ExampleRow(
                        model_text(canon.canonicalize(r.text, r.locale or r.lang or None)),
                        r.intent,
                        r.locale or r.lang,
                        negative=r.intent == metrics.OOS,
                    )
                    for r in rows
                    if r.split == "val"
                ]
            )
            _LOGGER.info("val rows added to the indexes before test: %s", added)
        started = time.perf_counter()
        result = pipeline.parse(row.text, row.locale or row.lang or None)
        elapsed = (time.perf_counter() - started) * 1000.0
        neural = next((t.ms for t in result.stages if t.stage == "neural"), None)
        d = result.decision
        if row.split == "test" and row.spans is not None:
            pred = _predicted(d, catalog)
            exact = slot_scores.add(pred, gold_spans(row.text, row.spans))
            frames[0] += bool(exact and d.outcome.value == "accept" and d.intent == row.intent)
            frames[1] += 1
        # A rejection without an intent still names its top-ranked candidate first among the alternatives.
        top = d.intent or (d.alternatives[0].intent if d.alternatives else None)
        out[row.split].append(
            metrics.Prediction(
                text=row.text,
                gold=row.intent,
                intent=top,
                answered=d.intent is not None,
                confidence=float(d.confidence),
                outcome=d.outcome.value,
                pipeline_ms=elapsed,
                neural_ms=neural,
                locale=row.locale or row.lang,
            )
        )
    torch_loaded = "torch" in sys.modules
    if torch_loaded:
        _LOGGER.warning("torch was imported by the evaluation process: peak RSS is not the service's")
    peak, ru = _peak_rss_mb()
    gold_intents = {r.intent for r in rows}
    return EvalOutput(
        model_id=ranker.model_id,
        threads=threads,
        warmup=len(warm),
        torch_loaded=torch_loaded,
        peak_rss_mb=peak,
        ru_maxrss_mb=ru,
        gate=msgspec.structs.asdict(gate_cfg),
        ranker_info=msgspec.to_builtins(ranker.info(), enc_hook=str),
        policy_overlap=sorted(gold_intents & set(pipeline.policies)),
        val=out["val"],
        test=out["test"],
        slots={
            **slot_scores.report(),
            "frame_accuracy": round(frames[0] / frames[1], 4) if frames[1] else None,
            "rows_with_spans": frames[1],
        },
    )


def _predicted(d: Any, catalog: Any) -> list[dict[str, Any]]:
    """A decision's slots as spans: the catalog intent's filled slots, else the tagger's spans."""
    intent = catalog.intents.get(d.intent or "")
    if intent is not None:
        sources = {n: (s.source or n) for n, s in intent.slots.items()}
        return predicted_spans(d.slots, d.evidence, sources)
    return [
        {"slot": sp["slot"], "text": sp["text"], "value": sp["text"]}
        for sp in d.evidence.get("tagged_spans") or ()
    ]


def run_child(  # noqa: PLR0917 - the child's flags, one to one
    model_dir: Path, rows_path: Path, out: Path, catalog_root: Path, threads: int, index_val: bool = False
) -> EvalOutput:
    """Evaluate in a fresh interpreter that never imports torch; returns its predictions."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    flags = {
        "--model": model_dir,
        "--data": rows_path,
        "--out": out,
        "--threads": threads,
        "--catalog": catalog_root,
    }
    cmd = [
        sys.executable,
        "-m",
        "tools.bench",
        "--evaluate-only",
        *(str(x) for kv in flags.items() for x in kv),
        *(["--index-val"] if index_val else []),
    ]
    _LOGGER.info("evaluating in a child process: %s", shlex.join(cmd))
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=False)
    if done.returncode != 0:
        raise BenchError(f"evaluation child failed with exit code {done.returncode}")
    return msgspec.json.decode((out / PREDICTIONS_NAME).read_bytes(), type=EvalOutput)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _thin(curve: Sequence[metrics.CurvePoint], n: int = CURVE_POINTS) -> list[metrics.CurvePoint]:
    """At most ``n`` evenly spaced points of a curve, both ends kept."""
    if len(curve) <= n:
        return list(curve)
    step = (len(curve) - 1) / (n - 1)
    return [curve[round(i * step)] for i in range(n)]


def build_report(
    scores: metrics.Scores,
    ev: EvalOutput,
    *,
    model_dir: Path,
    train_seconds: float | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """``report.json``: the headline keys at the top level, details and provenance beneath."""
    s = msgspec.to_builtins(scores)
    report: dict[str, Any] = {k: s[k] for k in HEADLINE}
    report.update(
        model_bytes=_dir_bytes(model_dir),
        peak_rss_mb=round(ev.peak_rss_mb, 1),
        train_seconds=round(train_seconds, 1) if train_seconds is not None else None,
        model_id=ev.model_id,
        oracle_threshold=scores.oracle_threshold,
        precision_at_oracle=scores.precision_at_oracle,
        val_threshold=scores.val_threshold,
        counts={"test": scores.n_test, "inscope": scores.n_inscope, "oos": scores.n_oos, "val": len(ev.val)},
        slot_precision=ev.slots.get("slot_precision"),
        slot_recall=ev.slots.get("slot_recall"),
        slot_f1=ev.slots.get("slot_f1"),
        frame_accuracy=ev.slots.get("frame_accuracy"),
        slot_f1_by_slot=ev.slots.get("slot_f1_by_slot"),
        per_intent=s["per_intent"],
        confusions=s["confusions"],
        oos_accepted_as=s["oos_accepted_as"],
        reliability=s["reliability"],
        risk_coverage=msgspec.to_builtins(_thin(scores.risk_coverage)),
        evaluation={
            "threads": ev.threads,
            "warmup_rows": ev.warmup,
            "torch_loaded": ev.torch_loaded,
            "ru_maxrss_mb": round(ev.ru_maxrss_mb, 1),
            "gate": ev.gate,
            "ranker": ev.ranker_info,
            "catalog_policies_on_bench_intents": ev.policy_overlap,
        },
        meta=meta,
    )
    return report


def _render(scores: metrics.Scores, report: dict[str, Any], out: Path, title: str) -> None:
    """The PNG plots and report.md (matplotlib is imported here only, never in the evaluation child)."""
    from . import plots

    def point(t: float | None, cov: float | None, prec: float | None) -> metrics.CurvePoint | None:
        return metrics.CurvePoint(t, 0, cov, prec) if t is not None and cov is not None else None

    plots.reliability_diagram(scores.reliability, scores.ece, out / "reliability.png", title)
    plots.risk_coverage_curve(
        scores.risk_coverage,
        out / "risk_coverage.png",
        target=metrics.TARGET_PRECISION,
        oracle=point(scores.oracle_threshold, scores.coverage_at_99_precision, scores.precision_at_oracle),
        val_point=point(
            scores.val_threshold, scores.coverage_at_val_threshold, scores.precision_at_val_threshold
        ),
        gate_point=point(math.nan, scores.gate_coverage, scores.accepted_precision),
        title=title,
    )
    (out / "report.md").write_text(plots.render_markdown(report), encoding="utf-8")


def _train(args: argparse.Namespace, out: Path) -> tuple[Path, float | None, dict[str, Any], list[BenchRow]]:
    """Split, train (unless ``--model`` is given) and return the model, time, split facts and eval rows."""
    from tools import train as trainer  # noqa: PLC0415 - imports torch; never in the evaluation child

    rows = trainer.rows_from_jsonl(args.data)
    splits: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        splits[row.split].append(row)
    if not splits["test"]:
        raise BenchError(f"{args.data}: no test rows")
    train_rows, val_rows = splits["train"], splits["val"]
    val_source = "val"
    if not val_rows:
        train_rows, carved = carve_val(train_rows, args.seed)
        val_rows = [msgspec.structs.replace(r, split="val") for r in carved]
        val_source = f"carved from train (stratified {VAL_SHARE:.0%}, seed {args.seed})"
    train_rows = subsample(train_rows, args.limit, args.seed)
    val_rows = subsample(val_rows, args.limit, args.seed)
    test_rows = subsample(splits["test"], args.limit, args.seed)
    seconds: float | None = None
    if args.model is not None:
        model_dir = Path(args.model).resolve()
    else:
        catalog = load_catalog(args.catalog)
        started = time.perf_counter()
        model_dir = trainer.train_model(
            train_rows,
            val_rows,
            out / "models",
            catalog=catalog,
            seed=args.seed,
            name=f"bench-{Path(args.data).stem}",
            use_oos_train=args.use_oos_train,
            teacher=args.teacher,
            config=trainer.config_from_overrides(args.set, args.word_vectors),
        )
        seconds = time.perf_counter() - started
    eval_rows = [
        BenchRow(
            r.text,
            r.intent,
            split=s,
            locale=r.locale,
            spans=[{"start": a, "end": b, "slot": n} for a, b, n in r.spans] if r.spans is not None else None,
        )
        for s, rs in (("val", val_rows), ("test", test_rows))
        for r in rs
    ]
    facts = {
        "train_rows": len(train_rows),
        "train_oos_rows": sum(r.intent == metrics.OOS for r in train_rows),
        "use_oos_train": args.use_oos_train,
        "teacher": args.teacher,
        "val_rows": len(val_rows),
        "val_source": val_source,
        "test_rows": len(test_rows),
    }
    return model_dir, seconds, facts, eval_rows


def bench(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """The whole run: train, evaluate in a child, score, write report.json / report.md / plots."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir, seconds, facts, eval_rows = _train(args, out)
    rows_path = out / EVAL_ROWS_NAME
    rows_path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in eval_rows))
    ev = run_child(model_dir, rows_path, out, Path(args.catalog).resolve(), args.threads, args.index_val)
    scores = metrics.score(ev.test, ev.val)
    meta = {
        "command": "python -m tools.bench " + shlex.join(argv),
        "data": str(args.data),
        "data_sha256": _sha256(Path(args.data)),
        "seed": args.seed,
        "limit": args.limit,
        "index_val": args.index_val,
        "catalog": str(args.catalog),
        "model_dir": str(model_dir),
        "python": sys.version.split()[0],
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **facts,
    }
    report = build_report(scores, ev, model_dir=model_dir, train_seconds=seconds, meta=meta)
    report["plots"] = ["reliability.png", "risk_coverage.png"]
    (out / "report.json").write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2))
    _render(scores, report, out, Path(args.data).stem)
    _LOGGER.info("wrote %s/report.json, report.md and %d plots", out, len(report["plots"]))
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="bench JSONL (text, intent, lang, split)")
    p.add_argument("--out", type=Path, required=True, help="output folder (report, plots, model)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--threads", type=int, default=1, help="inference threads of the evaluated pipeline")
    p.add_argument(
        "--limit", type=int, default=None, help="at most N rows per split (stratified; smoke runs)"
    )
    p.add_argument("--catalog", type=Path, default=REPO_ROOT / "catalog", help="catalog for canonicalization")
    p.add_argument("--model", type=Path, default=None, help="evaluate this model folder instead of training")
    p.add_argument("--use-oos-train", action="store_true", help="train with the data's oos training rows")
    p.add_argument(
        "--teacher",
        choices=TEACHER_CHOICES,
        help="distil a teacher at training time (tools.train)",
    )
    p.add_argument(
        "--word-vectors",
        type=int,
        default=None,
        metavar="N",
        help="with --teacher: teacher word vectors for the N most frequent words per language (tools.train)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="training-config override (train)"
    )
    p.add_argument(
        "--index-val",
        action="store_true",
        help="add the val rows to the example indexes before scoring test (what the service does with "
        "catalog examples the model was not trained on)",
    )
    p.add_argument("--evaluate-only", action="store_true", help="(child) evaluate --model on --data only")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.evaluate_only:
            if args.model is None:
                raise BenchError("--evaluate-only needs --model")
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            ev = evaluate(
                Path(args.model), read_rows(Path(args.data)), Path(args.catalog), args.threads, args.index_val
            )
            (out / PREDICTIONS_NAME).write_bytes(msgspec.json.encode(ev))
            _LOGGER.info(
                "evaluated %d val + %d test rows, peak RSS %.1f MiB",
                len(ev.val),
                len(ev.test),
                ev.peak_rss_mb,
            )
        else:
            report = bench(args, argv)
            _LOGGER.info("model %s: %s", report["model_id"], {k: report[k] for k in HEADLINE[:7]})
    except (BenchError, ValueError) as exc:  # ValueError: the trainer's DataError, CatalogError
        _LOGGER.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
