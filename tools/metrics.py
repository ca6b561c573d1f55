"""Pure scoring functions for the benchmark: accuracy, F1, gate rates, calibration, selective prediction."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import msgspec
import numpy as np

OOS = "oos"
ECE_BINS = 15
TARGET_PRECISION = 0.99


class Prediction(msgspec.Struct, frozen=True):
    """One utterance: its gold label and what the pipeline did (top-1 intent, confidence, gated outcome).

    ``answered`` is False when the decision carries no intent (e.g. the ranker rejected on negative
    evidence): ``intent`` is then the top-ranked candidate, kept for top-1 accuracy and calibration,
    but no confidence threshold can accept the row.
    """

    text: str
    gold: str
    intent: str | None
    confidence: float
    outcome: str
    pipeline_ms: float
    neural_ms: float | None = None
    locale: str = ""
    answered: bool = True

    @property
    def in_scope(self) -> bool:
        """False for out-of-scope rows."""
        return self.gold != OOS

    @property
    def correct(self) -> bool:
        """Top-1 is the gold intent (an out-of-scope row is never correct)."""
        return self.in_scope and self.intent == self.gold

    @property
    def accepted(self) -> bool:
        """The gate accepted the answer."""
        return self.outcome == "accept"

    @property
    def score(self) -> float:
        """Confidence for threshold sweeps; a row without an answer can never be accepted."""
        return self.confidence if self.answered and self.intent is not None else -math.inf


class IntentScore(msgspec.Struct, frozen=True):
    """Top-1 precision / recall / F1 of one intent over in-scope rows."""

    support: int
    predicted: int
    precision: float
    recall: float
    f1: float


class Confusion(msgspec.Struct, frozen=True):
    """How often ``gold`` was answered as ``predicted``."""

    gold: str
    predicted: str
    count: int


class Bin(msgspec.Struct, frozen=True):
    """One confidence bin of a reliability diagram: interval (lo, hi], mean confidence, accuracy."""

    lo: float
    hi: float
    count: int
    confidence: float
    accuracy: float


class CurvePoint(msgspec.Struct, frozen=True):
    """Accepting every row whose confidence is >= ``threshold``: in-scope coverage and precision."""

    threshold: float
    accepted: int
    coverage: float
    precision: float | None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def accuracy(golds: Sequence[str], preds: Sequence[str | None]) -> float | None:
    """Share of rows whose prediction equals the gold label."""
    return _ratio(sum(g == p for g, p in zip(golds, preds, strict=True)), len(golds))


def per_intent(golds: Sequence[str], preds: Sequence[str | None]) -> dict[str, IntentScore]:
    """Per gold label: support, how often it was predicted, precision, recall and F1 (0 when undefined)."""
    support = Counter(golds)
    predicted = Counter(p for p in preds if p is not None)
    hits = Counter(g for g, p in zip(golds, preds, strict=True) if g == p)
    out: dict[str, IntentScore] = {}
    for label in sorted(support):
        tp = hits[label]
        prec = tp / predicted[label] if predicted[label] else 0.0
        rec = tp / support[label]
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[label] = IntentScore(support[label], predicted[label], prec, rec, f1)
    return out


def macro_f1(scores: dict[str, IntentScore]) -> float | None:
    """Unweighted mean F1 over the gold labels."""
    return _ratio(sum(s.f1 for s in scores.values()), len(scores))


def confusion_pairs(golds: Sequence[str], preds: Sequence[str | None], top: int = 20) -> list[Confusion]:
    """The most frequent (gold, predicted) mistakes; ties ordered by name for stable output."""
    counts = Counter(
        (g, p if p is not None else "<none>") for g, p in zip(golds, preds, strict=True) if g != p
    )
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [Confusion(g, p, n) for (g, p), n in ranked[:top]]


def outcome_rates(outcomes: Sequence[str]) -> dict[str, float]:
    """Share of accept / abstain / reject / error outcomes."""
    counts = Counter(outcomes)
    n = len(outcomes)
    return {k: counts[k] / n if n else 0.0 for k in ("accept", "abstain", "reject", "error")}


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0
    return np.asarray(mean_rank[inverse], dtype=float)


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """Probability that a positive scores above a negative (ties count half); None if a side is empty."""
    if not positive or not negative:
        return None
    scores = np.asarray([*positive, *negative], dtype=float)
    ranks = _average_ranks(scores)
    n_pos, n_neg = len(positive), len(negative)
    rank_sum = float(ranks[:n_pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def reliability(confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> list[Bin]:
    """Equal-width bins over [0, 1]: bin k holds (k/B, (k+1)/B], confidence 0 goes to the first."""
    conf = np.clip(np.asarray(confidences, dtype=float), 0.0, 1.0)
    ok = np.asarray(correct, dtype=float)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        mask = idx == k
        n = int(mask.sum())
        out.append(
            Bin(
                lo=k / bins,
                hi=(k + 1) / bins,
                count=n,
                confidence=float(conf[mask].mean()) if n else 0.0,
                accuracy=float(ok[mask].mean()) if n else 0.0,
            )
        )
    return out


def expected_calibration_error(bins: Sequence[Bin]) -> float | None:
    """Sum over bins of |accuracy - confidence| weighted by the bin's share of rows."""
    total = sum(b.count for b in bins)
    if not total:
        return None
    return sum(b.count * abs(b.accuracy - b.confidence) for b in bins) / total


def risk_coverage(
    scores: Sequence[float], correct: Sequence[bool], in_scope: Sequence[bool]
) -> list[CurvePoint]:
    """One point per distinct finite score, highest threshold first.

    Accepting rows with score >= t: coverage = accepted in-scope rows / all in-scope rows;
    precision = correct accepted rows / accepted rows (accepted out-of-scope rows are errors).
    """
    n_in = sum(in_scope)
    rows = sorted(
        ((s, c, i) for s, c, i in zip(scores, correct, in_scope, strict=True) if math.isfinite(s)),
        key=lambda r: -r[0],
    )
    points: list[CurvePoint] = []
    accepted = hits = covered = 0
    for pos, (score, ok, ins) in enumerate(rows):
        accepted += 1
        hits += ok
        covered += ins
        # Rows tied on the score are accepted together: emit a point only at the end of a tie group.
        if pos + 1 < len(rows) and rows[pos + 1][0] == score:
            continue
        points.append(CurvePoint(score, accepted, covered / n_in if n_in else 0.0, hits / accepted))
    return points


def oracle_point(curve: Sequence[CurvePoint], target: float = TARGET_PRECISION) -> CurvePoint | None:
    """The point of largest coverage whose precision reaches ``target`` (higher precision breaks ties)."""
    ok = [p for p in curve if p.precision is not None and p.precision >= target]
    if not ok:
        return None
    return max(ok, key=lambda p: (p.coverage, p.precision or 0.0, p.threshold))


def lowest_threshold(curve: Sequence[CurvePoint], target: float = TARGET_PRECISION) -> float | None:
    """The lowest threshold whose accepted precision reaches ``target``; None if none does."""
    ok = [p.threshold for p in curve if p.precision is not None and p.precision >= target]
    return min(ok) if ok else None


def at_threshold(
    scores: Sequence[float], correct: Sequence[bool], in_scope: Sequence[bool], threshold: float
) -> CurvePoint:
    """Coverage and precision when accepting every row with score >= ``threshold``."""
    n_in = sum(in_scope)
    taken = [(c, i) for s, c, i in zip(scores, correct, in_scope, strict=True) if s >= threshold]
    hits = sum(c for c, _ in taken)
    covered = sum(i for _, i in taken)
    return CurvePoint(threshold, len(taken), covered / n_in if n_in else 0.0, _ratio(hits, len(taken)))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation); None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


class Scores(msgspec.Struct, frozen=True):
    """Every quality figure of one benchmark run (latency and resources are added by the tool)."""

    n_test: int
    n_inscope: int
    n_oos: int
    inscope_accuracy: float | None
    macro_f1: float | None
    accept_rate: float
    abstain_rate: float
    reject_rate: float
    accepted_precision: float | None
    gate_coverage: float | None
    coverage_at_99_precision: float | None
    oracle_threshold: float | None
    precision_at_oracle: float | None
    val_threshold: float | None
    coverage_at_val_threshold: float | None
    precision_at_val_threshold: float | None
    oos_recall: float | None
    oos_precision: float | None
    oos_auroc: float | None
    ece: float | None
    neural_p50_ms: float | None
    neural_p99_ms: float | None
    pipeline_p50_ms: float | None
    pipeline_p99_ms: float | None
    per_intent: dict[str, IntentScore]
    confusions: list[Confusion]
    oos_accepted_as: dict[str, int]
    reliability: list[Bin]
    risk_coverage: list[CurvePoint]


def score(test: Sequence[Prediction], val: Sequence[Prediction], target: float = TARGET_PRECISION) -> Scores:
    """All quality figures for ``test``; the selective threshold is chosen on ``val`` only."""
    inscope = [p for p in test if p.in_scope]
    oos = [p for p in test if not p.in_scope]
    golds = [p.gold for p in inscope]
    preds = [p.intent for p in inscope]
    intents = per_intent(golds, preds)
    rates = outcome_rates([p.outcome for p in test])
    accepted = [p for p in test if p.accepted]
    refused = [p for p in test if not p.accepted]
    bins = reliability([p.confidence for p in test], [p.correct for p in test])
    scores_, correct, in_scope = (
        [p.score for p in test],
        [p.correct for p in test],
        [p.in_scope for p in test],
    )
    curve = risk_coverage(scores_, correct, in_scope)
    oracle = oracle_point(curve, target)
    val_t = lowest_threshold(
        risk_coverage([p.score for p in val], [p.correct for p in val], [p.in_scope for p in val]), target
    )
    # No threshold reaches the target on val: accept nothing (coverage 0, precision undefined).
    val_point = at_threshold(scores_, correct, in_scope, val_t if val_t is not None else math.inf)
    neural = [p.neural_ms for p in test if p.neural_ms is not None]
    pipeline = [p.pipeline_ms for p in test]
    return Scores(
        n_test=len(test),
        n_inscope=len(inscope),
        n_oos=len(oos),
        inscope_accuracy=accuracy(golds, preds),
        macro_f1=macro_f1(intents),
        accept_rate=rates["accept"],
        abstain_rate=rates["abstain"],
        reject_rate=rates["reject"],
        accepted_precision=_ratio(sum(p.correct for p in accepted), len(accepted)),
        gate_coverage=_ratio(sum(p.in_scope for p in accepted), len(inscope)),
        coverage_at_99_precision=oracle.coverage if oracle else 0.0,
        oracle_threshold=oracle.threshold if oracle else None,
        precision_at_oracle=oracle.precision if oracle else None,
        val_threshold=val_t,
        coverage_at_val_threshold=val_point.coverage,
        precision_at_val_threshold=val_point.precision,
        oos_recall=_ratio(sum(not p.accepted for p in oos), len(oos)) if oos else None,
        oos_precision=_ratio(sum(not p.in_scope for p in refused), len(refused)) if oos else None,
        oos_auroc=auroc([p.confidence for p in inscope], [p.confidence for p in oos]),
        ece=expected_calibration_error(bins),
        neural_p50_ms=percentile(neural, 50),
        neural_p99_ms=percentile(neural, 99),
        pipeline_p50_ms=percentile(pipeline, 50),
        pipeline_p99_ms=percentile(pipeline, 99),
        per_intent=intents,
        confusions=confusion_pairs(golds, preds),
        oos_accepted_as=dict(Counter(p.intent or "<none>" for p in oos if p.accepted).most_common()),
        reliability=bins,
        risk_coverage=curve,
    )
