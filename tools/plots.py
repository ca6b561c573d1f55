"""Benchmark figures as PNG files: reliability diagram and risk-coverage curve (matplotlib, Agg backend)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

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
    gate_point: tuple[float, float] | None,
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
    if gate_point is not None:
        ax.plot(gate_point[0], gate_point[1], "^", color="#c44e52", label="model gate (accept)")
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
