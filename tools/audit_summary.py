"""Summarise decision audit logs: outcomes per intent, confidence, abstained texts, canonicalization failures.

``python -m tools.audit_summary LOG [LOG...] [--top 20] [--json]``

A LOG is an audit file (``nlu_decisions.jsonl``, rotated ``.1`` ``.2`` ... too) or a folder holding them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from skill.audit import AUDIT_FILE

_LOGGER = logging.getLogger(__name__)

OUTCOMES = ("accept", "abstain", "reject", "error")
# The hub's confidence bands (neural_usage.json), so both views line up.
BANDS = (
    (0.0, 0.25, "0.00-0.24"),
    (0.25, 0.45, "0.25-0.44"),
    (0.45, 0.80, "0.45-0.79"),
    (0.80, 1.01, "0.80-1.00"),
)
NO_INTENT = "(none)"


def log_files(paths: Sequence[Path]) -> list[Path]:
    """The files to read, oldest first: a folder expands to its audit file and the rotated ones."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = [p for p in path.iterdir() if p.name.startswith(AUDIT_FILE)]
            files += sorted(found, key=_age, reverse=True)
        else:
            files.append(path)
    return files


def _age(path: Path) -> int:
    """``f.3`` is older than ``f.1``, which is older than ``f``."""
    suffix = path.name[len(AUDIT_FILE) :].lstrip(".")
    return int(suffix) if suffix.isdigit() else 0


def read_records(files: Iterable[Path], bad: Counter[str]) -> Iterator[dict[str, Any]]:
    """Every decision record; undecodable lines (a torn last line, say) are counted in ``bad``."""
    for path in files:
        with path.open("rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = msgspec.json.decode(line)
                except msgspec.DecodeError:
                    bad[str(path)] += 1
                    continue
                if isinstance(rec, dict) and "decision" in rec:
                    yield rec
                else:
                    bad[str(path)] += 1


def _text_key(rec: dict[str, Any]) -> str:
    if rec.get("text") is not None:
        return str(rec["text"]).strip().lower()
    if rec.get("text_sha256"):
        return "#" + str(rec["text_sha256"])
    return "(text not stored)"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[idx], 3)


def _band(conf: float) -> str:
    return next(label for lo, hi, label in BANDS if lo <= conf < hi) if conf < 1.01 else BANDS[-1][2]


def summarize(records: Iterable[dict[str, Any]], top: int = 20) -> dict[str, Any]:
    """All the figures, as plain data."""
    n = 0
    outcomes: Counter[str] = Counter()
    per_intent: dict[str, Counter[str]] = defaultdict(Counter)
    via: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    models: Counter[str] = Counter()
    bands: dict[str, Counter[str]] = {label: Counter() for _, _, label in BANDS}
    deciles: dict[str, Counter[str]] = {f"{i / 10:.1f}-{(i + 1) / 10:.1f}": Counter() for i in range(10)}
    abstained: Counter[str] = Counter()
    abstained_info: dict[str, dict[str, Any]] = {}
    canon: Counter[str] = Counter()
    ambiguous: Counter[str] = Counter()
    ambiguous_candidates: dict[str, set[str]] = defaultdict(set)
    unresolved: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    total_ms: list[float] = []
    stage_ms: dict[str, list[float]] = defaultdict(list)
    first_ts = last_ts = None
    for rec in records:
        n += 1
        ts = rec.get("ts")
        first_ts = ts if first_ts is None or (ts and ts < first_ts) else first_ts
        last_ts = ts if last_ts is None or (ts and ts > last_ts) else last_ts
        outcome = str(rec.get("decision"))
        intent = rec.get("intent") or NO_INTENT
        outcomes[outcome] += 1
        per_intent[intent][outcome] += 1
        via[str(rec.get("via"))] += 1
        models[str(rec.get("model_id") or "(no model)")] += 1
        if outcome != "accept":
            reasons[f"{outcome}: {rec.get('reason')}"] += 1
        if rec.get("intent"):
            conf = float(rec.get("confidence") or 0.0)
            bands[_band(conf)][outcome] += 1
            deciles[list(deciles)[min(9, int(conf * 10))]][outcome] += 1
        key = _text_key(rec)
        canonical = rec.get("canonical") or {}
        if outcome == "abstain":
            abstained[key] += 1
            info = abstained_info.setdefault(
                key, {"masked": canonical.get("masked"), "candidates": Counter()}
            )
            for cand in (rec.get("candidates") or [])[:1]:
                info["candidates"][cand["intent"]] += 1
        result = str(canonical.get("result", "unknown"))
        canon[result] += 1
        for amb in canonical.get("ambiguities") or []:
            label = str(amb.get("text", "(text not stored)"))
            ambiguous[label] += 1
            ambiguous_candidates[label].update(amb.get("candidates") or [])
        spans = canonical.get("unresolved")
        for span in spans if isinstance(spans, list) else []:
            unresolved[str(span)] += 1
        if result == "miss" and outcome != "accept":
            missed[key] += 1
        if isinstance(rec.get("total_ms"), int | float):
            total_ms.append(float(rec["total_ms"]))
        for stage in rec.get("stages") or []:
            stage_ms[str(stage.get("stage"))].append(float(stage.get("ms") or 0.0))
    rows = sorted(per_intent.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    return {
        "records": n,
        "first_ts": first_ts,
        "last_ts": last_ts,
        "models": dict(models.most_common()),
        "outcomes": {o: outcomes.get(o, 0) for o in OUTCOMES},
        "fallback_ratio": round(1.0 - outcomes.get("accept", 0) / n, 4) if n else None,
        "via": dict(via.most_common()),
        "not_accepted_reasons": dict(reasons.most_common()),
        "per_intent": {k: {o: v.get(o, 0) for o in OUTCOMES} | {"total": sum(v.values())} for k, v in rows},
        "confidence_bands": {k: {o: v.get(o, 0) for o in OUTCOMES} for k, v in bands.items()},
        "confidence_deciles": {k: sum(v.values()) for k, v in deciles.items()},
        "top_abstained": [
            {
                "text": key,
                "count": count,
                "masked": abstained_info[key]["masked"],
                "top_candidates": dict(abstained_info[key]["candidates"].most_common(3)),
            }
            for key, count in abstained.most_common(top)
        ],
        "canonicalization": dict(canon.most_common()),
        "ambiguities": [
            {"text": t, "count": c, "candidates": sorted(ambiguous_candidates[t])}
            for t, c in ambiguous.most_common(top)
        ],
        "unresolved_spans": [{"text": t, "count": c} for t, c in unresolved.most_common(top)],
        "missed_and_not_accepted": [{"text": t, "count": c} for t, c in missed.most_common(top)],
        "latency_ms": {
            "total": {"p50": _percentile(total_ms, 0.5), "p95": _percentile(total_ms, 0.95)},
            **{s: {"p50": _percentile(v, 0.5), "p95": _percentile(v, 0.95)} for s, v in stage_ms.items()},
        },
    }


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
    cells = cells or [["(none)", *[""] * (len(header) - 1)]]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in cells),
    ]


def render_text(s: dict[str, Any], files: Sequence[Path], bad: Counter[str]) -> str:
    """A Markdown report for a terminal or an issue comment."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        f"# Audit summary: {s['records']} decisions",
        "",
        f"Files: {', '.join(map(str, files))}" + (f"; unreadable lines: {sum(bad.values())}" if bad else ""),
        f"From {s['first_ts']} to {s['last_ts']}; models: {s['models']}",
        "",
        "Outcomes: "
        + ", ".join(f"{o} {n}" for o, n in s["outcomes"].items())
        + f"; fallback ratio (not accepted) {pct(s['fallback_ratio'])}; via: {s['via']}",
        "",
        "## Per intent (top candidate)",
        "",
        *_table(["intent", *OUTCOMES, "total"], ([k, *v.values()] for k, v in s["per_intent"].items())),
        "",
        "## Why not accepted",
        "",
        *_table(["outcome: reason", "count"], s["not_accepted_reasons"].items()),
        "",
        "## Confidence of the top candidate (hub bands)",
        "",
        *_table(["band", *OUTCOMES], ([k, *v.values()] for k, v in s["confidence_bands"].items())),
        "",
        "Deciles: " + ", ".join(f"{k}: {v}" for k, v in s["confidence_deciles"].items()),
        "",
        "## Most frequent abstained texts",
        "",
        *_table(
            ["text", "count", "masked", "top candidates"],
            (
                [a["text"], a["count"], a["masked"] or "", a["top_candidates"] or ""]
                for a in s["top_abstained"]
            ),
        ),
        "",
        "## Canonicalization",
        "",
        "Results: " + ", ".join(f"{k} {v}" for k, v in s["canonicalization"].items()),
        "",
        "Ambiguous spans:",
        "",
        *_table(
            ["span", "count", "candidates"],
            ([a["text"], a["count"], ", ".join(a["candidates"])] for a in s["ambiguities"]),
        ),
        "",
        "Unresolved spans:",
        "",
        *_table(["span", "count"], ([u["text"], u["count"]] for u in s["unresolved_spans"])),
        "",
        "No entity found and not accepted (alias or rule candidates):",
        "",
        *_table(["text", "count"], ([m["text"], m["count"]] for m in s["missed_and_not_accepted"])),
        "",
        "## Latency (ms)",
        "",
        *_table(["part", "p50", "p95"], ([k, v["p50"], v["p95"]] for k, v in s["latency_ms"].items())),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.audit_summary", description=__doc__.splitlines()[0]
    )
    parser.add_argument("logs", nargs="+", type=Path, help="audit files or folders")
    parser.add_argument("--top", type=int, default=20, help="rows in the top-N lists")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    files = log_files(args.logs)
    missing = [f for f in files if not f.is_file()]
    if missing or not files:
        _LOGGER.error("no audit log at %s", ", ".join(map(str, missing or args.logs)))
        return 2
    bad: Counter[str] = Counter()
    summary = summarize(read_records(files, bad), top=args.top)
    if args.json:
        summary["files"] = [str(f) for f in files]
        summary["unreadable_lines"] = dict(bad)
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(summary), indent=2).decode() + "\n")
    else:
        sys.stdout.write(render_text(summary, files, bad))
    return 0


if __name__ == "__main__":
    sys.exit(main())
