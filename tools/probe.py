"""Probe the served pipeline with an independent test set (``../shared/bench/home_probe.jsonl``).

python -m tools.probe --data ../shared/bench/home_probe.jsonl [--model-dir DIR] [--out DIR]

Every row goes through ``skill.pipeline`` exactly as ``/parse`` serves it (regex, the model with the
catalog's examples added to its indexes, gates; the LLM only with ``--llm-model``). Per language and
overall: in-scope accuracy of the top intent, accept rate, accepted precision, the share accepted and
correct, the out-of-scope false-accept rate, accepted-and-correct per phrasing category, the share of
correct accepts with every required slot, and span-level slot precision / recall / F1 where rows carry
``spans``. The report names no sentence of the set (it stays a test set: read the figures, not the
rows), only intents, categories and counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skill.canonicalize import Canonicalizer
from skill.catalog import Catalog, load_catalog
from skill.config import Config
from skill.decision import Outcome
from skill.gate import GateConfig
from skill.pipeline import ParseResult, Pipeline
from skill.ranker import Ranker, catalog_example_rows
from skill.regex_stage import RegexStage
from skill.registry import resolve_model_dir
from tools.slot_metrics import SlotScores, gold_spans, predicted_spans

OOS = "oos"


def build_served_pipeline(
    catalog: Catalog, model_dir: Path, *, catalog_examples: bool = True, llm_model: str | None = None
) -> Pipeline:
    """The pipeline ``/parse`` serves for one model version (catalog rows added, optional LLM)."""
    canonicalizer = Canonicalizer(catalog)
    ranker = Ranker.load(model_dir, threads=1)
    if catalog_examples:
        ranker.add_examples(catalog_example_rows(catalog, canonicalizer))
    llm = None
    if llm_model:
        from skill.service import load_llm  # noqa: PLC0415 - only with --llm-model

        llm = load_llm(Config(llm_model=llm_model), catalog)
    return Pipeline(
        catalog,
        canonicalizer,
        regex=RegexStage(catalog),
        ranker=ranker,
        llm=llm,
        gate_config=GateConfig(**ranker.thresholds),
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """JSONL rows with at least ``text``, ``intent``, ``lang``."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}:{n}: invalid JSON: {exc}") from exc
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("text", "intent", "lang")
        ):
            raise SystemExit(f"{path}:{n}: a row needs string text, intent and lang")
        rows.append(row)
    return rows


class _Group:
    """Counts for one language (or all)."""

    def __init__(self) -> None:
        self.rows = self.n_in = self.n_oos = 0
        self.top_ok = self.accepted = self.acc_ok = self.oos_accepted = 0
        self.acc_ok_slots = self.frame_ok = 0
        self.cat_n: Counter[str] = Counter()
        self.cat_ok: Counter[str] = Counter()
        self.confusions: Counter[tuple[str, str]] = Counter()
        self.slots = SlotScores()
        self.has_spans = False

    def add(self, row: dict[str, Any], res: ParseResult, catalog: Catalog) -> None:
        gold = row["intent"]
        d = res.decision
        accepted = d.outcome is Outcome.ACCEPT and d.intent is not None
        self.rows += 1
        self.accepted += accepted
        if gold == OOS:
            self.n_oos += 1
            self.oos_accepted += accepted
            if accepted:
                self.confusions[(OOS, d.intent or "")] += 1
            return
        self.n_in += 1
        ok = d.intent == gold
        self.top_ok += ok
        cat = str(row.get("category") or "none")
        self.cat_n[cat] += 1
        if accepted and ok:
            self.acc_ok += 1
            self.cat_ok[cat] += 1
            self.acc_ok_slots += not res.missing_slots
        elif accepted:
            self.confusions[(gold, d.intent or "")] += 1
        if "spans" in row:
            self.has_spans = True
            intent = catalog.intents.get(d.intent or "")
            sources = {n: (s.source or n) for n, s in intent.slots.items()} if intent else {}
            pred = predicted_spans(d.slots if d.intent else {}, d.evidence, sources)
            exact = self.slots.add(pred, gold_spans(row["text"], row.get("spans") or []))
            self.frame_ok += bool(accepted and ok and exact)

    def report(self, model_id: str | None) -> dict[str, Any]:
        def share(a: int, b: int) -> float | None:
            return round(a / b, 4) if b else None

        slots = self.slots.report() if self.has_spans else SlotScores().report()
        return {
            "rows": self.rows,
            "inscope_rows": self.n_in,
            "oos_rows": self.n_oos,
            "model_id": model_id,
            "inscope_accuracy": share(self.top_ok, self.n_in),
            "accept_rate": share(self.accepted, self.rows),
            "accepted_precision": share(self.acc_ok, self.accepted),
            "accepted_correct": share(self.acc_ok, self.n_in),
            "oos_false_accept_rate": share(self.oos_accepted, self.n_oos),
            "by_category": {c: share(self.cat_ok[c], n) for c, n in sorted(self.cat_n.items())},
            "by_category_rows": dict(sorted(self.cat_n.items())),
            "required_slots_present": share(self.acc_ok_slots, self.acc_ok) if self.has_spans else None,
            "frame_accuracy": share(self.frame_ok, self.n_in) if self.has_spans else None,
            **slots,
            "wrong_accepts": [
                {"gold": g, "accepted_as": p, "n": n} for (g, p), n in self.confusions.most_common(15)
            ],
        }


def probe(pipeline: Pipeline, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Run the rows and build the report (``"ru"``, ``"en"``, ``"all"``, plus timing)."""
    groups: dict[str, _Group] = defaultdict(_Group)
    started = time.perf_counter()
    for row in rows:
        res = pipeline.parse(row["text"], row["lang"])
        for key in (row["lang"], "all"):
            groups[key].add(row, res, pipeline.catalog)
    seconds = time.perf_counter() - started
    report = {k: g.report(pipeline.model_id) for k, g in sorted(groups.items())}
    report["meta"] = {
        "model_id": pipeline.model_id,
        "catalog_digest": pipeline.catalog.digest,
        "rows": len(rows),
        "seconds": round(seconds, 2),
        "llm": pipeline.llm is not None,
    }
    return report


def _norm(text: str) -> str:
    from skill.values import tokenize  # noqa: PLC0415

    return " ".join(tokenize(text))


def _catalog_texts(catalog: Catalog) -> list[str]:
    """Every text the catalog trains or checks on: examples, negatives and out-of-scope, golden cases."""
    texts = [e.text for e in catalog.examples()] + [e.text for e in catalog.negatives()]
    return texts + [g.text for i in catalog.intents.values() for g in i.golden]


def catalog_overlap(catalog: Catalog, rows: Sequence[dict[str, Any]], cutoff: float = 92.0) -> list[str]:
    """Probe rows equal to, or within rapidfuzz ratio ``cutoff`` of, a catalog text (normalized).

    The probe is a held-out set: a catalog example, negative, out-of-scope line or golden case this
    close to one of its rows would make the probe measure memory, not generalization.
    """
    from rapidfuzz import fuzz, process  # noqa: PLC0415

    texts = {_norm(t) for t in _catalog_texts(catalog)}
    keys = sorted(texts)
    out = []
    for row in rows:
        q = _norm(row["text"])
        if q in texts or process.extractOne(q, keys, scorer=fuzz.ratio, score_cutoff=cutoff):
            out.append(row["text"])
    return out


def catalog_texts_near(catalog: Catalog, rows: Sequence[dict[str, Any]], cutoff: float = 92.0) -> list[str]:
    """The catalog's own texts that equal, or are within ``cutoff`` of, a probe row (the other side of
    :func:`catalog_overlap`): what to delete or reword, named without showing the held-out rows."""
    from rapidfuzz import fuzz, process  # noqa: PLC0415

    probe = sorted({_norm(r["text"]) for r in rows})
    return sorted(
        {
            t
            for t in _catalog_texts(catalog)
            if process.extractOne(_norm(t), probe, scorer=fuzz.ratio, score_cutoff=cutoff)
        }
    )


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def render_md(report: dict[str, Any], command: str) -> str:
    """The report as a page: headline table, per-category table, slots, wrong accepts."""
    langs = [k for k in report if k != "meta"]
    lines = [f"# Probe report — model `{report['meta']['model_id']}`", "", f"`{command}`", ""]
    if "catalog_overlap_rows" in report["meta"]:
        lines += [
            "Probe rows equal to or within ratio 92 of a catalog text: "
            f"{report['meta']['catalog_overlap_rows']}.",
            "",
        ]
    keys = [
        ("inscope_accuracy", "in-scope accuracy (top intent)"),
        ("accepted_correct", "accepted and correct"),
        ("accepted_precision", "accepted precision"),
        ("accept_rate", "accept rate (all rows)"),
        ("oos_false_accept_rate", "out-of-scope false accepts"),
        ("required_slots_present", "correct accepts with every required slot"),
        ("slot_precision", "slot precision"),
        ("slot_recall", "slot recall"),
        ("slot_f1", "slot F1"),
        ("frame_accuracy", "frame accuracy (accepted, right intent, every slot)"),
    ]
    lines += ["| measure | " + " | ".join(langs) + " |", "|---|" + "---:|" * len(langs)]
    lines += [f"| {label} | " + " | ".join(_pct(report[g][k]) for g in langs) + " |" for k, label in keys]
    lines += [
        "| rows (in-scope / oos) | "
        + " | ".join(f"{report[g]['inscope_rows']} / {report[g]['oos_rows']}" for g in langs)
        + " |"
    ]
    cats = sorted({c for g in langs for c in report[g]["by_category"]})
    lines += ["", "## Accepted and correct by phrasing category", ""]
    lines += ["| category | " + " | ".join(langs) + " |", "|---|" + "---:|" * len(langs)]
    for c in cats:
        cells = []
        for g in langs:
            n = report[g]["by_category_rows"].get(c)
            v = report[g]["by_category"].get(c)
            cells.append("–" if n is None else f"{_pct(v)} of {n}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    by_slot = report.get("all", {}).get("slot_f1_by_slot") or {}
    if by_slot:
        lines += [
            "",
            "## Slots (all languages)",
            "",
            "| slot | gold | predicted | P | R | F1 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s, v in by_slot.items():
            lines.append(
                f"| {s} | {v['gold']} | {v['predicted']} | {_pct(v['precision'])} | "
                f"{_pct(v['recall'])} | {_pct(v['f1'])} |"
            )
    wrong = report.get("all", {}).get("wrong_accepts") or []
    if wrong:
        lines += [
            "",
            "## Wrong accepts (gold → accepted as)",
            "",
            "| gold | accepted as | n |",
            "|---|---|---:|",
        ]
        lines += [f"| {w['gold']} | {w['accepted_as']} | {w['n']} |" for w in wrong]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", type=Path, required=True, help="JSONL rows: text, intent, lang, category?, spans?"
    )
    ap.add_argument("--model-dir", type=Path, help="a model folder (default: the active / embedded model)")
    ap.add_argument("--catalog", type=Path, default=Path("catalog"))
    ap.add_argument("--out", type=Path, help="write report.json and report.md here")
    ap.add_argument("--no-catalog-examples", action="store_true", help="the model's indexes alone")
    ap.add_argument("--llm-model", help="a GGUF file: the LLM fallback runs as in the service")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        print(f"no such file: {args.data}", file=sys.stderr)
        return 2
    catalog = load_catalog(args.catalog)
    model_dir = args.model_dir or resolve_model_dir(Config().model_roots(), None)
    if model_dir is None or not model_dir.is_dir():
        print(f"no model folder: {model_dir}", file=sys.stderr)
        return 2
    pipeline = build_served_pipeline(
        catalog, model_dir, catalog_examples=not args.no_catalog_examples, llm_model=args.llm_model
    )
    rows = read_rows(args.data)
    report = probe(pipeline, rows)
    report["meta"]["catalog_overlap_rows"] = len(catalog_overlap(catalog, rows))
    command = "python -m tools.probe " + " ".join(sys.argv[1:] if argv is None else argv)
    md = render_md(report, command)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
        (args.out / "report.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
