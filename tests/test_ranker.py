"""Serving: loading and verification, decisions with evidence, pure scoring tables, no torch at run time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_train import train_tiny

from skill.artifacts import ModelError
from skill.canonicalize import Canonicalizer
from skill.catalog import load_catalog
from skill.decision import Outcome
from skill.ranker import Ranker
from skill.scoring import (
    CALIBRATION_FEATURES,
    Blend,
    Calibration,
    alternative_confidences,
    calibrate,
    knn_matrix,
    score_batch,
    score_one,
)
from tools._calib import (
    NEVER_REJECT,
    ValBatch,
    expected_calibration_error,
    fit_blend,
    fit_calibration,
    fit_neg_margin,
    share_weights,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Canonicalizer]:
    """A tiny model and the canonicalizer of its catalog."""
    tmp = tmp_path_factory.mktemp("ranker")
    model = train_tiny(tmp)
    return model, Canonicalizer(load_catalog(tmp / "catalog"))


@pytest.fixture(scope="module")
def ranker(tiny: tuple[Path, Canonicalizer]) -> Ranker:
    """The tiny model, loaded."""
    return Ranker.load(tiny[0])


def test_decision_carries_evidence(ranker: Ranker, tiny: tuple[Path, Canonicalizer]) -> None:
    canonical = tiny[1].canonicalize("please wake me up at 6:30", locale="en")
    d = ranker.decide(canonical)
    assert d.via == "neural" and d.slots == {}
    assert d.outcome in (Outcome.ACCEPT, Outcome.REJECT)
    assert 0.0 <= d.confidence <= 1.0
    assert len(d.alternatives) <= 4 and d.intent not in {a.intent for a in d.alternatives}
    assert sum(a.confidence for a in d.alternatives) <= 1.0 - d.confidence + 1e-6
    ev = d.evidence
    for key in (
        "softmax",
        "knn",
        "skill_prior",
        "matched_examples",
        "nearest_negative",
        "canonicalized_text",
    ):
        assert key in ev
    assert ev["canonicalized_text"] == canonical.masked
    assert isinstance(ev["matched_examples"], list)
    assert ev["nearest_negative"] is not None and {"text", "similarity"} <= set(ev["nearest_negative"])


@pytest.mark.parametrize(
    ("text", "intent"),
    [
        ("set an alarm for 6", "alarm.set"),
        ("какая погода в берлине", "weather.get"),
        ("play some jazz", "music.play"),
    ],
)
def test_tiny_model_ranks_training_like_text(
    ranker: Ranker, tiny: tuple[Path, Canonicalizer], text: str, intent: str
) -> None:
    d = ranker.decide(tiny[1].canonicalize(text))
    ranked = [d.intent] + [a.intent for a in d.alternatives]
    assert intent in ranked[:2]


def test_thresholds_and_info(ranker: Ranker) -> None:
    assert ranker.thresholds == {"accept": 0.8, "reject": 0.45, "margin": 0.1}
    info = ranker.info()
    assert info["index_backend"] == "faiss.IndexFlatIP"
    assert info["examples_total"] > 0 and info["negatives_total"] > 0 and info["intents"] == 4
    assert info["onnx_threads"] == 1 and info["model_bytes"] > 0


def test_decide_is_thread_safe(ranker: Ranker, tiny: tuple[Path, Canonicalizer]) -> None:
    texts = [
        "set an alarm for 7",
        "weather in berlin",
        "play jazz",
        "timer for 3 minutes",
        "who won the game",
    ] * 8
    canon = [tiny[1].canonicalize(t) for t in texts]
    serial = [(d.intent, d.confidence) for d in map(ranker.decide, canon)]
    with ThreadPoolExecutor(4) as pool:
        parallel = [(d.intent, d.confidence) for d in pool.map(ranker.decide, canon)]
    assert parallel == serial


def _copy(model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / model.name
    shutil.copytree(model, dst)
    return dst


@pytest.mark.parametrize("victim", ["model.onnx", "faiss.index", "ranker_config.json", "vocab.json"])
def test_corrupted_byte_is_refused(tiny: tuple[Path, Canonicalizer], tmp_path: Path, victim: str) -> None:
    model = _copy(tiny[0], tmp_path)
    data = bytearray((model / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (model / victim).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="damaged"):
        Ranker.load(model)


def test_unlisted_or_missing_files_are_refused(tiny: tuple[Path, Canonicalizer], tmp_path: Path) -> None:
    model = _copy(tiny[0], tmp_path)
    (model / "extra.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelError, match="not listed"):
        Ranker.load(model)
    (model / "extra.json").unlink()
    (model / "negative_faiss.index").unlink()
    with pytest.raises(ModelError, match="missing"):
        Ranker.load(model)
    with pytest.raises(ModelError, match="no manifest"):
        Ranker.load(tmp_path / "nowhere")


def test_serving_never_imports_torch(tiny: tuple[Path, Canonicalizer]) -> None:
    code = (
        "import sys; from pathlib import Path; from skill.ranker import Ranker; "
        "from skill.canonicalize import Canonical; "
        f"r = Ranker.load(Path({str(tiny[0])!r})); "
        "d = r.decide(Canonical(text='x', normalized='play jazz', masked='play jazz', locale='en')); "
        "bad = [m for m in ('torch', 'sklearn') if m in sys.modules]; "
        "assert not bad, bad; print(d.intent)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr


def test_knn_matrix_takes_best_per_intent() -> None:
    sims = np.array([[0.9, 0.8, 0.5]], dtype=np.float32)
    labels = np.array([[2, 0, 2]])
    assert knn_matrix(sims, labels, 4)[0].tolist() == pytest.approx([0.8, 0.5, 0.9, 0.5])


def test_alternatives_share_the_rest() -> None:
    scores = np.log(np.array([0.6, 0.3, 0.1]))
    alts = alternative_confidences(scores, 0, 0.8, 4)
    assert [i for i, _ in alts] == [1, 2]
    assert sum(c for _, c in alts) == pytest.approx(0.2)
    low = alternative_confidences(scores, 0, 0.05, 4)  # an unsure top: no alternative beats it
    assert all(c <= 0.05 for _, c in low) and low[0][1] == pytest.approx(0.025)


def test_blend_prefers_informative_knn() -> None:
    rng = np.random.default_rng(0)
    n, c = 400, 5
    gold = rng.integers(0, c, n)
    probs = rng.dirichlet(np.ones(c), n).astype(np.float32)  # softmax carries no signal here
    labels = np.stack([gold, (gold + 1) % c], axis=1)
    sims = np.tile(np.array([0.9, 0.4], dtype=np.float32), (n, 1))
    blend, report = fit_blend(ValBatch(probs, sims, labels, None, gold), np.zeros(c, dtype=np.float32), 2)
    assert blend.w_knn >= 4 and report["val_accuracy_blend"] > 0.9


def test_calibration_is_calibrated() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 6))
    p_true = 1 / (1 + np.exp(-(1.5 * x[:, 0] - x[:, 1] + 0.3)))
    y = rng.random(4000) < p_true
    cal = fit_calibration(x, y)
    conf = calibrate(x, cal)
    assert expected_calibration_error(conf, y) < 0.03
    assert isinstance(cal, Calibration)


def test_calibration_fitted_for_a_declared_out_of_scope_share() -> None:
    """Weighting val's out-of-scope rows to a share moves the map's base rate, not its ranking."""
    rng = np.random.default_rng(2)
    n_in, n_oos = 3000, 1500  # a third of val out of scope, as after a large negatives pass
    x_in = rng.normal(0.8, 1.0, size=(n_in, 3))
    x_oos = rng.normal(-0.8, 1.0, size=(n_oos, 3))
    x = np.vstack([x_in, x_oos])
    oos = np.r_[np.zeros(n_in, bool), np.ones(n_oos, bool)]
    correct = ~oos & (rng.random(n_in + n_oos) < 0.95)
    w = share_weights(oos, 0.1)
    assert w is not None
    assert np.isclose(w[oos].sum() / w.sum(), 0.1) and np.isclose(w.mean(), 1.0)
    assert share_weights(oos, 0.0) is None and share_weights(np.zeros(5, bool), 0.2) is None
    plain, weighted = (
        calibrate(x, fit_calibration(x, correct)),
        calibrate(x, fit_calibration(x, correct, weights=w)),
    )
    # Fitted for a tenth out of scope, in-scope rows are more likely correct than under val's third,
    # so more of them pass the hub's threshold ...
    assert weighted[~oos].mean() > plain[~oos].mean() + 0.02
    assert (weighted[~oos] >= 0.8).sum() > (plain[~oos] >= 0.8).sum()
    # ... and the weighted map is calibrated on the mix it was fitted for.
    assert abs(np.average(weighted, weights=w) - np.average(correct, weights=w)) < 0.01
    # The ranking of rows is the features' either way.
    assert np.corrcoef(np.argsort(np.argsort(plain)), np.argsort(np.argsort(weighted)))[0, 1] > 0.99


def test_neg_margin_is_fitted_where_the_rule_acts() -> None:
    # Out-of-scope rows whose nearest negative is close: half of them already below the accept
    # threshold, where the rule changes nothing, half above it, where only the rule stops them.
    gold = np.array([-1] * 8 + [0] * 8)
    correct = np.array([False] * 8 + [True] * 8)
    neg_gap = np.array([0.02] * 8 + [-0.2] * 7 + [0.03])  # one correct row with a near negative too
    conf = np.array([0.3] * 4 + [0.9] * 4 + [0.95] * 8)
    margin = fit_neg_margin(neg_gap, gold, correct, conf, accept=0.8)
    assert margin < 0.02  # fires on the four accepted out-of-scope rows ...
    assert margin > -0.2  # ... and not on the correct rows 0.2 below their example
    # The same rows, but the confidence already refuses every out-of-scope one: the rule could only
    # cost correct accepts, so it stays off.
    conf_ok = np.array([0.3] * 8 + [0.95] * 8)
    assert fit_neg_margin(neg_gap, gold, correct, conf_ok, accept=0.8) == NEVER_REJECT
    # One accepted out-of-scope row the rule would stop, but the same margin turns three right-intent
    # abstentions into rejections: not worth it, the rule stays off.
    gold2 = np.array([-1] + [0] * 3 + [0] * 4)
    correct2 = gold2 >= 0
    gap2 = np.array([0.05] * 4 + [-0.3] * 4)
    conf2 = np.array([0.9] + [0.6] * 3 + [0.95] * 4)
    assert fit_neg_margin(gap2, gold2, correct2, conf2, accept=0.8) == NEVER_REJECT
    # Without those abstentions near a negative, the same out-of-scope accept turns it on.
    gap3 = np.array([0.05] + [-0.3] * 7)
    assert fit_neg_margin(gap3, gold2, correct2, conf2, accept=0.8) < 0.05


def test_score_batch_features_are_finite() -> None:
    probs = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
    sc = score_batch(
        probs, np.array([[0.8]], dtype=np.float32), np.array([[0]]), None, np.zeros(3), Blend(w_knn=1.0, k=1)
    )
    assert int(sc.top[0]) == 0 and np.isfinite(sc.features).all()
    assert json.dumps(sc.features.tolist())


def test_score_one_matches_score_batch() -> None:
    rng = np.random.default_rng(3)
    for n_classes in (2, 3, 40):
        for _ in range(20):
            probs = rng.dirichlet(np.ones(n_classes), 1).astype(np.float32)
            sims = np.sort(rng.random((1, 6)).astype(np.float32))[:, ::-1].copy()
            labels = rng.integers(0, n_classes, (1, 6))
            prior = rng.normal(size=n_classes).astype(np.float32)
            blend = Blend(w_knn=4.0, w_prior=0.5, k=6)
            unk = float(rng.random())
            sc = score_batch(probs, sims, labels, np.array([0.2]), prior, blend, np.array([unk]))
            one = score_one(probs[0], sims[0], labels[0], 0.2, prior, blend, unk)
            scores, feats, top, second, knn_top = one.scores, one.features, one.top, one.second, one.knn_top
            assert one.order == np.argsort(-sc.scores[0], kind="stable")[: len(one.order)].tolist()
            # The alternatives from the precomputed order are those computed from the scores alone.
            assert alternative_confidences(scores, top, 0.7, 4, one.order) == pytest.approx(
                alternative_confidences(scores, top, 0.7, 4)
            )
            assert (top, second) == (int(sc.top[0]), int(sc.second[0]))
            assert feats == pytest.approx(sc.features[0], abs=1e-5)
            assert scores == pytest.approx(sc.scores[0], abs=1e-5) and knn_top == pytest.approx(
                sc.knn[0, top]
            )
            cal = Calibration(
                coef=(0.5, -1.0, 0.2, 0.3, 0.1, -0.4, -0.7), mean=(1.0,) * 7, scale=(2.0,) * 7, bias=0.1
            )
            assert calibrate(feats, cal.linear()) == pytest.approx(calibrate(sc.features, cal)[0])
            # A model calibrated before unk_share existed keeps its answers over the longer features.
            old = Calibration(
                features=CALIBRATION_FEATURES[:6],
                coef=(0.5, -1.0, 0.2, 0.3, 0.1, -0.4),
                mean=(1.0,) * 6,
                scale=(2.0,) * 6,
                bias=0.1,
            )
            assert calibrate(feats, old.linear(CALIBRATION_FEATURES)) == pytest.approx(
                calibrate(feats[:6], old.linear())
            )
            assert calibrate(sc.features, old)[0] == pytest.approx(calibrate(feats[:6], old.linear()))
