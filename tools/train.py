"""Train the ranker: canonicalize, fit the encoder, export int8 ONNX, index, fit blend and calibration."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import msgspec
import numpy as np

from skill.artifacts import write_manifest
from skill.canonicalize import Canonicalizer
from skill.catalog import Catalog, load_catalog
from skill.features import VOCAB_NAME, FeatureSpec, Featurizer, build_vocab, model_text
from skill.ranker import ExampleRow, IntentInfo, RankerConfig
from skill.registry import write_pointer
from skill.scoring import calibrate, log_priors, score_batch
from skill.tagging import VALUE_SLOTS, bio_labels, decode, span_token_range, tag_names, token_map

from ._adaos_artifacts import write_adaos_artifacts
from ._calib import ValBatch, expected_calibration_error, fit_all
from ._data import (
    OOS,
    DataError,
    Prepared,
    Row,
    carve_val,
    data_digest,
    prepare,
    rows_from_catalog,
    rows_from_jsonl,
)
from ._loop import TrainConfig, fit_net
from ._teacher import TEACHER_CHOICES, Teacher, embed_cached, linear_cka, load_teacher, teacher_word_vectors
from ._teacher import targets as teacher_targets
from ._transfer import (
    TransferSet,
    agreeing,
    carry_spans,
    mix_source_labels,
    teacher_classifier_probs,
    teacher_neighbours,
    variants,
)
from .export import export_int8, run_batched, session

__all__ = ["DataError", "Row", "TrainConfig", "main", "rows_from_catalog", "rows_from_jsonl", "train_model"]

_LOGGER = logging.getLogger(__name__)

HNSW_MIN = 2048  # vectors; below it exact search is as fast
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 16, 80, 48
THRESHOLDS = {"accept": 0.80, "reject": 0.45, "margin": 0.10}
CONTENT_FILES = (
    "model.onnx",
    VOCAB_NAME,
    "faiss.index",
    "negative_faiss.index",
    "ranker_config.json",
    "intents_manifest.json",
    "examples_manifest.jsonl",
    "masking_rules.json",
)
CODE_FILES = (
    "tools/train.py",
    "tools/_data.py",
    "tools/_loop.py",
    "tools/_model.py",
    "tools/_augment.py",
    "tools/_calib.py",
    "tools/export.py",
    "skill/features.py",
    "skill/scoring.py",
    "skill/ranker.py",
)


def code_version() -> str:
    """sha256 (12 hex) of the training and scoring code."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in CODE_FILES:
        path = root / rel
        if path.is_file():
            h.update(rel.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (ties averaged); None without both classes."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _coverage(conf: np.ndarray, correct: np.ndarray, precision: float = 0.99) -> float:
    """Largest share of rows accepted (by descending confidence) with precision >= ``precision``."""
    order = np.argsort(-conf, kind="mergesort")
    prec = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(prec >= precision)[0]
    return float((ok.max() + 1) / len(order)) if len(ok) else 0.0


def _write_json(path: Path, obj: object) -> None:
    path.write_bytes(
        json.dumps(msgspec.to_builtins(obj), ensure_ascii=False, indent=1, sort_keys=True).encode()
    )


def _index(vectors: np.ndarray, dim: int) -> faiss.Index:
    """Exact inner product for small sets; from HNSW_MIN vectors on, an HNSW graph over fp16 vectors.

    Measured on the embedded model's 7.3k examples (one thread): exact search p50 0.064-0.082 ms,
    HNSW (M 16, efSearch 48) 0.020 ms with recall@10 0.997 against it, top-1 99.9 %, in 1.97 MB
    instead of 1.86 MB (fp32 vectors would make it 2.9 MB). Built on one thread, the graph is the
    same for the same vectors.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < HNSW_MIN:
        index: faiss.Index = faiss.IndexFlatIP(dim)
        if len(vectors):
            index.add(vectors)
        return index
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        hnsw = faiss.IndexHNSWSQ(
            dim,
            faiss.ScalarQuantizer.QT_fp16,  # type: ignore[arg-type]  # faiss's stubs take the enum for a class
            HNSW_M,
            faiss.METRIC_INNER_PRODUCT,
        )
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        hnsw.train(vectors)
        hnsw.add(vectors)
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH  # stored in the index file
    finally:
        faiss.omp_set_num_threads(threads)
    return hnsw


def _canonical(rows: list[Row], canon: Canonicalizer) -> list[tuple[Row, str]]:
    return [(row, model_text(canon.canonicalize(row.text, locale=row.locale or None))) for row in rows]


def _tag_slots(rows: list[Row], catalog: Catalog) -> list[str]:
    """Slots the tagger learns: every marked slot except the parsed values (time, level, ...)."""
    value_sources = set(VALUE_SLOTS) | {"city"}
    names: set[str] = set()
    for row in rows:
        if row.intent not in catalog.intents:  # bench data: its slots are all the tagger's to learn
            names.update(slot for _, _, slot in row.spans or ())
            continue
        spec_slots = catalog.intents[row.intent].slots
        for _, _, slot in row.spans or ():
            spec = spec_slots.get(slot)
            if slot in VALUE_SLOTS or (
                spec is not None and (spec.source or slot) in value_sources - {"city"}
            ):
                continue
            names.add(slot)
    return sorted(names)


def _intent_tag_slots(
    rows: list[Row], catalog: Catalog, tags: list[str], intents: list[str]
) -> dict[str, list[str]]:
    """Per intent, the slots the tagger may fill: a catalog intent's declared ones, else those marked."""
    seen: dict[str, set[str]] = {}
    for row in rows:
        seen.setdefault(row.intent, set()).update(slot for _, _, slot in row.spans or ())
    out = {}
    for name in intents:
        slots = set(catalog.intents[name].slots) if name in catalog.intents else seen.get(name, set())
        out[name] = sorted(s for s in slots if f"B-{s}" in tags)
    return out


def _tagger_report(  # noqa: PLR0917 - one call site, the training run's own objects
    sess: object, feat: Featurizer, rows: list[Row], canon: Canonicalizer, tags: list[str], catalog: Catalog
) -> dict[str, object]:
    """Exact-span precision / recall / F1 of the int8 tagger on the val rows that carry spans.

    Decoded as served: only the slots the row's intent declares; spans canonicalization masked are
    not the tagger's and are left out of the gold.
    """
    pattern = re.compile(feat.spec.token_pattern)
    wanted = {t[2:] for t in tags if t != "O"}
    cases = []
    for row in rows:
        if row.spans is None:
            continue
        c = canon.canonicalize(row.text, locale=row.locale or None)
        tmap = token_map(c, pattern, feat.spec.max_words)
        if tmap is None:
            continue
        out = sess.run(None, feat.encode([model_text(c)]).feeds())  # type: ignore[attr-defined]
        # Gold spans that canonicalization masked are its to fill, not the tagger's.
        masked = {
            j for (a, b), ph in zip(tmap.ranges, tmap.placeholder, strict=True) if ph for j in range(a, b)
        }
        gold = set()
        for start, end, slot in row.spans:
            rng = span_token_range(c.text, start, end)
            if slot in wanted and rng is not None and not masked.intersection(range(*rng)):
                gold.add((slot, start, end))
        allowed = set(catalog.intents[row.intent].slots) & wanted if row.intent in catalog.intents else wanted
        cases.append((out[2][0], tmap, c, allowed, gold))

    def score(threshold: float) -> tuple[float, float, float, int]:
        tp = n_pred = n_gold = 0
        for probs, tmap, c, allowed, gold in cases:
            pred = {(sp.slot, sp.start, sp.end) for sp in decode(probs, tags, tmap, c, allowed, threshold)}
            n_gold += len(gold)
            n_pred += len(pred)
            tp += len(pred & gold)
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_gold if n_gold else 0.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0), n_gold

    # The decode threshold is fitted here, on val (ties go to the one nearest 1/2).
    grid = [round(0.3 + 0.05 * i, 2) for i in range(9)]
    fitted = max(grid, key=lambda t: (round(score(t)[2], 4), -abs(t - 0.5)))
    p, r, f, n_gold = score(fitted)
    half = score(0.5)
    return {
        "tags": len(tags),
        "val_spans": n_gold,
        "threshold": fitted,
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(f, 4),
        "f1_at_half": round(half[2], 4),
    }


def _teacher_alignment(  # noqa: PLR0917 - one call site, the training run's own objects
    teacher: Teacher | None,
    info: dict[str, object] | None,
    val: list[tuple[Row, str]],
    val_emb: np.ndarray,
    cache: Path | None,
    cfg: TrainConfig,
) -> dict[str, object] | None:
    """How close the exported student's val embeddings are to the teacher's (linear CKA)."""
    if teacher is None or info is None or not val:
        return None
    t_val, _ = embed_cached(teacher, [row.text for row, _ in val], cache)
    return {**info, "distill_weight": cfg.distill_weight, "val_cka": round(linear_cka(val_emb, t_val), 4)}


def _tag_labels(
    rows: list[Row], canon: Canonicalizer, tags: list[str], catalog: Catalog
) -> dict[str, list[int]]:
    """masked text → BIO label ids per model token, for rows that carry span labels."""
    pattern = re.compile(FeatureSpec().token_pattern)
    out: dict[str, list[int]] = {}
    for row in rows:
        if row.spans is None:
            continue
        c = canon.canonicalize(row.text, locale=row.locale or None)
        text = model_text(c)
        if text in out:
            continue
        tmap = token_map(c, pattern, FeatureSpec().max_words)
        if tmap is not None:
            out[text] = bio_labels(c, row.spans, tags, tmap, raw=row.intent not in catalog.intents)
    return out


def _intent_infos(prep: Prepared, catalog: Catalog) -> list[IntentInfo]:
    counts = Counter(prep.train_labels)
    locales: dict[int, set[str]] = {}
    for label, locale in zip(prep.train_labels, prep.train_locales, strict=True):
        locales.setdefault(label, set()).add(locale)
    out = []
    for i, name in enumerate(prep.intents):
        spec = catalog.intents.get(name)
        out.append(
            IntentInfo(
                intent=name,
                prior=spec.prior if spec else 1.0,
                owner=catalog.owners[name].id if spec else "",
                risky=spec.risky if spec else False,
                examples=counts[i],
                locales=sorted(x for x in locales.get(i, set()) if x),
            )
        )
    return out


def _transfer_set(  # noqa: PLR0917 - one call site, the training run's own objects
    teacher: Teacher,
    prep: Prepared,
    sources: list[Row],
    t_emb: np.ndarray,
    t_targets: np.ndarray,
    canon: Canonicalizer,
    cfg: TrainConfig,
    cache: Path | None,
    neighbours: dict[str, list[str]] | None = None,
    tagging: tuple[list[str], Catalog] | None = None,
) -> tuple[TransferSet, dict[str, object]]:
    """Variants of the raw training texts (``sources``, one row per training text; tools/_transfer.py),
    embedded by the teacher (cached), in the model's text, with the teacher classifier's class
    distribution and, with ``tagging`` (tag names, catalog), the source's spans carried over as BIO
    labels; variants whose model text is empty or a training text are left out (a training text has
    its label), and with ``cfg.transfer_agree`` those the teacher gives another intent than their
    source's."""
    t0 = time.monotonic()
    drawn = variants([r.text for r in sources], cfg.transfer_per_row, neighbours=neighbours)
    emb, stats = embed_cached(teacher, [v.text for v in drawn], cache)
    centred = emb - t_emb.mean(axis=0, keepdims=True)  # the training rows' centre, as their targets
    centred /= np.linalg.norm(centred, axis=1, keepdims=True).clip(min=1e-9)
    known = set(prep.train_texts)
    keep, texts, tags = [], [], []
    for j, v in enumerate(drawn):
        src = sources[v.source]
        masked = model_text(canon.canonicalize(v.text, locale=src.locale or None))
        if not masked.strip() or masked in known:
            continue
        keep.append(j)
        texts.append(masked)
        labels: list[int] | None = None
        if tagging is not None and src.spans is not None:
            row = Row(v.text, src.intent, src.locale, spans=carry_spans(src.text, src.spans, v))
            labels = _tag_labels([row], canon, *tagging).get(masked)
        tags.append(labels)
    probs = teacher_classifier_probs(
        t_targets,
        prep.train_labels,
        len(prep.intents),
        centred[keep],
        cfg.soft_label_c,
        keep_oos=cfg.oos_class,
    )
    own = [prep.train_labels[drawn[j].source] for j in keep]
    disagreeing = 0
    if cfg.transfer_agree:
        mask = agreeing(probs, own, len(prep.intents))
        disagreeing = int((~mask).sum())
        chosen = np.nonzero(mask)[0]
        keep, texts, tags = [keep[i] for i in chosen], [texts[i] for i in chosen], [tags[i] for i in chosen]
        probs, own = probs[chosen], [own[i] for i in chosen]
    probs = mix_source_labels(probs, own, cfg.transfer_label_mix, oos_column=cfg.oos_class)
    info: dict[str, object] = {
        "variants": len(drawn),
        "kept": len(keep),
        "dropped_disagreeing": disagreeing,
        "tagged": sum(t is not None for t in tags),
        **stats,
        "mean_top_prob": round(float(probs.max(axis=1).mean()), 4) if keep else None,
        "sample": [drawn[j].text for j in keep[:: max(1, len(keep) // 6)][:6]],
        "seconds": round(time.monotonic() - t0, 1),
    }
    return TransferSet(texts=texts, teacher=centred[keep], probs=probs, tags=tags), info


def train_model(
    train_rows: list[Row],
    val_rows: list[Row],
    out_root: Path,
    *,
    catalog: Catalog,
    seed: int = 13,
    name: str = "node-default",
    progress: bool = True,
    use_oos_train: bool = False,
    config: TrainConfig | None = None,
    teacher: str | None = None,
    teacher_cache: Path | None = None,
) -> Path:
    """Train, export, index, fit and write a model folder ``out_root/<model_id>``; return its path."""
    started = time.monotonic()
    cfg = config or TrainConfig()
    canon = Canonicalizer(catalog)
    train = _canonical([r for r in train_rows if r.split != "test"], canon)
    val = _canonical([r for r in val_rows if r.split != "test"], canon)
    prep = prepare(train, val, catalog, use_oos_train)
    _LOGGER.info(
        "training on %d rows, %d intents, %d val rows", len(prep.train_texts), len(prep.intents), len(val)
    )
    tags = tag_names(_tag_slots([r for r, _ in train], catalog))
    labelled = _tag_labels([r for r, _ in train], canon, tags, catalog) if len(tags) > 1 else {}
    teacher_model = load_teacher(teacher) if teacher else None
    t_targets: np.ndarray | None = None
    teacher_info: dict[str, object] | None = None
    transfer: TransferSet | None = None
    t_emb: np.ndarray | None = None
    row_of: dict[str, Row] = {}
    for row, masked in train:
        row_of.setdefault(masked, row)
    if teacher_model is not None:
        t0 = time.monotonic()
        t_emb, stats = embed_cached(teacher_model, [row_of[m].text for m in prep.train_texts], teacher_cache)
        t_targets = teacher_targets(t_emb)
        teacher_info = {"name": teacher_model.name, "dim": teacher_model.dim, **stats}
        teacher_info["seconds"] = round(time.monotonic() - t0, 1)
        _LOGGER.info("teacher %s: %s", teacher_model.name, teacher_info)
    vocab = build_vocab(prep.train_texts)
    word_targets: np.ndarray | None = None
    if teacher_model is not None and cfg.word_vectors > 0:
        vocab, word_targets, wv_info = teacher_word_vectors(
            teacher_model, vocab, cfg.word_vectors, teacher_cache
        )
        if teacher_info is not None:
            teacher_info["word_vectors"] = wv_info
        _LOGGER.info("teacher word vectors: %s", wv_info)
    if (
        teacher_model is not None
        and teacher_info is not None
        and t_emb is not None
        and t_targets is not None
        and cfg.transfer_per_row > 0
    ):
        neighbours = None
        if cfg.transfer_swap == "teacher" and word_targets is not None:
            neighbours = teacher_neighbours(
                [*vocab.words, *vocab.extra_words],
                word_targets[2:],
                len(vocab.words),
                cfg.transfer_neighbours,
            )
        transfer, teacher_info["transfer"] = _transfer_set(
            teacher_model,
            prep,
            [row_of[m] for m in prep.train_texts],
            t_emb,
            t_targets,
            canon,
            cfg,
            teacher_cache,
            neighbours,
            (tags, catalog) if labelled else None,
        )
        _LOGGER.info("teacher transfer set: %s", teacher_info["transfer"])
    feat = Featurizer(vocab)
    net = fit_net(
        feat,
        prep.train_texts,
        prep.train_labels,
        len(prep.intents),
        seed=seed,
        cfg=cfg,
        progress=progress,
        tags=[labelled.get(t) for t in prep.train_texts],
        n_tags=len(tags) if labelled else 0,
        teacher=t_targets,
        word_targets=word_targets,
        transfer=transfer,
    )
    train_seconds = time.monotonic() - started

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".train-", dir=out_root))
    work.chmod(0o755)
    try:
        val_in = [t for t, y in zip(prep.val_texts, prep.val_labels, strict=True) if y >= 0]
        export_report = export_int8(
            net, feat, work / "model.onnx", val_in or prep.train_texts, threads=cfg.threads
        )
        sess = session(work / "model.onnx", cfg.threads)
        dim = net.cfg.proj_dim
        pos_idx = [i for i, y in enumerate(prep.train_labels) if y >= 0]
        neg_idx = [i for i, y in enumerate(prep.train_labels) if y < 0]
        _, emb = run_batched(sess, feat, prep.train_texts)
        index = _index(emb[pos_idx], dim)
        negatives = _index(emb[neg_idx], dim) if neg_idx else None
        faiss.write_index(index, str(work / "faiss.index"))
        if negatives is not None:
            faiss.write_index(negatives, str(work / "negative_faiss.index"))

        labels = np.asarray([prep.train_labels[i] for i in pos_idx], dtype=np.int64)
        val_probs, val_emb = run_batched(sess, feat, prep.val_texts)
        k = min(10, index.ntotal)
        sims, rows = index.search(val_emb, k)
        neg_sims = negatives.search(val_emb, 1)[0][:, 0] if negatives is not None else None
        gold = np.asarray(prep.val_labels, dtype=np.int64)
        unk = np.asarray([feat.unseen_share(feat.encode_one(t)[1]) for t in prep.val_texts])
        batch = ValBatch(
            probs=val_probs, sims=sims, labels=labels[rows], neg_sims=neg_sims, gold=gold, unk=unk
        )
        infos = _intent_infos(prep, catalog)
        log_prior = log_priors([i.prior for i in infos])
        blend, cal, neg_margin, fit_report = fit_all(
            batch, log_prior, k, THRESHOLDS["accept"], cfg.calib_oos_share
        )

        sc = score_batch(val_probs, sims, labels[rows], neg_sims, log_prior, blend, unk)
        conf = calibrate(sc.features, cal)
        correct = sc.top == gold
        inside = gold >= 0
        tagger = (
            _tagger_report(sess, feat, val_rows, canon, tags, catalog) if net.head_tag is not None else None
        )
        metrics: dict[str, object] = {
            "val_accuracy": float(correct[inside].mean()) if inside.any() else None,
            "val_accuracy_softmax": float((val_probs.argmax(1) == gold)[inside].mean())
            if inside.any()
            else None,
            "val_auroc_oos": _auroc(conf, inside),
            "val_coverage_at_99": _coverage(conf, correct),
            "val_ece": expected_calibration_error(conf, correct),
            "val_rows": int(len(gold)),
            "val_oos_rows": int((~inside).sum()),
            "train_seconds": round(train_seconds, 1),
            **{key: round(v, 6) for key, v in fit_report.items()},
            "tagger": tagger,
            "teacher": _teacher_alignment(teacher_model, teacher_info, val, val_emb, teacher_cache, cfg),
            **export_report,
            "data": msgspec.to_builtins(prep.report),
        }

        pos_rows = [
            ExampleRow(prep.train_texts[i], prep.intents[prep.train_labels[i]], prep.train_locales[i])
            for i in pos_idx
        ]
        neg_rows = [
            ExampleRow(prep.train_texts[i], OOS, prep.train_locales[i], negative=True) for i in neg_idx
        ]
        (work / "examples_manifest.jsonl").write_bytes(
            b"".join(msgspec.json.encode(r) + b"\n" for r in pos_rows + neg_rows)
        )
        (work / VOCAB_NAME).write_bytes(msgspec.json.encode(vocab))
        _write_json(work / "intents_manifest.json", infos)
        _write_json(work / "masking_rules.json", canon.rules())
        train_info = {
            **msgspec.to_builtins(cfg),
            "seed": seed,
            "use_oos_train": use_oos_train,
            "teacher": teacher,
        }
        ranker_cfg = RankerConfig(
            intents=prep.intents,
            blend=blend,
            calibration=cal,
            neg_margin=neg_margin,
            thresholds=dict(THRESHOLDS),
            net=msgspec.to_builtins(net.cfg),
            train=train_info,
            tags=tags if net.head_tag is not None else [],
            tag_slots=_intent_tag_slots([r for r, _ in train], catalog, tags, prep.intents)
            if net.head_tag is not None
            else {},
            tag_threshold=float(str(tagger["threshold"])) if tagger else 0.5,
            tag_raw_intents=[n for n in prep.intents if n not in catalog.intents]
            if net.head_tag is not None
            else [],
        )
        _write_json(work / "ranker_config.json", ranker_cfg)

        content = hashlib.sha256()
        for fname in CONTENT_FILES:
            if (work / fname).is_file():
                content.update(fname.encode() + b"\0" + (work / fname).read_bytes())
        model_id = f"{name}-{dt.datetime.now(dt.UTC):%Y%m%d}-{content.hexdigest()[:8]}"
        metrics["model_bytes"] = (work / "model.onnx").stat().st_size
        metrics["total_seconds"] = round(time.monotonic() - started, 1)
        _write_json(work / "metrics.json", metrics)
        write_adaos_artifacts(work, net=net, catalog=catalog, model_id=model_id, gold=gold, pred=sc.top)
        all_rows = list(train_rows) + list(val_rows)
        write_manifest(
            work,
            model_id=model_id,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            data_digest=data_digest(all_rows),
            seed=seed,
            code_version=code_version(),
            metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
            thresholds=dict(THRESHOLDS),
        )
        final = out_root / model_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _LOGGER.info(
        "model %s written (val accuracy %s, %.1f s)",
        model_id,
        metrics["val_accuracy"],
        metrics["total_seconds"],
    )
    return final


def config_from_overrides(overrides: list[str], word_vectors: int | None = None) -> TrainConfig:
    """The default training config with ``KEY=VALUE`` overrides (types from the field; bad ones raise)."""
    fields: dict[str, object] = msgspec.structs.asdict(TrainConfig())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        if isinstance(fields[key], str):  # a text field takes the text as written (no JSON quotes);
            # msgspec.convert below checks it against the field's choices
            fields[key] = value
            continue
        try:
            fields[key] = msgspec.json.decode(value)
        except msgspec.DecodeError:
            raise ValueError(f"--set {item!r}: the value must be a number, true/false or a string") from None
    if word_vectors is not None:
        fields["word_vectors"] = word_vectors
    try:
        return msgspec.convert(fields, TrainConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(f"--set: {exc}") from exc


def activate(out_root: Path, model_id: str, why: str = "tools.train --activate") -> None:
    """Point ``out_root/active.json`` at ``model_id`` atomically (the service's own registry code)."""
    write_pointer(out_root, model_id, who="tools.train", why=why)


def parse_seeds(text: str) -> list[int]:
    """``13``, ``13,14,15`` or ``13-16`` (inclusive) into a list of distinct seeds, in order."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            rng = range(int(lo), int(hi) + 1) if sep else range(int(lo), int(lo) + 1)
            if not rng:
                raise ValueError(part)
            seeds += [x for x in rng if x not in seeds]
    except ValueError as exc:
        raise ValueError(f"--seed: expected N, N,M,... or N-M, got {text!r}") from exc
    if len(seeds) > 16:
        raise ValueError(f"--seed: at most 16 seeds, got {len(seeds)}")
    return seeds


class SeedResult(msgspec.Struct, frozen=True):
    """One training of a multi-seed run, as the choice saw it."""

    seed: int
    model_id: str
    val_accuracy: float
    golden_failures: int | None  # None: no golden cases to run (bench data)


def choose_seed(results: list[SeedResult]) -> SeedResult:
    """The rule for several seeds: those that pass every golden case (the promotion gate) first, then
    the best val accuracy; the earlier seed on a tie. Never the probe or any test data."""
    return min(results, key=lambda r: (bool(r.golden_failures), -r.val_accuracy, results.index(r)))


def _evaluate(model_dir: Path, catalog: Catalog) -> Any:
    from tools.eval import evaluate_model  # noqa: PLC0415 - the serving pipeline, loaded when used

    return evaluate_model(model_dir, catalog)


def _gate_activation(out_root: Path, model_dir: Path, catalog: Catalog, report: Any | None) -> list[str]:
    """Why ``tools.models promote`` would refuse this model against the active one (empty: it would not);
    ``report``: the model's evaluation when a multi-seed run already made it."""
    from tools.models import gate_against_active  # noqa: PLC0415

    return gate_against_active(out_root, model_dir, catalog, report)[2]


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m tools.train [--catalog DIR] [--data FILE] [--out DIR] [--seed N] [--activate]``."""
    parser = argparse.ArgumentParser(prog="python -m tools.train", description=__doc__)
    parser.add_argument(
        "--catalog", default="catalog", help="catalog directory (canonicalization; default data)"
    )
    parser.add_argument("--data", help="JSONL rows (bench format or AdaOS hub export) instead of the catalog")
    parser.add_argument("--out", default="models", help="models root; the model goes to OUT/<model_id>/")
    parser.add_argument(
        "--seed",
        default="13",
        help="a seed, or several (13,14,15 or 13-16): each is trained, and the one kept is the best on val "
        "among those that pass every golden case",
    )
    parser.add_argument("--name", default="node-default")
    parser.add_argument(
        "--activate",
        action="store_true",
        help="point OUT/active.json at the new model, through the same gate as tools.models promote",
    )
    parser.add_argument(
        "--force", action="store_true", help="with --activate: activate even if the gate refuses"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="with several seeds: train this many at once (one process each)"
    )
    parser.add_argument(
        "--use-oos-train",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train on oos rows (outlier exposure, negatives index); default: on for catalog, off for --data",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--teacher",
        choices=TEACHER_CHOICES,
        help="distil a pretrained teacher's sentence embeddings (training only; cached by content hash)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training-config field for an experiment (e.g. --set tag_weight=1.0)",
    )
    parser.add_argument(
        "--word-vectors",
        type=int,
        default=None,
        metavar="N",
        help="with --teacher: the N most frequent words per language (wordfreq) get teacher word vectors "
        "in the word table (0: off; default: the training config's)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        catalog = load_catalog(args.catalog)
        if args.data:
            rows = rows_from_jsonl(args.data)
            train = [r for r in rows if r.split == "train"]
            val = [r for r in rows if r.split == "val"]
            if not val:
                _LOGGER.info("%s has no val rows: carving every 5th row per intent and locale", args.data)
                train, val = carve_val(train)
        else:
            train, val = rows_from_catalog(catalog)
        use_oos = args.use_oos_train if args.use_oos_train is not None else not args.data
        seeds = parse_seeds(args.seed)
        config = config_from_overrides(args.set, args.word_vectors)
        out = Path(args.out)

        def one(seed: int, root: Path) -> Path:
            return train_model(
                train,
                val,
                root,
                catalog=catalog,
                seed=seed,
                name=args.name,
                progress=not args.quiet,
                use_oos_train=use_oos,
                teacher=args.teacher,
                config=config,
            )

        report = None  # the kept model's evaluation, when choosing among seeds made one
        if len(seeds) == 1:
            path = one(seeds[0], out)
        else:
            jobs = max(1, min(args.jobs, len(seeds)))
            child = _child_argv(list(sys.argv[1:] if argv is None else argv))

            def many(todo: list[int], root: Path) -> list[Path]:
                if jobs == 1:
                    return [one(seed, root) for seed in todo]
                return _train_in_processes(todo, child, root, jobs)

            path, report = _train_seeds(seeds, many, out, None if args.data else catalog)
    except (DataError, ValueError) as exc:
        _LOGGER.error("%s", exc)
        return 2
    if args.activate:
        reasons = [] if args.data else _gate_activation(out, path, catalog, report)
        if reasons and not args.force:
            _LOGGER.error("not activated (the model stays in %s):\n  %s", path, "\n  ".join(reasons))
            print(path)
            return 3
        activate(
            out,
            path.name,
            "tools.train --activate" + (f" FORCED over: {'; '.join(reasons)}" if reasons else ""),
        )
        _LOGGER.info("activated %s", path.name)
    print(path)
    return 0


_OWN_FLAGS = {"--seed": True, "--out": True, "--jobs": True, "--activate": False, "--force": False}


def _child_argv(argv: list[str]) -> list[str]:
    """This run's arguments without those a one-seed child gets its own of (seed, out, jobs, activation)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _OWN_FLAGS:
            skip = _OWN_FLAGS[name] and "=" not in arg
            continue
        out.append(arg)
    return out


def _train_in_processes(seeds: list[int], child: list[str], root: Path, jobs: int) -> list[Path]:
    """One ``python -m tools.train`` per seed, ``jobs`` at a time (each trains on one thread)."""
    import subprocess  # noqa: PLC0415 - only for parallel seeds

    paths: dict[int, Path] = {}
    running: list[tuple[int, subprocess.Popen[str]]] = []
    todo = list(seeds)
    while todo or running:
        while todo and len(running) < jobs:
            seed = todo.pop(0)
            cmd = [
                sys.executable,
                "-m",
                "tools.train",
                *child,
                "--seed",
                str(seed),
                "--out",
                str(root),
                "--quiet",
            ]
            running.append((seed, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))
        seed, proc = running.pop(0)
        stdout, _ = proc.communicate()
        lines = stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            for _, other in running:
                other.kill()
            raise ValueError(f"training seed {seed} failed (exit {proc.returncode}); its log is above")
        paths[seed] = Path(lines[-1])
    return [paths[s] for s in seeds]


def _train_seeds(
    seeds: list[int], many: Callable[[list[int], Path], list[Path]], out: Path, catalog: Catalog | None
) -> tuple[Path, Any | None]:
    """Train every seed in a scratch folder under ``out``, keep the one :func:`choose_seed` picks;
    return its folder and its evaluation (None without a catalog), which activation then reuses."""
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".seeds-", dir=out))
    try:
        results: list[SeedResult] = []
        reports: dict[str, Any] = {}
        for seed, path in zip(seeds, many(seeds, scratch), strict=True):
            metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
            if catalog is not None:
                reports[path.name] = _evaluate(path, catalog)
            fails = len(reports[path.name].golden_failures) if catalog is not None else None
            results.append(SeedResult(seed, path.name, float(metrics["val_accuracy"] or 0.0), fails))
        chosen = choose_seed(results)
        for r in results:
            _LOGGER.info(
                "  seed %3d  %s  val %.4f  golden failures %s%s",
                r.seed,
                r.model_id,
                r.val_accuracy,
                r.golden_failures,
                "  <- kept" if r is chosen else "",
            )
        dest = out / chosen.model_id
        if not dest.exists():
            (scratch / chosen.model_id).rename(dest)
        return dest, reports.get(chosen.model_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
