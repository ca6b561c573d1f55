"""One self-contained HTML page from one or two ``tools.bench`` output folders, to compare before promoting.

``python -m tools.report_html RUN_DIR [RUN_DIR2] --out report.html``

Reads each folder's ``report.json`` and PNG plots (embedded as data URIs); the overlays, confusion
pairs and per-intent precision / recall are drawn as inline SVG from ``report.json``. No external asset.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_LOGGER = logging.getLogger(__name__)

COLORS = ("#4c72b0", "#dd8452")
PLOTS = ("reliability.png", "risk_coverage.png")
# (key, label, kind, direction): +1 higher is better, -1 lower is better, 0 a trade-off.
HEADLINE: tuple[tuple[str, str, str, int], ...] = (
    ("inscope_accuracy", "In-scope accuracy", "%", 1),
    ("macro_f1", "Macro-F1 (in-scope)", "%", 1),
    ("accept_rate", "Accept rate", "%", 0),
    ("abstain_rate", "Abstain rate", "%", 0),
    ("reject_rate", "Reject rate", "%", 0),
    ("accepted_precision", "Accepted precision", "%", 1),
    ("coverage_at_99_precision", "Coverage at 99% precision (oracle)", "%", 1),
    ("coverage_at_val_threshold", "Coverage at val threshold", "%", 1),
    ("precision_at_val_threshold", "Precision at val threshold", "%", 1),
    ("oos_recall", "OOS recall", "%", 1),
    ("oos_precision", "OOS precision", "%", 1),
    ("oos_auroc", "OOS AUROC", "f", 1),
    ("ece", "ECE (15 bins)", "f", -1),
    ("neural_p50_ms", "Neural p50", "ms", -1),
    ("neural_p99_ms", "Neural p99", "ms", -1),
    ("pipeline_p50_ms", "Pipeline p50", "ms", -1),
    ("pipeline_p99_ms", "Pipeline p99", "ms", -1),
    ("model_bytes", "Model size", "MB", -1),
    ("peak_rss_mb", "Peak RSS", "MiB", -1),
    ("train_seconds", "Training time", "s", -1),
)
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#1d232a;margin:1.5rem auto;max-width:1280px;padding:0 1rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #d8dde2}
table{border-collapse:collapse;margin:.5rem 0}
th,td{padding:.2rem .6rem;border-bottom:1px solid #e3e6ea;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.better{color:#2e7d32;font-weight:600}
.worse{color:#c62828;font-weight:600}.muted{color:#66707a}.runs{display:grid;gap:1rem}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:1rem;align-items:start}
img{max-width:100%;border:1px solid #e3e6ea}code{background:#f0f2f4;padding:0 .25rem}svg{max-width:100%}
.key{display:inline-block;width:.8rem;height:.8rem;margin:0 .25rem 0 .8rem;vertical-align:middle}
"""


class ReportError(RuntimeError):
    """A run folder cannot be read."""


class Run:
    """One bench output folder: its report and its plots."""

    def __init__(self, folder: Path, label: str) -> None:
        path = folder / "report.json"
        try:
            self.report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReportError(f"{path}: cannot read the bench report: {exc}") from exc
        self.folder = folder
        self.label = label
        self.name = f"{label}: {self.report.get('model_id', folder.name)}"

    def png(self, name: str) -> str | None:
        """The plot as a data URI, or None if the folder lacks it."""
        path = self.folder / name
        if not path.is_file():
            return None
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, kind: str) -> str:
    """A headline value for people."""
    if value is None:
        return "n/a"
    if kind == "%":
        return f"{100.0 * value:.2f}%"
    if kind == "MB":
        return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"
    if kind in ("ms", "s", "MiB"):
        return f"{value:.2f} {kind}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def verdict(a: Any, b: Any, direction: int) -> str:
    """``better`` / ``worse`` / ``""`` for B against A (a tie or a trade-off is neither)."""
    if direction == 0 or a is None or b is None or a == b:
        return ""
    return "better" if (b - a) * direction > 0 else "worse"


def _delta(a: Any, b: Any, kind: str) -> str:
    if a is None or b is None:
        return ""
    d = b - a
    if kind == "%":
        return f"{100.0 * d:+.2f} pp"
    if kind == "MB":
        return f"{d / 1e6:+.2f} MB"
    return f"{d:+.4f}" if kind == "f" else f"{d:+.2f} {kind}"


def headline_table(runs: Sequence[Run]) -> str:
    """Every headline figure side by side, with the change and whether it is better."""
    head = "".join(f"<th>{_e(r.name)}</th>" for r in runs) + (
        "<th>change (B − A)</th>" if len(runs) == 2 else ""
    )
    rows = []
    for key, label, kind, direction in HEADLINE:
        vals = [r.report.get(key) for r in runs]
        cells = "".join(f'<td class="n">{_e(fmt(v, kind))}</td>' for v in vals)
        if len(runs) == 2:
            cls = verdict(vals[0], vals[1], direction)
            cells += f'<td class="n {cls}">{_e(_delta(vals[0], vals[1], kind))}</td>'
        rows.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    return f"<table><tr><th>figure</th>{head}</tr>{''.join(rows)}</table>"


def run_facts(run: Run) -> str:
    """Where a run came from: data, split sizes, gate, command."""
    r = run.report
    m, e, c = r.get("meta", {}), r.get("evaluation", {}), r.get("counts", {})
    facts = [
        ("folder", str(run.folder)),
        ("model", r.get("model_id")),
        ("data", f"{m.get('data')} (sha256 {str(m.get('data_sha256', ''))[:12]})"),
        (
            "test rows",
            f"{c.get('test')} ({c.get('inscope')} in-scope, {c.get('oos')} oos); val {c.get('val')}",
        ),
        ("train rows", f"{m.get('train_rows')}; val source: {m.get('val_source')}"),
        ("gate", e.get("gate")),
        ("created", m.get("created")),
        ("command", m.get("command")),
    ]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    return f"<div><h3>{_e(run.name)}</h3><table>{rows}</table></div>"


def line_chart(
    series: Sequence[tuple[str, list[tuple[float, float]]]],
    x_label: str,
    y_label: str,
    *,
    diagonal: bool = False,
) -> str:
    """Lines on [0, 1] × [0, 1] axes, one colour per run."""
    w, h, pad = 460, 320, 44
    sx: Callable[[float], float] = lambda x: pad + x * (w - pad - 12)  # noqa: E731
    sy: Callable[[float], float] = lambda y: h - pad - y * (h - pad - 12)  # noqa: E731
    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{_e(y_label)}">']
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{sx(0)}" y1="{sy(t)}" x2="{sx(1)}" y2="{sy(t)}" stroke="#e3e6ea"/>')
        parts.append(f'<text x="{pad - 6}" y="{sy(t) + 4}" font-size="10" text-anchor="end">{t:g}</text>')
        parts.append(f'<text x="{sx(t)}" y="{h - pad + 14}" font-size="10" text-anchor="middle">{t:g}</text>')
    if diagonal:
        parts.append(
            f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(1)}" y2="{sy(1)}" stroke="#999" stroke-dasharray="4"/>'
        )
    for i, (_name, pts) in enumerate(series):
        if pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{COLORS[i]}" stroke-width="2"/>')
            parts += [
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{COLORS[i]}"/>' for x, y in pts[:40]
            ]
    parts.append(
        f'<text x="{(w + pad) / 2}" y="{h - 8}" font-size="11" text-anchor="middle">{_e(x_label)}</text>'
    )
    parts.append(
        f'<text x="12" y="{(h - pad) / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {(h - pad) / 2})">{_e(y_label)}</text></svg>'
    )
    return "".join(parts)


def bar_chart(
    rows: Sequence[tuple[str, Sequence[float]]],
    labels: Sequence[tuple[str, str, float]],
    *,
    max_value: float = 1.0,
) -> str:
    """Horizontal grouped bars: one group per row, one bar per (label, colour, opacity), 0 … max_value."""
    bar, gap, name_w, plot_w = 9, 6, 300, 360
    group = bar * len(labels) + gap
    h = group * len(rows) + 24
    width_all = name_w + plot_w + 60
    parts = [f'<svg viewBox="0 0 {width_all} {h}" width="{width_all}" height="{h}" role="img">']
    for i, (name, values) in enumerate(rows):
        y = 4 + i * group
        parts.append(
            f'<text x="{name_w - 6}" y="{y + bar * len(labels) / 2 + 4}" font-size="11" '
            f'text-anchor="end">{_e(name)}</text>'
        )
        for j, v in enumerate(values):
            width = plot_w * (v / max_value if max_value else 0.0)
            _, color, opacity = labels[j]
            parts.append(
                f'<rect x="{name_w}" y="{y + j * bar}" width="{width:.1f}" height="{bar - 1}" '
                f'fill="{color}" opacity="{opacity}"/>'
            )
            parts.append(
                f'<text x="{name_w + width + 4:.1f}" y="{y + j * bar + bar - 1}" font-size="9">{v:.3g}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key" style="background:{c};opacity:{o}"></span>{_e(lab)}' for lab, c, o in labels
    )
    return f'<p class="muted">{legend}</p>' + "".join(parts)


def plots_section(runs: Sequence[Run]) -> str:
    """The bench's own PNGs side by side, then overlays of both runs drawn from the data."""
    out = []
    for name in PLOTS:
        cells = []
        for run in runs:
            uri = run.png(name)
            img = (
                f'<img alt="{_e(name)} of {_e(run.name)}" src="{uri}">'
                if uri
                else f'<p class="muted">{_e(name)} missing in {_e(run.folder)}</p>'
            )
            cells.append(f"<figure><figcaption>{_e(run.name)}</figcaption>{img}</figure>")
        out.append(
            f"<h3>{_e(name.removesuffix('.png').replace('_', '-'))}</h3>"
            f'<div class="cols">{"".join(cells)}</div>'
        )
    risk = [
        (
            r.name,
            [
                (p["coverage"], p["precision"])
                for p in r.report.get("risk_coverage", [])
                if p.get("precision") is not None
            ],
        )
        for r in runs
    ]
    rel = [
        (
            r.name,
            [(b["confidence"], b["accuracy"]) for b in r.report.get("reliability", []) if b.get("count")],
        )
        for r in runs
    ]
    legend = "".join(
        f'<span class="key" style="background:{COLORS[i]}"></span>{_e(r.name)}' for i, r in enumerate(runs)
    )
    out.append(
        f'<h3>Overlays</h3><p class="muted">{legend}</p><div class="cols">'
        "<figure><figcaption>precision of accepted vs in-scope coverage (threshold falling)</figcaption>"
        f"{line_chart(risk, 'coverage', 'precision')}</figure>"
        "<figure><figcaption>reliability: accuracy vs mean confidence per bin</figcaption>"
        f"{line_chart(rel, 'confidence', 'accuracy', diagonal=True)}</figure></div>"
    )
    return "".join(out)


def confusion_section(runs: Sequence[Run], top: int) -> str:
    """The most frequent gold → predicted pairs, counts per run ("—": not in that run's top list)."""
    pairs: dict[tuple[str, str], list[int | None]] = {}
    for i, run in enumerate(runs):
        for c in run.report.get("confusions", []):
            pairs.setdefault((c["gold"], c["predicted"]), [None] * len(runs))[i] = c["count"]
    ranked = sorted(pairs.items(), key=lambda kv: (-max(n or 0 for n in kv[1]), kv[0]))[:top]
    if not ranked:
        return '<p class="muted">No confusions.</p>'
    peak = max(n or 0 for _, v in ranked for n in v)
    styles = [(r.name, COLORS[i], 1.0) for i, r in enumerate(runs)]
    bars = [(f"{g} → {p}", [float(n or 0) for n in v]) for (g, p), v in ranked]
    chart = bar_chart(bars, styles, max_value=float(peak))
    head = "".join(f"<th>{_e(r.name)}</th>" for r in runs)
    body = "".join(
        f"<tr><td>{_e(g)}</td><td>{_e(p)}</td>"
        + "".join(f'<td class="n">{"—" if n is None else n}</td>' for n in v)
        + "</tr>"
        for (g, p), v in ranked
    )
    return f"{chart}<table><tr><th>gold</th><th>predicted</th>{head}</tr>{body}</table>"


def intent_section(runs: Sequence[Run], top: int) -> str:
    """Precision and recall per intent, weakest first (lowest F1 in run A); every intent in a table."""
    names = sorted({k for r in runs for k in r.report.get("per_intent", {})})
    scores = [r.report.get("per_intent", {}) for r in runs]
    names.sort(key=lambda k: (scores[0].get(k, {}).get("f1", 0.0), k))
    labels = [
        (f"{m} · {r.label}", COLORS[i], o)
        for i, r in enumerate(runs)
        for m, o in (("precision", 1.0), ("recall", 0.5))
    ]
    rows = [
        (k, [s.get(k, {}).get(m, 0.0) for s in scores for m in ("precision", "recall")]) for k in names[:top]
    ]
    head = "".join(
        f"<th>{_e(r.label)} P</th><th>{_e(r.label)} R</th><th>{_e(r.label)} F1</th><th>{_e(r.label)} n</th>"
        for r in runs
    )
    if len(runs) == 2:
        head += "<th>ΔF1</th>"
    body = []
    for k in names:
        cells = "".join(_intent_cells(s.get(k)) for s in scores)
        if len(runs) == 2:
            a, b = (s.get(k, {}).get("f1") for s in scores)
            cells += f'<td class="n {verdict(a, b, 1)}">{_e(_delta(a, b, "f"))}</td>'
        body.append(f"<tr><td>{_e(k)}</td>{cells}</tr>")
    return (
        f'<p class="muted">The {min(top, len(names))} weakest of {len(names)} intents by F1 '
        f"({_e(runs[0].label)}).</p>{bar_chart(rows, labels)}<details><summary>All intents</summary>"
        f"<table><tr><th>intent</th>{head}</tr>{''.join(body)}</table></details>"
    )


def _intent_cells(v: dict[str, Any] | None) -> str:
    if not v:
        return '<td colspan="4" class="muted">absent</td>'
    figures = "".join(f'<td class="n">{v[m]:.3f}</td>' for m in ("precision", "recall", "f1"))
    return figures + f'<td class="n">{v["support"]}</td>'


def render(runs: Sequence[Run], *, top_confusions: int = 20, top_intents: int = 40) -> str:
    """The whole page."""
    title = " vs ".join(r.name for r in runs)
    created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Evaluation: {_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>Evaluation report: {_e(title)}</h1><p class="muted">Generated {created} by '
        f"<code>python -m tools.report_html</code>. Green = B better than A, red = worse; rates without a "
        f"direction (accept / abstain / reject) are a trade-off.</p>"
        f'<h2>Runs</h2><div class="cols">{"".join(run_facts(r) for r in runs)}</div>'
        f"<h2>Headline figures</h2>{headline_table(runs)}"
        f"<h2>Plots</h2>{plots_section(runs)}"
        f"<h2>Confusion pairs (in-scope, top-1)</h2>{confusion_section(runs, top_confusions)}"
        f"<h2>Per-intent precision and recall</h2>{intent_section(runs, top_intents)}"
        "</body></html>\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m tools.report_html", description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="one or two tools.bench output folders (A, then B)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    parser.add_argument("--top-confusions", type=int, default=20)
    parser.add_argument(
        "--top-intents", type=int, default=40, help="intents in the chart (the table has all)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(args.runs) > 2:
        parser.error("at most two run folders")
    try:
        runs = [Run(folder, label) for folder, label in zip(args.runs, "AB", strict=False)]
    except ReportError as exc:
        _LOGGER.error("%s", exc)
        return 2
    page = render(runs, top_confusions=args.top_confusions, top_intents=args.top_intents)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    _LOGGER.info("wrote %s (%d KiB)", args.out, len(page.encode()) // 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
