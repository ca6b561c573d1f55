"""Session flows from the decision audit log: what follows what, rephrases after abstentions, cancels.

``python -m tools.flows LOG [LOG...] [--out DIR] [--rephrase-window 30] [--gap 300] [--top 20] [--json]``

A LOG is an audit file (``nlu_decisions.jsonl``, rotated ``.1`` ``.2`` ... too) or a folder holding them.
Records carry ``scope`` (the session, or the webspace when the hub sent no session id) and, for a
multi-request utterance, ``segment``; records without a scope (stateless calls) are counted, not used.
Within a scope, a pause longer than ``--gap`` seconds starts a new visit. Per visit the decisions
form a sequence of states: the accepted intent, or ``(abstain)`` / ``(reject)``. The report has the
most common transitions, the next-intent frequencies, the abstain → rephrase pairs (a new request in
the same scope within ``--rephrase-window`` seconds after an abstention: teacher material), and the
intents most often followed by a cancel. ``--out DIR`` writes ``flows.json`` and ``flows.html`` (one
self-contained page: an inline SVG transition diagram and the tables, no external assets).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tools.audit_summary import log_files, read_records

START, END = "(start)", "(end)"


def _state(rec: dict[str, Any]) -> str:
    if rec.get("decision") == "accept":
        answered = (rec.get("answered") or {}).get("intent") or rec.get("intent")
        return str(answered or "(accept)")
    return f"({rec.get('decision') or 'unknown'})"


def _ts(rec: dict[str, Any]) -> float:
    try:
        return _dt.datetime.fromisoformat(str(rec["ts"])).timestamp()
    except (KeyError, ValueError):
        return 0.0


def _text(rec: dict[str, Any]) -> str:
    if rec.get("text") is not None:
        return str(rec["text"])
    if rec.get("text_sha256"):
        return "#" + str(rec["text_sha256"])
    return "(text not stored)"


def _is_cancel(rec: dict[str, Any]) -> bool:
    ctx = rec.get("context") or {}
    if ctx.get("action") == "cancel":
        return True
    state = _state(rec)
    return rec.get("decision") == "accept" and (state.endswith(".cancel") or state == "assistant.cancel")


def visits(
    records: Iterable[dict[str, Any]], gap_s: float
) -> tuple[list[tuple[str, list[dict[str, Any]]]], int]:
    """(scope, records in order) per visit, and how many records had no scope."""
    by_scope: dict[str, list[dict[str, Any]]] = defaultdict(list)
    stateless = 0
    for rec in records:
        scope = rec.get("scope") or (f"session:{rec['session_id']}" if rec.get("session_id") else None)
        if not scope:
            stateless += 1
            continue
        by_scope[str(scope)].append(rec)
    out: list[tuple[str, list[dict[str, Any]]]] = []
    for scope in sorted(by_scope):
        recs = sorted(by_scope[scope], key=lambda r: (_ts(r), (r.get("segment") or {}).get("index", 0)))
        current: list[dict[str, Any]] = []
        for rec in recs:
            if current and _ts(rec) - _ts(current[-1]) > gap_s:
                out.append((scope, current))
                current = []
            current.append(rec)
        if current:
            out.append((scope, current))
    return out, stateless


def analyse(
    records: Iterable[dict[str, Any]], *, rephrase_window_s: float = 30.0, gap_s: float = 300.0, top: int = 20
) -> dict[str, Any]:
    """Every figure of the report, as plain data."""
    all_records = list(records)
    groups, stateless = visits(all_records, gap_s)
    transitions: Counter[tuple[str, str]] = Counter()
    states: Counter[str] = Counter()
    nxt: dict[str, Counter[str]] = defaultdict(Counter)
    accepted: Counter[str] = Counter()
    cancelled: Counter[str] = Counter()
    rephrases: list[dict[str, Any]] = []
    actions: Counter[str] = Counter()
    clarify: Counter[str] = Counter()
    split_requests: set[str] = set()
    sequences = []
    for scope, recs in groups:
        seq = [_state(r) for r in recs]
        sequences.append({"scope": scope, "states": seq, "start": recs[0].get("ts")})
        by_request = {r.get("request_id"): r for r in recs if r.get("decision") == "accept"}
        for rec in recs:
            actions[str((rec.get("context") or {}).get("action") or "(none)")] += 1
            if rec.get("clarify"):
                clarify[str(rec["clarify"])] += 1
            if (rec.get("segment") or {}).get("of", 1) > 1:
                split_requests.add(str(rec.get("request_id")))
        for a, b in zip([START, *seq], [*seq, END], strict=True):
            transitions[(a, b)] += 1
            nxt[a][b] += 1
        states.update(seq)
        for i, rec in enumerate(recs):
            state = seq[i]
            if rec.get("decision") == "accept" and not _is_cancel(rec):
                accepted[state] += 1
            if _is_cancel(rec):
                ref = (rec.get("context") or {}).get("refers_to")
                target = by_request.get(ref) if ref else None
                if target is None:  # the accepted request just before it
                    target = next(
                        (
                            r
                            for r in reversed(recs[:i])
                            if r.get("decision") == "accept" and not _is_cancel(r)
                        ),
                        None,
                    )
                if target is not None:
                    cancelled[_state(target)] += 1
            if rec.get("decision") == "accept":
                continue
            later = next((r for r in recs[i + 1 :] if r.get("request_id") != rec.get("request_id")), None)
            if later is not None and 0 <= _ts(later) - _ts(rec) <= rephrase_window_s:
                rephrases.append(
                    {
                        "scope": scope,
                        "gap_s": round(_ts(later) - _ts(rec), 3),
                        "abstained": _text(rec),
                        "abstained_decision": rec.get("decision"),
                        "abstained_candidates": [c.get("intent") for c in rec.get("candidates") or []][:3],
                        "rephrased": _text(later),
                        "rephrased_intent": _state(later),
                        "rephrased_decision": later.get("decision"),
                    }
                )
    pair_counts = Counter((p["abstained"], p["rephrased"], p["rephrased_intent"]) for p in rephrases)
    return {
        "records": len(all_records),
        "stateless_records": stateless,
        "scopes": len({s for s, _ in groups}),
        "visits": len(groups),
        "split_requests": len(split_requests),
        "context_actions": dict(actions.most_common()),
        "clarify": dict(clarify.most_common()),
        "states": dict(states.most_common()),
        "transitions": [
            {"from": a, "to": b, "count": n}
            for (a, b), n in transitions.most_common()
            if a != START and b != END
        ][:top],
        "transitions_all": [{"from": a, "to": b, "count": n} for (a, b), n in transitions.most_common()],
        "next_intent": {
            a: [{"to": b, "count": n, "share": round(n / sum(c.values()), 4)} for b, n in c.most_common(5)]
            for a, c in sorted(nxt.items(), key=lambda kv: -sum(kv[1].values()))
        },
        "rephrase_pairs": len(rephrases),
        "rephrase_accepted": sum(1 for p in rephrases if p["rephrased_decision"] == "accept"),
        "top_rephrases": [
            {"abstained": a, "rephrased": b, "rephrased_intent": i, "count": n}
            for (a, b, i), n in pair_counts.most_common(top)
        ],
        "rephrases": rephrases[: top * 5],
        "followed_by_cancel": [
            {"intent": i, "accepted": accepted[i], "cancelled": n, "share": round(n / max(1, accepted[i]), 4)}
            for i, n in cancelled.most_common(top)
        ],
        "sequences": sequences[:top],
    }


# -- the page -------------------------------------------------------------------------------------------


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def diagram(report: dict[str, Any], max_nodes: int = 12, max_edges: int = 30) -> str:
    """An inline SVG of the most common transitions: states on a circle, arrows as wide as their count."""
    edges = [e for e in report["transitions_all"]][: max_edges * 3]
    weight: Counter[str] = Counter()
    for e in edges:
        weight[e["from"]] += e["count"]
        weight[e["to"]] += e["count"]
    nodes = [n for n, _ in weight.most_common(max_nodes)]
    if START in weight and START not in nodes:
        nodes[-1:] = [START]
    edges = [e for e in edges if e["from"] in nodes and e["to"] in nodes][:max_edges]
    w, h, r = 760, 560, 210
    cx, cy = w / 2, h / 2
    pos = {
        n: (cx + r * math.cos(2 * math.pi * i / max(1, len(nodes)) - math.pi / 2),
            cy + r * math.sin(2 * math.pi * i / max(1, len(nodes)) - math.pi / 2))
        for i, n in enumerate(nodes)
    }  # fmt: skip
    top = max((e["count"] for e in edges), default=1)
    seen = {**report["states"], START: report["visits"], END: report["visits"]}  # how often each occurs
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
        'role="img" aria-label="intent transitions">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" '
        'markerUnits="userSpaceOnUse" markerWidth="11" markerHeight="11" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
    ]
    for e in edges:
        (x1, y1), (x2, y2) = pos[e["from"]], pos[e["to"]]
        width = 1 + 5 * math.log1p(e["count"]) / math.log1p(top)
        title = html.escape(f"{e['from']} → {e['to']}: {e['count']}")
        if e["from"] == e["to"]:
            dx, dy = (x1 - cx) / r * 38, (y1 - cy) / r * 38
            path = f"M {x1:.1f} {y1:.1f} c {dx - dy:.1f} {dy + dx:.1f} {dx + dy:.1f} {dy - dx:.1f} 0 0"
            lx, ly = x1 + dx * 1.2, y1 + dy * 1.2
        else:
            mx, my = (x1 + x2) / 2, (y1 + y2) / 2
            qx, qy = mx + (cx - mx) * 0.35, my + (cy - my) * 0.35  # bend towards the centre
            d = math.hypot(x2 - qx, y2 - qy) or 1.0
            ex, ey = x2 - (x2 - qx) / d * 30, y2 - (y2 - qy) / d * 30  # stop at the node's edge
            path = f"M {x1:.1f} {y1:.1f} Q {qx:.1f} {qy:.1f} {ex:.1f} {ey:.1f}"
            lx, ly = (x1 + 2 * qx + x2) / 4, (y1 + 2 * qy + y2) / 4
        parts.append(
            f'<g><title>{title}</title><path d="{path}" fill="none" stroke="#4a6fa5" stroke-opacity="0.7" '
            f'stroke-width="{width:.1f}" marker-end="url(#arrow)"/>'
            f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="11" fill="#333">{e["count"]}</text></g>'
        )
    for n, (x, y) in pos.items():
        fill = "#f3d9d9" if n.startswith("(") and n not in (START, END) else "#e8eef7"
        parts.append(
            f'<g><circle cx="{x:.1f}" cy="{y:.1f}" r="28" fill="{fill}" stroke="#4a6fa5"/>'
            f'<text x="{x:.1f}" y="{y + 44:.1f}" font-size="12" text-anchor="middle">'
            f"{html.escape(_short(n))}</text>"
            f'<text x="{x:.1f}" y="{y + 4:.1f}" font-size="11" text-anchor="middle">'
            f"{seen.get(n, '')}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body or '<tr><td>none</td></tr>'}</tbody></table>"


def render_html(report: dict[str, Any], title: str = "NLU session flows") -> str:
    """One self-contained page: the diagram and the tables."""
    summary = [
        ("records", report["records"]),
        ("records without a scope (not used)", report["stateless_records"]),
        ("scopes", report["scopes"]),
        ("visits", report["visits"]),
        ("multi-request utterances", report["split_requests"]),
        ("abstain → rephrase pairs", report["rephrase_pairs"]),
        ("… rephrase accepted", report["rephrase_accepted"]),
        *((f"context: {k}", v) for k, v in report["context_actions"].items()),
        *((f"clarify: {k}", v) for k, v in report["clarify"].items()),
    ]
    nexts = [
        (a, ", ".join(f"{x['to']} {x['share'] * 100:.0f}% ({x['count']})" for x in rows))
        for a, rows in report["next_intent"].items()
    ]
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:70em}"
            "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:left;vertical-align:top}th{background:#f4f4f4}h2{margin-top:1.5em}</style>",
            "</head><body>",
            f"<h1>{html.escape(title)}</h1>",
            _table(("", "count"), summary),
            "<h2>Transition diagram</h2>",
            "<p>States are accepted intents, <code>(abstain)</code> and <code>(reject)</code>; an arrow is "
            "a request followed by another in the same visit (the number is how often).</p>",
            diagram(report),
            "<h2>Most common transitions</h2>",
            _table(
                ("from", "to", "count"), ((t["from"], t["to"], t["count"]) for t in report["transitions"])
            ),
            "<h2>Next-intent frequencies</h2>",
            _table(("after", "next (share, count)"), nexts),
            "<h2>Abstain → rephrase</h2>",
            "<p>A new request in the same scope shortly after an abstention: the words that failed and "
            "the words that followed are the best teacher material.</p>",
            _table(
                ("abstained", "rephrased", "rephrased as", "count"),
                (
                    (p["abstained"], p["rephrased"], p["rephrased_intent"], p["count"])
                    for p in report["top_rephrases"]
                ),
            ),
            "<h2>Intents followed by a cancel</h2>",
            _table(
                ("intent", "accepted", "cancelled", "share"),
                (
                    (c["intent"], c["accepted"], c["cancelled"], f"{c['share'] * 100:.1f}%")
                    for c in report["followed_by_cancel"]
                ),
            ),
            "<h2>Sessions</h2>",
            _table(
                ("scope", "start", "sequence"),
                ((s["scope"], s["start"], " → ".join(s["states"])) for s in report["sequences"]),
            ),
            "</body></html>",
        ]
    )


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"records {report['records']} ({report['stateless_records']} without a scope), "
        f"scopes {report['scopes']}, "
        f"visits {report['visits']}, multi-request utterances {report['split_requests']}, "
        f"abstain → rephrase {report['rephrase_pairs']} ({report['rephrase_accepted']} accepted)",
        "",
        "| from | to | count |",
        "|---|---|---|",
        *(f"| {t['from']} | {t['to']} | {t['count']} |" for t in report["transitions"]),
        "",
        "| intent | accepted | followed by a cancel |",
        "|---|---|---|",
        *(f"| {c['intent']} | {c['accepted']} | {c['cancelled']} |" for c in report["followed_by_cancel"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m tools.flows", description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path, help="audit files or folders")
    parser.add_argument("--out", type=Path, help="write flows.json and flows.html here")
    parser.add_argument("--rephrase-window", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--gap", type=float, default=300.0, help="a pause this long starts a new visit (s)")
    parser.add_argument("--top", type=int, default=20, help="rows per table")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    files = log_files(args.logs)
    missing = [str(f) for f in files if not f.exists()]
    if not files or missing:
        print(f"no audit log at {', '.join(missing) or ', '.join(map(str, args.logs))}", file=sys.stderr)
        return 2
    bad: Counter[str] = Counter()
    report = analyse(
        read_records(files, bad), rephrase_window_s=args.rephrase_window, gap_s=args.gap, top=args.top
    )
    report["unreadable_lines"] = dict(bad)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "flows.json").write_text(
            json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        (args.out / "flows.html").write_text(render_html(report), encoding="utf-8")
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else _markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
