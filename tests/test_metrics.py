"""Benchmark metrics as tables of small hand-computed cases."""

from __future__ import annotations

import math

import pytest

from tools import metrics
from tools.metrics import CurvePoint, Prediction

INF = math.inf


@pytest.mark.parametrize(
    ("positive", "negative", "expected"),
    [
        ([0.9, 0.8], [0.1, 0.2], 1.0),  # perfect separation
        ([0.1, 0.2], [0.9, 0.8], 0.0),  # perfectly inverted
        ([0.5, 0.5], [0.5], 0.5),  # all tied: random
        ([0.9, 0.4], [0.5, 0.1], 0.75),  # 3 of 4 pairs ordered
        ([0.5, 0.9], [0.5], 0.75),  # one tie counts half
        ([0.7, 0.3, 0.7, 0.3], [0.7, 0.3], 0.5),  # same distribution
        ([], [0.1], None),
        ([0.3], [], None),
    ],
)
def test_auroc(positive: list[float], negative: list[float], expected: float | None) -> None:
    got = metrics.auroc(positive, negative)
    assert got == pytest.approx(expected) if expected is not None else got is None


@pytest.mark.parametrize(
    ("confidences", "correct", "expected"),
    [
        ([0.8] * 10, [True] * 8 + [False] * 2, 0.0),  # calibrated: 80% sure, 80% right
        ([0.8] * 5 + [0.2] * 5, [True] * 4 + [False] + [True] + [False] * 4, 0.0),  # two calibrated bins
        ([0.9] * 4, [True, True, False, False], 0.4),  # overconfident
        ([1.0, 1.0, 0.5, 0.5], [True, True, False, False], 0.25),  # one bin off by 0.5, half the rows
        ([0.3], [True], 0.7),  # underconfident
        ([], [], None),
    ],
)
def test_expected_calibration_error(
    confidences: list[float], correct: list[bool], expected: float | None
) -> None:
    got = metrics.expected_calibration_error(metrics.reliability(confidences, correct))
    assert got == pytest.approx(expected) if expected is not None else got is None


@pytest.mark.parametrize(
    ("confidence", "bin_index"),
    [(0.0, 0), (1 / 15, 0), (0.07, 1), (0.5, 7), (0.99, 14), (1.0, 14)],
)
def test_reliability_bins_are_right_closed(confidence: float, bin_index: int) -> None:
    bins = metrics.reliability([confidence], [True])
    assert len(bins) == metrics.ECE_BINS
    assert [b.count for b in bins].index(1) == bin_index
    assert bins[bin_index].lo < confidence <= bins[bin_index].hi or confidence == 0.0


IN4 = [True] * 4
T, F = True, False


@pytest.mark.parametrize(
    ("rows", "target", "oracle", "lowest"),
    [
        # (score, correct, in scope). Precision 1, 1, 2/3, 3/4 as the threshold falls: 99% keeps the top two.
        ([(0.9, T, T), (0.8, T, T), (0.7, F, T), (0.6, T, T)], 0.99, CurvePoint(0.8, 2, 0.5, 1.0), 0.8),
        ([(0.9, T, T), (0.8, T, T), (0.7, F, T), (0.6, T, T)], 0.75, CurvePoint(0.6, 4, 1.0, 0.75), 0.6),
        # An accepted out-of-scope row at the top is an error no lower threshold can undo.
        ([(0.95, F, F), (0.9, T, T), (0.5, T, T)], 0.99, None, None),
        # Non-monotone precision (1, 1/2, 2/3, 3/4, 4/5): 0.6 and 0.5 reach 75%, the lowest is 0.5.
        (
            [(0.9, T, T), (0.8, F, T), (0.7, T, T), (0.6, T, T), (0.5, T, T)],
            0.75,
            CurvePoint(0.5, 5, 1.0, 0.8),
            0.5,
        ),
        # A row without an intent (score -inf) is never accepted but counts as in-scope.
        ([(0.9, T, T), (-INF, F, T)], 0.99, CurvePoint(0.9, 1, 0.5, 1.0), 0.9),
        ([], 0.99, None, None),
    ],
)
def test_coverage_at_precision(
    rows: list[tuple[float, bool, bool]], target: float, oracle: CurvePoint | None, lowest: float | None
) -> None:
    scores, correct, in_scope = ([r[i] for r in rows] for i in range(3))
    curve = metrics.risk_coverage(scores, correct, in_scope)  # type: ignore[arg-type]
    assert metrics.oracle_point(curve, target) == oracle
    assert metrics.lowest_threshold(curve, target) == lowest


def test_risk_coverage_accepts_ties_together() -> None:
    curve = metrics.risk_coverage([0.9, 0.9, 0.5], [True, False, True], [True, True, True])
    assert [(p.threshold, p.accepted) for p in curve] == [(0.9, 2), (0.5, 3)]
    assert curve[0].precision == pytest.approx(0.5)
    assert curve[1].coverage == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.75, CurvePoint(0.75, 2, 0.5, 1.0)),
        (0.0, CurvePoint(0.0, 4, 1.0, 0.75)),
        (INF, CurvePoint(INF, 0, 0.0, None)),  # accept nothing: precision undefined
    ],
)
def test_at_threshold(threshold: float, expected: CurvePoint) -> None:
    got = metrics.at_threshold([0.9, 0.8, 0.7, 0.6], [True, True, False, True], IN4, threshold)
    assert got.accepted == expected.accepted
    assert got.coverage == pytest.approx(expected.coverage)
    assert got.precision == (pytest.approx(expected.precision) if expected.precision is not None else None)


def test_per_intent_and_macro_f1() -> None:
    scores = metrics.per_intent(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert (scores["a"].support, scores["a"].predicted, scores["a"].precision, scores["a"].recall) == (
        2,
        1,
        1.0,
        0.5,
    )
    assert scores["a"].f1 == pytest.approx(2 / 3)
    assert scores["b"].precision == pytest.approx(2 / 3)
    assert scores["b"].recall == 1.0
    assert scores["b"].f1 == pytest.approx(0.8)
    assert metrics.macro_f1(scores) == pytest.approx((2 / 3 + 0.8) / 2)
    assert metrics.accuracy(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == 0.75
    assert metrics.per_intent(["a"], [None])["a"] == metrics.IntentScore(1, 0, 0.0, 0.0, 0.0)
    assert metrics.macro_f1({}) is None


def test_confusion_pairs_rank_by_count_then_name() -> None:
    got = metrics.confusion_pairs(["a", "a", "b", "c", "c", "d"], ["b", "b", "a", None, "a", "d"], top=3)
    assert got == [
        metrics.Confusion("a", "b", 2),
        metrics.Confusion("b", "a", 1),
        metrics.Confusion("c", "<none>", 1),
    ]


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        (
            ["accept", "abstain", "accept", "reject"],
            {"accept": 0.5, "abstain": 0.25, "reject": 0.25, "error": 0.0},
        ),
        ([], {"accept": 0.0, "abstain": 0.0, "reject": 0.0, "error": 0.0}),
    ],
)
def test_outcome_rates(outcomes: list[str], expected: dict[str, float]) -> None:
    assert metrics.outcome_rates(outcomes) == expected


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([1.0, 2.0, 3.0, 4.0], 50, 2.5), ([1.0, 2.0, 3.0, 4.0], 99, 3.97), ([5.0], 99, 5.0), ([], 50, None)],
)
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    got = metrics.percentile(values, q)
    assert got == pytest.approx(expected) if expected is not None else got is None


def _p(gold: str, intent: str | None, conf: float, outcome: str, ms: float = 1.0) -> Prediction:
    return Prediction(
        text="x", gold=gold, intent=intent, confidence=conf, outcome=outcome, pipeline_ms=ms, neural_ms=ms / 2
    )


TEST = [
    _p("a", "a", 0.95, "accept", 1.0),
    _p("a", "b", 0.60, "abstain", 2.0),
    _p("b", "b", 0.90, "accept", 3.0),
    _p("oos", "a", 0.85, "accept", 4.0),
    _p("oos", "b", 0.30, "reject", 5.0),
]
VAL = [_p("a", "a", 0.9, "accept"), _p("b", "a", 0.7, "abstain"), _p("b", "b", 0.8, "accept")]


def test_score_toy_set() -> None:
    s = metrics.score(TEST, VAL)
    assert (s.n_test, s.n_inscope, s.n_oos) == (5, 3, 2)
    assert s.inscope_accuracy == pytest.approx(2 / 3)
    assert s.macro_f1 == pytest.approx(2 / 3)  # a: P 1, R 1/2; b: P 1/2, R 1 → F1 2/3 each
    assert (s.accept_rate, s.abstain_rate, s.reject_rate) == pytest.approx((0.6, 0.2, 0.2))
    assert s.accepted_precision == pytest.approx(2 / 3)  # the accepted oos row is an error
    assert s.gate_coverage == pytest.approx(2 / 3)
    assert s.oos_recall == pytest.approx(0.5)
    assert s.oos_precision == pytest.approx(0.5)
    assert s.oos_auroc == pytest.approx(5 / 6)
    # Oracle: thresholds 0.95 and 0.9 keep precision 1; 0.85 lets the oos row in.
    assert s.coverage_at_99_precision == pytest.approx(2 / 3)
    assert s.oracle_threshold == 0.9
    # Val: 0.9 and 0.8 are clean, 0.7 is not → threshold 0.8, which on test also takes the oos row.
    assert s.val_threshold == 0.8
    assert s.coverage_at_val_threshold == pytest.approx(2 / 3)
    assert s.precision_at_val_threshold == pytest.approx(2 / 3)
    assert s.ece == pytest.approx((0.05 + 0.1 + 0.85 + 0.6 + 0.3) / 5)
    assert s.pipeline_p50_ms == pytest.approx(3.0)
    assert s.neural_p50_ms == pytest.approx(1.5)
    assert s.confusions == [metrics.Confusion("a", "b", 1)]
    assert s.oos_accepted_as == {"a": 1}


def test_score_without_oos_rows_gives_null_oos_figures() -> None:
    s = metrics.score([p for p in TEST if p.in_scope], VAL)
    assert (s.oos_recall, s.oos_precision, s.oos_auroc) == (None, None, None)
    assert s.accepted_precision == 1.0
    assert s.coverage_at_99_precision == pytest.approx(2 / 3)  # the wrong row sits at 0.6, below both


def test_unanswered_row_counts_for_accuracy_but_is_never_accepted() -> None:
    row = Prediction("x", "a", "a", 0.99, "reject", 1.0, answered=False)
    s = metrics.score([row, _p("a", "a", 0.5, "accept")], [])
    assert s.inscope_accuracy == 1.0
    assert row.correct and row.score == -INF
    assert s.risk_coverage == [CurvePoint(0.5, 1, 0.5, 1.0)]


def test_score_when_val_never_reaches_the_target() -> None:
    s = metrics.score(TEST, [_p("a", "b", 0.9, "accept")])
    assert s.val_threshold is None
    assert s.coverage_at_val_threshold == 0.0
    assert s.precision_at_val_threshold is None
