"""Pure scoring math of the ranker: blend softmax, kNN and priors; calibrate the top to a probability."""

from __future__ import annotations

import math

import msgspec
import numpy as np

# ``unk_share``: the share of the utterance's words the model's vocabulary never saw in training, so an
# utterance made of unseen words is not accepted on similarity alone (older models calibrate without it).
CALIBRATION_FEATURES = ("s_top", "s_gap", "log_p_top", "knn_top", "pos_sim", "neg_gap", "unk_share")
NO_NEGATIVE = -1.0  # neg_gap when the model has no negative examples


class Blend(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Ranking score per intent: ``w_softmax·log p + w_knn·knn + w_prior·log prior`` (fitted on val)."""

    w_softmax: float = 1.0
    w_knn: float = 0.0
    w_prior: float = 0.0
    k: int = 10


class Calibration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Logistic map from standardized top-candidate features to P(top is correct) (fitted on val)."""

    features: tuple[str, ...] = CALIBRATION_FEATURES
    mean: tuple[float, ...] = (0.0,) * len(CALIBRATION_FEATURES)
    scale: tuple[float, ...] = (1.0,) * len(CALIBRATION_FEATURES)
    coef: tuple[float, ...] = (0.0,) * len(CALIBRATION_FEATURES)
    bias: float = 0.0
    kind: str = "logistic"

    def linear(self, over: tuple[str, ...] | None = None) -> tuple[np.ndarray, float]:
        """The map folded into one weight vector and bias over raw features (what serving multiplies by).

        ``over`` lays the weights out over those feature names (0 for a feature this map does not use);
        a feature of the map that ``over`` lacks is a :class:`ValueError`.
        """
        scale = np.asarray(self.scale)
        w = np.asarray(self.coef) / scale
        bias = float(self.bias - (np.asarray(self.mean) * w).sum())
        if over is None or tuple(over) == tuple(self.features):
            return w, bias
        unknown = [n for n in self.features if n not in over]
        if unknown:
            raise ValueError(f"calibration uses unknown features {unknown}")
        full = np.zeros(len(over))
        full[[over.index(n) for n in self.features]] = w
        return full, bias


class Scored(msgspec.Struct, frozen=True):
    """Batch scoring result: blended scores, calibration features, top and runner-up indices."""

    scores: np.ndarray  # [B, C]
    features: np.ndarray  # [B, F] in CALIBRATION_FEATURES order
    top: np.ndarray  # [B]
    second: np.ndarray  # [B]
    knn: np.ndarray  # [B, C]


def knn_matrix(sims: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per intent, the best similarity among the k retrieved examples; absent intents get the k-th one."""
    b, k = sims.shape
    if k == 0:
        return np.zeros((b, n_classes), dtype=np.float32)
    out = np.repeat(sims.min(axis=1, keepdims=True), n_classes, axis=1).astype(np.float32)
    rows = np.repeat(np.arange(b), k)
    valid = labels.reshape(-1) >= 0
    np.maximum.at(out, (rows[valid], labels.reshape(-1)[valid]), sims.reshape(-1)[valid])
    return out


def score_batch(  # noqa: PLR0917 - a pure function over parallel arrays
    probs: np.ndarray,
    sims: np.ndarray,
    labels: np.ndarray,
    neg_sims: np.ndarray | None,
    log_prior: np.ndarray,
    blend: Blend,
    unk: np.ndarray | None = None,
) -> Scored:
    """Blend the components for a batch of queries and compute the calibration features.

    ``unk`` is each query's share of out-of-vocabulary words (0 when not given).
    """
    n_classes = probs.shape[1]
    log_p = np.log(np.clip(probs, 1e-9, 1.0))
    knn = knn_matrix(sims, labels, n_classes)
    scores = blend.w_softmax * log_p + blend.w_knn * knn + blend.w_prior * log_prior[None, :]
    order = np.argsort(-scores, axis=1, kind="stable")
    top, second = order[:, 0], order[:, 1] if n_classes > 1 else order[:, 0]
    rows = np.arange(len(top))
    s_top = scores[rows, top]
    s_gap = s_top - scores[rows, second] if n_classes > 1 else np.full_like(s_top, 10.0)
    pos_sim = sims[:, 0] if sims.shape[1] else np.zeros(len(top), dtype=np.float32)
    neg_gap = neg_sims - pos_sim if neg_sims is not None else np.full(len(top), NO_NEGATIVE)
    unk_share = np.zeros(len(top)) if unk is None else np.asarray(unk, dtype=np.float64)
    feats = np.stack([s_top, s_gap, log_p[rows, top], knn[rows, top], pos_sim, neg_gap, unk_share], axis=1)
    return Scored(scores=scores, features=feats.astype(np.float64), top=top, second=second, knn=knn)


def calibrate(features: np.ndarray, cal: Calibration | tuple[np.ndarray, float]) -> np.ndarray:
    """P(top is correct) per row of ``features`` (``cal`` may be pre-folded by :meth:`Calibration.linear`).

    Features in :data:`CALIBRATION_FEATURES` order work with any map over a subset of them.
    """
    if isinstance(cal, Calibration):
        full = features.shape[-1] == len(CALIBRATION_FEATURES)
        w, b = cal.linear(CALIBRATION_FEATURES if full else None)
    else:
        w, b = cal
    logit = features @ w + b
    return 1.0 / (1.0 + np.exp(-np.clip(logit, -40.0, 40.0)))


class One(msgspec.Struct, frozen=True):
    """:func:`score_one`'s result for one query."""

    scores: np.ndarray  # [C] blended scores
    features: np.ndarray  # [F] in CALIBRATION_FEATURES order
    top: int
    second: int
    knn_top: float
    order: list[int]  # the best ``head`` intents by score, best first (ties: the lower index first)


def score_one(  # noqa: PLR0917 - a pure function over parallel arrays
    probs: np.ndarray,
    sims: np.ndarray,
    labels: np.ndarray,
    neg_sim: float | None,
    log_prior: np.ndarray,
    blend: Blend,
    unk: float = 0.0,
    head: int = 6,
) -> One:
    """:func:`score_batch` for one query, cheaper, plus the order of the best ``head`` intents.

    The serving path: a few numpy calls over the classes, the rest on Python floats (the kNN part
    is ``k`` neighbours, the ranking one stable sort), so nothing is computed twice for the
    alternatives.
    """
    k = len(sims)
    sims_l = sims.tolist()
    floor = sims_l[-1] if k else 0.0
    best: dict[int, float] = {}
    for sim, label in zip(sims_l, labels.tolist(), strict=True):
        if label >= 0 and sim > best.get(label, floor):
            best[label] = sim
    log_p = np.log(np.maximum(probs, 1e-9))
    knn = np.full(len(probs), floor, dtype=np.float32)
    if best:
        knn[list(best)] = list(best.values())
    scores = blend.w_softmax * log_p + blend.w_knn * knn
    if blend.w_prior:
        scores += blend.w_prior * log_prior
    order = np.argsort(-scores, kind="stable")[: max(2, head)].tolist()
    top = order[0]
    second = order[1] if len(order) > 1 else order[0]
    pos_sim = sims_l[0] if k else 0.0
    neg_gap = neg_sim - pos_sim if neg_sim is not None else NO_NEGATIVE
    s_top = float(scores[top])
    knn_top = float(knn[top])
    feats = np.array(
        [s_top, s_top - float(scores[second]), float(log_p[top]), knn_top, pos_sim, neg_gap, unk]
    )
    return One(scores, feats, top, second, knn_top, order)


def alternative_confidences(
    scores: np.ndarray, top: int, conf: float, n: int, order: list[int] | None = None
) -> list[tuple[int, float]]:
    """The next ``n`` intents: ``conf`` times their softmax ratio to the top, capped by a share of 1-conf.

    ``order``: the intents already ranked by score, best first (:attr:`One.order`), at least ``n + 1``
    of them or all.
    """
    if order is None or (len(order) < n + 1 and len(order) < len(scores)):
        head = np.argpartition(-scores, n)[: n + 1] if len(scores) > n + 1 else np.arange(len(scores))
        order = head[np.argsort(-scores[head], kind="stable")].tolist()
    alts = [i for i in order if i != top][:n]
    s_top = float(scores[top])
    shift = max(s_top, float(scores[order[0]]))  # the best score (top is it when served)
    q_top = math.exp(s_top - shift)
    rest = float(np.exp(scores - shift).sum()) - q_top
    if rest <= 0.0 or q_top <= 0.0:
        return [(i, 0.0) for i in alts]
    out = []
    for i in alts:
        q = math.exp(float(scores[i]) - shift)
        out.append((i, float(min(conf * q / q_top, (1.0 - conf) * q / rest))))
    return out


def log_priors(priors: list[float]) -> np.ndarray:
    """Log of priors scaled so the largest is 1 (log 0); non-positive priors count as tiny."""
    top = max(priors) if priors and max(priors) > 0 else 1.0
    return np.asarray([math.log(max(p / top, 1e-6)) for p in priors], dtype=np.float32)
