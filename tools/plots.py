"""What a person reads of a benchmark: PNG figures (matplotlib, Agg backend) and ``report.md``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never pick an interactive backend on a server or in CI

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from .metrics import Bin, CurvePoint  # noqa: E402

_LOGGER = logging.getLogger(__name__)


def reliability_diagram(bins: Sequence[Bin], ece: float | None, path: Path, title: str = "") -> Path:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration and bin counts."""
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    width = bins[0].hi - bins[0].lo if bins else 1.0
    filled = [b for b in bins if b.count]
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    top.bar(
        [b.lo for b in filled],
        [b.accuracy for b in filled],
        width=width,
        align="edge",
        edgecolor="black",
        color="#4c72b0",
        alpha=0.8,
        label="accuracy",
    )
    top.bar(
        [b.lo for b in filled],
        [b.confidence - b.accuracy for b in filled],
        bottom=[b.accuracy for b in filled],
        width=width,
        align="edge",
        edgecolor="#c44e52",
        color="#c44e52",
        alpha=0.3,
        hatch="//",
        label="gap",
    )
    top.set_ylim(0, 1)
    top.set_ylabel("top-1 accuracy")
    ece_text = f"ECE = {ece:.4f}" if ece is not None else "ECE = n/a"
    top.set_title(f"{title} reliability ({ece_text})".strip())
    top.legend(loc="upper left", fontsize=8)
    bottom.bar([b.lo for b in bins], [b.count for b in bins], width=width, align="edge", color="grey")
    bottom.set_yscale("symlog")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    _LOGGER.debug("wrote %s", path)
    return path


def risk_coverage_curve(
    curve: Sequence[CurvePoint],
    path: Path,
    *,
    target: float,
    oracle: CurvePoint | None,
    val_point: CurvePoint | None,
    gate_point: CurvePoint | None,
    title: str = "",
) -> Path:
    """Selective risk (1 - precision of accepted) against in-scope coverage as the threshold falls."""
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    pts = [p for p in curve if p.precision is not None]
    ax.plot(
        [p.coverage for p in pts],
        [1.0 - (p.precision or 0.0) for p in pts],
        color="#4c72b0",
        label="threshold sweep",
    )
    ax.axhline(1.0 - target, color="grey", linestyle="--", linewidth=1, label=f"risk {1.0 - target:.0%}")
    if oracle is not None and oracle.precision is not None:
        ax.plot(
            oracle.coverage,
            1.0 - oracle.precision,
            "o",
            color="#55a868",
            label=f"oracle t={oracle.threshold:.3f}, cov={oracle.coverage:.3f}",
        )
    if val_point is not None and val_point.precision is not None:
        ax.plot(
            val_point.coverage,
            1.0 - val_point.precision,
            "s",
            color="#dd8452",
            label=f"val t={val_point.threshold:.3f}, cov={val_point.coverage:.3f}",
        )
    if gate_point is not None and gate_point.precision is not None:
        ax.plot(
            gate_point.coverage, 1.0 - gate_point.precision, "^", color="#c44e52", label="model gate (accept)"
        )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (accepted in-scope / in-scope)")
    ax.set_ylabel("risk (1 - precision of accepted)")
    ax.set_title(f"{title} risk-coverage".strip())
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    _LOGGER.debug("wrote %s", path)
    return path


_DEFINITIONS = """\
- **In-scope accuracy / macro-F1**: top-1 intent over in-scope test rows, whatever the gate decided;
  macro-F1 averages per-intent F1 over the gold in-scope intents.
- **Accept / abstain / reject rate**: the gated outcome over all test rows (in-scope and oos) with the
  model's own thresholds; **accepted precision**: share of accepted rows whose intent is right (oos = wrong).
- **Coverage at 99% precision (oracle)**: accept rows whose confidence is >= t; coverage = accepted in-scope
  rows / in-scope rows; the largest coverage whose accepted precision (oos counted as errors) is >= 99%,
  with t picked on test. **Val threshold**: the lowest t reaching 99% precision on val predictions (made
  by the same pipeline), applied to test: the coverage and the precision it actually reaches.
- **OOS recall**: share of oos rows not accepted; **OOS precision**: share of not-accepted rows that are
  oos; **AUROC**: in-scope vs oos separation by top-1 confidence (ties count half). Null without oos rows.
- **ECE**: expected calibration error of top-1 correctness over all test rows, 15 equal-width bins
  (oos rows are never correct). A row the ranker rejects without an intent (negative evidence) keeps
  its top-ranked candidate for accuracy and ECE, but no threshold accepts it.
- **Latency**: one thread, after a warm-up; neural = the `neural` stage trace of `ParseResult.stages`,
  pipeline = the whole `Pipeline.parse` call (canonicalize + ranker + gate). **Peak RSS**: high-water mark
  of the evaluation process, which never imports torch (VmHWM; `ru_maxrss` of a child inherits the
  parent's peak on Linux). **Model bytes**: the model folder on disk.
"""


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "n/a"
    if kind == "%":
        return f"{100.0 * value:.2f}%"
    if kind == "ms":
        return f"{value:.2f} ms"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render_markdown(r: dict[str, Any]) -> str:
    """``report.md``: the figures as a table, the definitions, the worst intents and the command."""
    m, e = r["meta"], r["evaluation"]
    rows = [
        ("In-scope accuracy", _fmt(r["inscope_accuracy"], "%")),
        ("Macro-F1 (in-scope)", _fmt(r["macro_f1"], "%")),
        ("Accept rate", _fmt(r["accept_rate"], "%")),
        ("Abstain rate", _fmt(r["abstain_rate"], "%")),
        ("Reject rate", _fmt(r["reject_rate"], "%")),
        ("Accepted precision", _fmt(r["accepted_precision"], "%")),
        (
            "Coverage at 99% precision (oracle)",
            f"{_fmt(r['coverage_at_99_precision'], '%')} (t = {_fmt(r['oracle_threshold'])})",
        ),
        (
            "Coverage at val threshold",
            f"{_fmt(r['coverage_at_val_threshold'], '%')} (t = {_fmt(r['val_threshold'])})",
        ),
        ("Precision at val threshold", _fmt(r["precision_at_val_threshold"], "%")),
        ("OOS recall", _fmt(r["oos_recall"], "%")),
        ("OOS precision", _fmt(r["oos_precision"], "%")),
        ("OOS AUROC", _fmt(r["oos_auroc"])),
        ("ECE (15 bins)", _fmt(r["ece"])),
        ("Neural stage p50 / p99", f"{_fmt(r['neural_p50_ms'], 'ms')} / {_fmt(r['neural_p99_ms'], 'ms')}"),
        ("Pipeline p50 / p99", f"{_fmt(r['pipeline_p50_ms'], 'ms')} / {_fmt(r['pipeline_p99_ms'], 'ms')}"),
        ("Model size on disk", f"{r['model_bytes'] / 1e6:.2f} MB ({r['model_bytes']} bytes)"),
        ("Peak RSS (evaluation process)", f"{r['peak_rss_mb']} MiB (torch loaded: {e['torch_loaded']})"),
        ("Training time", "n/a" if r["train_seconds"] is None else f"{r['train_seconds']} s"),
    ]
    c = r["counts"]
    lines = [
        f"# Benchmark: `{Path(m['data']).name}`",
        "",
        f"Model `{r['model_id']}`; test rows: {c['test']} ({c['inscope']} in-scope, {c['oos']} oos); "
        f"train rows: {m['train_rows']} ({m.get('train_oos_rows', 0)} oos, "
        f"{'used' if m['use_oos_train'] else 'not used'} in training); "
        f"val rows: {m['val_rows']} ({m['val_source']}); seed {m['seed']}; threads {e['threads']}; "
        f"gate {e['gate']}.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "![reliability](reliability.png) ![risk-coverage](risk_coverage.png)",
        "",
        "## Definitions",
        "",
        _DEFINITIONS,
    ]
    if e["catalog_policies_on_bench_intents"]:
        names = ", ".join(e["catalog_policies_on_bench_intents"])
        lines += [f"Catalog per-intent thresholds also applied to: {names}.", ""]
    worst = sorted(r["per_intent"].items(), key=lambda kv: kv[1]["f1"])[:10]
    lines += [
        "## Weakest intents (top-1 F1)",
        "",
        "| intent | support | precision | recall | F1 |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {v['support']} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} |"
        for k, v in worst
    ]
    lines += ["", "## Top confusions (in-scope, top-1)", "", "| gold | predicted | count |", "|---|---|---|"]
    lines += [f"| {x['gold']} | {x['predicted']} | {x['count']} |" for x in r["confusions"][:10]]
    lines += ["", "## Reproduce", "", "```bash", m["command"], "```", ""]
    return "\n".join(lines)
