"""Fit the blend weights, the calibration map and the reject margin on validation data (numpy only)."""

from __future__ import annotations

import itertools
import logging

import msgspec
import numpy as np

from skill.scoring import CALIBRATION_FEATURES, Blend, Calibration, calibrate, score_batch

_LOGGER = logging.getLogger(__name__)

W_KNN_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
W_PRIOR_GRID = (0.0, 0.5, 1.0, 2.0)
NEG_MARGIN_GRID = (-0.1, -0.05, 0.0, 0.05, 0.1, 0.2)
NEVER_REJECT = 10.0  # cosine gaps lie in [-2, 2]: a margin of 10 never rejects


class ValBatch(msgspec.Struct, frozen=True):
    """Model outputs on validation rows; ``gold`` is -1 for out-of-scope rows."""

    probs: np.ndarray
    sims: np.ndarray
    labels: np.ndarray
    neg_sims: np.ndarray | None
    gold: np.ndarray
    unk: np.ndarray | None = None  # share of out-of-vocabulary words per row


def fit_blend(val: ValBatch, log_prior: np.ndarray, k: int) -> tuple[Blend, dict[str, float]]:
    """Grid-search (w_knn, w_prior) with w_softmax = 1 for in-scope accuracy, then log-likelihood."""
    inside = val.gold >= 0
    priors_vary = bool(np.ptp(log_prior) > 0)
    best: tuple[float, float] | None = None
    chosen = Blend(k=k)
    for w_knn, w_prior in itertools.product(W_KNN_GRID, W_PRIOR_GRID if priors_vary else (0.0,)):
        blend = Blend(w_softmax=1.0, w_knn=w_knn, w_prior=w_prior, k=k)
        sc = score_batch(val.probs[inside], val.sims[inside], val.labels[inside], None, log_prior, blend)
        acc = float((sc.top == val.gold[inside]).mean()) if inside.any() else 0.0
        s = sc.scores - sc.scores.max(axis=1, keepdims=True)
        log_q = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        ll = float(log_q[np.arange(len(s)), val.gold[inside]].mean()) if inside.any() else 0.0
        key = (acc, ll)
        if best is None or key > best:
            best, chosen = key, blend
    assert best is not None
    return chosen, {"val_accuracy_blend": best[0], "val_loglik_blend": best[1]}


def _logistic(
    x: np.ndarray, y: np.ndarray, l2: float, iters: int = 200, weights: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """L2-regularized logistic regression (Newton), rows weighted by ``weights`` (default 1); a light
    bias penalty keeps one-class data finite."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    sw = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = l2 * 0.01
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -40, 40)))
        grad = xb.T @ (sw * (p - y)) + reg * w
        hess = (xb * (sw * p * (1 - p))[:, None]).T @ xb + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def share_weights(oos: np.ndarray, share: float) -> np.ndarray | None:
    """Row weights under which the ``oos`` rows carry ``share`` of the total (the rest shared by the
    in-scope rows), each row weighing 1 on average; None (unweighted) for ``share`` 0 or one-class data."""
    oos = np.asarray(oos, dtype=bool)
    have = float(oos.mean()) if len(oos) else 0.0
    if share <= 0.0 or have in (0.0, 1.0):
        return None
    return np.where(oos, share / have, (1.0 - share) / (1.0 - have))


def fit_calibration(
    features: np.ndarray,
    correct: np.ndarray,
    l2: float = 1.0,
    names: tuple[str, ...] = CALIBRATION_FEATURES,
    weights: np.ndarray | None = None,
) -> Calibration:
    """Standardize the features (columns named ``names``) and fit P(correct | features), rows weighted
    by ``weights`` (see :func:`share_weights`)."""
    mean = np.average(features, axis=0, weights=weights)  # weights None: mean and std, to the bit
    scale = np.sqrt(np.average((features - mean) ** 2, axis=0, weights=weights))
    scale = np.where(scale < 1e-6, 1.0, scale)
    z = (features - mean) / scale
    coef, bias = _logistic(z, correct.astype(np.float64), l2, weights=weights)
    return Calibration(
        features=names,
        mean=tuple(float(v) for v in mean),
        scale=tuple(float(v) for v in scale),
        coef=tuple(float(v) for v in coef),
        bias=bias,
    )


def fit_neg_margin(  # noqa: PLR0917 - parallel arrays of the val rows
    neg_gap: np.ndarray,
    gold: np.ndarray,
    correct: np.ndarray,
    conf: np.ndarray,
    accept: float,
    weights: np.ndarray | None = None,
) -> float:
    """The near-negative rule's margin, fitted where the rule acts; ``NEVER_REJECT`` unless it helps.

    The rule is a veto on top of the calibrated confidence, which already weighs the same gap
    (``neg_gap`` is one of its features). So it is fitted on what it changes: the val rows the
    confidence ``conf`` would accept at the hub's ``accept`` threshold. A margin is worth its wrong
    accepts removed (out-of-scope or wrong intent) minus twice its correct accepts removed, minus once
    each right-intent row below the threshold it turns from an abstention (which a slower stage or the
    user can still resolve) into a rejection; the best positive worth wins, else the rule stays off.
    (Fitted before over every val row, the rule took mostly rows the confidence had already refused
    and at the hub's threshold changed nothing but a few correct accepts; fitted on accepted rows
    alone, it went on for one wrong accept removed while rejecting 14 right-intent abstentions.)
    ``gold`` is -1 for out-of-scope rows, which are never ``correct``; rows count by ``weights`` (the
    calibration's, default 1).
    """
    accepted = conf >= accept
    sw = np.ones(len(conf)) if weights is None else weights
    best_gain, best_margin = 0.0, NEVER_REJECT
    for margin in NEG_MARGIN_GRID:
        near = neg_gap > margin
        fired = accepted & near
        gain = (
            float(sw[fired & ~correct].sum())
            - 2.0 * float(sw[fired & correct].sum())
            - float(sw[near & ~accepted & correct].sum())
        )
        if gain > best_gain:
            best_gain, best_margin = gain, margin
    _LOGGER.info(
        "near-negative margin %s (worth %.0f rows over %d accepted val rows; %d oos)",
        best_margin,
        best_gain,
        int(accepted.sum()),
        int((gold < 0).sum()),
    )
    return best_margin


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs(float(conf[sel].mean()) - float(correct[sel].mean()))
    return float(total)


def fit_all(
    val: ValBatch, log_prior: np.ndarray, k: int, accept: float = 0.8, oos_share: float = 0.0
) -> tuple[Blend, Calibration, float, dict[str, float]]:
    """Blend, then calibration (with 2-fold cross-fitted ECE for an honest figure), then the reject
    margin at the hub's ``accept`` threshold. ``oos_share`` > 0: the calibration is fitted with val's
    out-of-scope rows weighted to that share (:func:`share_weights`)."""
    blend, report = fit_blend(val, log_prior, k)
    sc = score_batch(val.probs, val.sims, val.labels, val.neg_sims, log_prior, blend, val.unk)
    correct = sc.top == val.gold
    weights = share_weights(val.gold < 0, oos_share)
    cal = fit_calibration(sc.features, correct, weights=weights)
    conf = calibrate(sc.features, cal)
    report["val_ece_fit"] = expected_calibration_error(conf, correct)
    cross = conf
    if len(correct) >= 20:
        half = np.arange(len(correct)) % 2 == 0
        cross = np.zeros(len(correct))
        for part in (half, ~half):
            part_w = None if weights is None else weights[part]
            cross[~part] = calibrate(
                sc.features[~part], fit_calibration(sc.features[part], correct[part], weights=part_w)
            )
        report["val_ece_crossfit"] = expected_calibration_error(cross, correct)
    neg_gap = sc.features[:, CALIBRATION_FEATURES.index("neg_gap")]
    # Cross-fitted confidences where there are enough rows: the margin is then fitted on rows the
    # calibration map did not see, as it will be used.
    margin = fit_neg_margin(neg_gap, val.gold, correct, cross, accept, weights)
    if val.neg_sims is None:
        margin = NEVER_REJECT
    report.update(neg_rule_effect(conf, correct, neg_gap > margin, accept))
    return blend, cal, margin, report


def neg_rule_effect(
    conf: np.ndarray, correct: np.ndarray, fired: np.ndarray, accept: float = 0.8
) -> dict[str, float]:
    """What the near-negative rule does at the hub's accept threshold: precision and coverage with and
    without it, over every val row (an accepted out-of-scope row counts as wrong)."""
    out: dict[str, float] = {"neg_rule_fired": float(fired.mean()) if len(fired) else 0.0}
    for name, accepted in (("without", conf >= accept), ("with", (conf >= accept) & ~fired)):
        n = int(accepted.sum())
        out[f"neg_rule_{name}_accepted_precision"] = float(correct[accepted].mean()) if n else 0.0
        out[f"neg_rule_{name}_coverage"] = float(accepted.mean()) if len(accepted) else 0.0
    return out
