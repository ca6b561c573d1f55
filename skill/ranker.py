"""The neural stage: onnxruntime encoder + FAISS nearest examples + priors, blended and calibrated."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import msgspec
import numpy as np
import onnxruntime as ort

from .artifacts import ModelError, verify_model_dir
from .canonicalize import Canonical, Canonicalizer
from .catalog import Catalog
from .decision import Candidate, Decision, Outcome
from .features import VOCAB_NAME, Featurizer, model_text
from .scoring import (
    CALIBRATION_FEATURES,
    Blend,
    Calibration,
    alternative_confidences,
    log_priors,
    score_one,
)
from .tagging import decode, token_map

_LOGGER = logging.getLogger(__name__)

VIA = "neural"
MATCHED_EXAMPLES = 3
ALTERNATIVES = 4


class RankerConfig(msgspec.Struct, frozen=True):
    """``ranker_config.json``: label order, fitted blend and calibration, reject margin, gate thresholds."""

    intents: list[str]
    blend: Blend
    calibration: Calibration
    neg_margin: float
    thresholds: dict[str, float]
    model_file: str = "model.onnx"
    vocab_file: str = VOCAB_NAME
    schema_version: int = 1
    net: dict[str, Any] = msgspec.field(default_factory=dict)
    train: dict[str, Any] = msgspec.field(default_factory=dict)
    tags: list[str] = msgspec.field(default_factory=list)  # BIO labels of the tagging head ([]: none)
    tag_slots: dict[str, list[str]] = msgspec.field(default_factory=dict)  # intent -> slots it may tag
    tag_raw_intents: list[str] = msgspec.field(default_factory=list)  # bench intents: placeholders taggable
    tag_threshold: float = 0.5  # the decode's P(slot | slot or O) threshold, fitted on val


class IntentInfo(msgspec.Struct, frozen=True):
    """One line of ``intents_manifest.json``."""

    intent: str
    prior: float = 1.0
    owner: str = ""
    risky: bool = False
    examples: int = 0
    locales: list[str] = msgspec.field(default_factory=list)


class ExampleRow(msgspec.Struct, frozen=True, omit_defaults=True):
    """One line of ``examples_manifest.jsonl``: the next row of ``faiss.index`` or of the negatives."""

    text: str
    intent: str
    locale: str = ""
    negative: bool = False


# Rows per onnxruntime run when embedding catalog rows at load. Measured with the embedded model
# (592 rows): batches of 256 left the service 12.8 MiB larger for good (onnxruntime keeps its arena
# at the largest shape it has seen), batches of 8 cost 4.9 MiB and about 0.1 s more.
_EMBED_BATCH = 8


def catalog_example_rows(catalog: Catalog, canonicalizer: Canonicalizer) -> list[ExampleRow]:
    """Every catalog example and negative as index rows, canonicalized the way training does it."""
    rows = [
        ExampleRow(model_text(canonicalizer.canonicalize(ex.text, ex.locale)), ex.intent, ex.locale)
        for ex in catalog.examples()
    ]
    rows += [
        ExampleRow(
            model_text(canonicalizer.canonicalize(ex.text, ex.locale)), ex.intent, ex.locale, negative=True
        )
        for ex in catalog.negatives()
    ]
    return rows


def _read_json(path: Path, typ: Any) -> Any:
    try:
        return msgspec.json.decode(path.read_bytes(), type=typ)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ModelError(f"{path}: {exc}") from exc


def _read_index(path: Path, dim: int) -> faiss.Index:
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise ModelError(f"{path}: unreadable FAISS index: {exc}") from exc
    if index.d != dim:
        raise ModelError(f"{path}: dimension {index.d} != embedding size {dim}")
    return index


class Ranker:
    """Loaded once per model version; ``decide`` is thread-safe (read-only session and indexes)."""

    def __init__(
        self,
        *,
        model_id: str,
        model_dir: Path,
        config: RankerConfig,
        session: ort.InferenceSession,
        featurizer: Featurizer,
        index: faiss.Index,
        negatives: faiss.Index | None,
        positives_rows: list[ExampleRow],
        negative_rows: list[ExampleRow],
        intents: list[IntentInfo],
        threads: int,
    ) -> None:
        self.model_id = model_id
        self.model_dir = model_dir
        self.config = config
        self._session = session
        self._featurizer = featurizer
        self._index = index
        self._negatives = negatives
        self._pos = positives_rows
        self._neg = negative_rows
        self._intents = intents
        self._threads = threads
        self._names = config.intents
        position = {name: i for i, name in enumerate(config.intents)}
        self._labels = np.asarray([position[r.intent] for r in positives_rows], dtype=np.int64)
        self._log_prior = log_priors([i.prior for i in intents])
        self._prior = np.exp(self._log_prior)
        try:
            self._calibration = config.calibration.linear(CALIBRATION_FEATURES)
        except ValueError as exc:
            raise ModelError(f"{model_dir}: {exc}") from exc
        self.added = {"examples": 0, "negatives": 0, "skipped_unknown_intent": 0}
        self._tags = config.tags if len(session.get_outputs()) > 2 else []
        if self._tags and self._tags[0] != "O":
            raise ModelError(f"{model_dir}: tag 0 must be O, got {self._tags[0]!r}")
        self._tag_slots = {k: set(v) for k, v in config.tag_slots.items()}
        self._tag_raw = set(config.tag_raw_intents)
        self._pattern = re.compile(featurizer.spec.token_pattern)
        # A network with an out-of-scope output (NetConfig.oos_class) exports the intents' probabilities
        # only: what they lack of 1 is the mass it gave "no intent", reported in the evidence.
        self._oos_class = bool(config.net.get("oos_class", False))

    @classmethod
    def load(cls, model_dir: Path, *, threads: int = 1) -> Ranker:
        """Verify the folder's manifest, open every artifact, check they fit together, and warm up."""
        model_dir = Path(model_dir)
        manifest = verify_model_dir(model_dir)
        config: RankerConfig = _read_json(model_dir / "ranker_config.json", RankerConfig)
        intents: list[IntentInfo] = _read_json(model_dir / "intents_manifest.json", list[IntentInfo])
        if [i.intent for i in intents] != config.intents:
            raise ModelError(f"{model_dir}: intents_manifest.json and ranker_config.json disagree")
        if len(config.intents) < 2:
            raise ModelError(f"{model_dir}: a ranker needs at least two intents")
        try:
            featurizer = Featurizer.load(model_dir / config.vocab_file)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ModelError(f"{model_dir / config.vocab_file}: {exc}") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # No onnxruntime CPU arena: the service runs one row at a time in shapes that vary with the
        # word count, and the arena keeps the peak of every shape it has seen (the startup embedding of
        # the catalog's rows left it 2 MB larger, measured; per-call latency is the same without it).
        opts.enable_cpu_mem_arena = False
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(
                str(model_dir / config.model_file), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad graph
            raise ModelError(f"{model_dir / config.model_file}: {exc}") from exc
        faiss.omp_set_num_threads(threads)
        dim = int(config.net.get("proj_dim", 0)) or session.get_outputs()[1].shape[1] or 0
        rows: list[ExampleRow] = []
        for n, line in enumerate((model_dir / "examples_manifest.jsonl").read_bytes().splitlines(), 1):
            try:
                rows.append(msgspec.json.decode(line, type=ExampleRow))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ModelError(f"{model_dir}/examples_manifest.jsonl:{n}: {exc}") from exc
        pos = [r for r in rows if not r.negative]
        neg = [r for r in rows if r.negative]
        index = _read_index(model_dir / "faiss.index", dim)
        # AdaOS's name; folders written before issue 15 call it faiss_negatives.index.
        neg_path = model_dir / "negative_faiss.index"
        if not neg_path.is_file() and (model_dir / "faiss_negatives.index").is_file():
            neg_path = model_dir / "faiss_negatives.index"
        negatives = _read_index(neg_path, dim) if neg else None
        if index.ntotal != len(pos) or (negatives is not None and negatives.ntotal != len(neg)):
            raise ModelError(f"{model_dir}: index sizes do not match examples_manifest.jsonl")
        unknown = {r.intent for r in pos} - set(config.intents)
        if unknown:
            raise ModelError(f"{model_dir}: examples of unknown intents {sorted(unknown)}")
        ranker = cls(
            model_id=manifest.model_id,
            model_dir=model_dir,
            config=config,
            session=session,
            featurizer=featurizer,
            index=index,
            negatives=negatives,
            positives_rows=pos,
            negative_rows=neg,
            intents=intents,
            threads=threads,
        )
        ranker._warm_up()
        _LOGGER.info("ranker %s loaded: %d intents, %d examples", manifest.model_id, len(intents), len(pos))
        return ranker

    def _warm_up(self) -> None:
        try:
            for text in ("warm up", "прогрев модели {time}"):
                self.score_text(text)
        except Exception as exc:  # a graph that loads but cannot run these inputs is a broken model
            raise ModelError(f"{self.model_dir}: warm-up failed: {exc}") from exc

    def _run(self, masked: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
        """One forward pass: class probabilities, embedding, tag probabilities (None without a head) and
        the share of words the vocabulary does not know (a calibration feature)."""
        enc = self._featurizer.encode([masked])
        outs = self._session.run(None, enc.feeds())
        return outs[0], outs[1], outs[2] if len(outs) > 2 else None, self._featurizer.unseen_share(enc.words)

    def tag(
        self, canonical: Canonical, intent: str | None, tag_probs: np.ndarray | None = None
    ) -> list[dict[str, Any]]:
        """Open-class spans the tagging head finds in the unmasked words, for ``intent``'s slots.

        Only slots the intent declares are decoded (a constrained decode); nothing without a head.
        """
        if not self._tags or intent is None:
            return []
        allowed = self._tag_slots.get(intent)
        if not allowed:
            return []
        if tag_probs is None:
            tag_probs = self._run(model_text(canonical))[2]
        if tag_probs is None or float(tag_probs[0, :, 0].min()) >= max(0.5, 1.0 - self.config.tag_threshold):
            return []  # every word is O (label 0) beyond what any slot could beat: nothing to decode
        tmap = token_map(canonical, self._pattern, self._featurizer.spec.max_words)
        if tmap is None:
            return []
        spans = decode(
            tag_probs[0], self._tags, tmap, canonical, allowed, placeholders=intent in self._tag_raw
        )
        return [msgspec.to_builtins(s) for s in spans]

    def _search(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | None, int]:
        """kNN sims, their labels and example rows, and the nearest negative's sim and row."""
        k = min(self.config.blend.k, self._index.ntotal)
        sims, rows = self._index.search(emb, k)
        neg_sim: float | None = None
        neg_row = -1
        if self._negatives is not None:
            ns, nr = self._negatives.search(emb, 1)
            neg_sim, neg_row = float(ns[0, 0]), int(nr[0, 0])
        return sims, self._labels[rows], rows, neg_sim, neg_row

    def score_text(
        self, masked: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float | None, int]:
        """Softmax, kNN sims and labels, example rows, nearest-negative sim and row for one text."""
        probs, emb, _, _ = self._run(masked)
        sims, labels, rows, neg_sim, neg_row = self._search(emb)
        return probs, sims, labels, rows, neg_sim, neg_row

    def decide(self, canonical: Canonical) -> Decision:
        """Rank intents for ``canonical.masked``: ACCEPT (calibrated confidence) or REJECT on negatives."""
        probs, emb, tag_probs, unk = self._run(model_text(canonical))
        sims, labels, rows, neg_sim, neg_row = self._search(emb)
        one = score_one(
            probs[0], sims[0], labels[0], neg_sim, self._log_prior, self.config.blend, unk, ALTERNATIVES + 1
        )
        scores, feats, top, knn_top = one.scores, one.features, one.top, one.knn_top
        w, b = self._calibration
        conf = 1.0 / (1.0 + math.exp(-min(40.0, max(-40.0, float(feats @ w) + b))))  # = calibrate(), one row
        alternatives = tuple(
            Candidate(self._names[i], round(c, 6))
            for i, c in alternative_confidences(scores, top, conf, ALTERNATIVES, one.order)
        )
        matched = [
            self._pos[r].text
            for r, lab in zip(rows[0].tolist(), labels[0].tolist(), strict=True)
            if lab == top
        ]
        nearest_negative = None
        if neg_sim is not None and neg_row >= 0:
            n = self._neg[neg_row]
            nearest_negative = {"text": n.text, "similarity": round(neg_sim, 6), "not_intent": n.intent}
        pos_sim = float(sims[0, 0]) if sims.shape[1] else 0.0
        evidence: dict[str, Any] = {
            "softmax": round(float(probs[0, top]), 6),
            "knn": round(knn_top, 6),
            "skill_prior": round(float(self._prior[top]), 6),
            "blend_score": round(float(scores[top]), 6),
            "margin": round(float(feats[1]), 6),
            "matched_examples": matched[:MATCHED_EXAMPLES],
            "nearest_example_similarity": round(pos_sim, 6),
            "unknown_word_share": round(unk, 4),
            "nearest_negative": nearest_negative,
            "canonicalized_text": canonical.masked,
            "model_id": self.model_id,
        }
        if self._oos_class:
            evidence["out_of_scope_share"] = round(max(0.0, 1.0 - float(probs[0].sum())), 6)
        if tag_probs is not None:
            evidence["tagged_spans"] = self.tag(canonical, self._names[top], tag_probs)
        if neg_sim is not None and neg_sim - pos_sim > self.config.neg_margin:
            return Decision(
                intent=None,
                confidence=round(conf, 6),
                outcome=Outcome.REJECT,
                via=VIA,
                alternatives=(Candidate(self._names[top], round(conf, 6)),)
                + alternatives[: ALTERNATIVES - 1],
                evidence=evidence,
                reason=(
                    "nearest negative example is within "
                    f"{-self.config.neg_margin:.3f} of the nearest intent example"
                    if self.config.neg_margin < 0
                    else "nearest negative example is closer than any intent example"
                ),
            )
        return Decision(
            intent=self._names[top],
            confidence=round(conf, 6),
            outcome=Outcome.ACCEPT,
            via=VIA,
            alternatives=alternatives,
            evidence=evidence,
        )

    def add_examples(self, rows: Sequence[ExampleRow]) -> dict[str, int]:
        """Embed catalog rows the model's indexes lack and add them, in memory only.

        A maintainer's new example (or one the training held out for calibration) then counts as a
        neighbour at once, without retraining; the model folder stays as it was verified. Rows of
        intents the model was not trained on cannot be scored and are counted as skipped. Call
        before the ranker serves: the indexes are not locked.
        """
        known_pos = {(r.text, r.intent) for r in self._pos}
        known_neg = {r.text for r in self._neg}
        names = set(self._names)
        pos: dict[tuple[str, str], ExampleRow] = {}
        neg: dict[str, ExampleRow] = {}
        skipped = 0
        for row in rows:
            if not row.text.strip():
                continue
            if row.negative:
                if row.text not in known_neg:
                    neg.setdefault(row.text, row)
            elif row.intent not in names:
                skipped += 1
            elif (row.text, row.intent) not in known_pos:
                pos.setdefault((row.text, row.intent), row)
        if pos:
            new = list(pos.values())
            self._index.add(self._embed([r.text for r in new]))
            self._pos = self._pos + new
            position = {name: i for i, name in enumerate(self._names)}
            extra = np.asarray([position[r.intent] for r in new], dtype=np.int64)
            self._labels = np.concatenate([self._labels, extra])
        if neg:
            new_neg = list(neg.values())
            emb = self._embed([r.text for r in new_neg])
            if self._negatives is None:
                self._negatives = faiss.IndexFlatIP(emb.shape[1])
            self._negatives.add(emb)
            self._neg = self._neg + new_neg
        self.added = {"examples": len(pos), "negatives": len(neg), "skipped_unknown_intent": skipped}
        return self.added

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        """Projection vectors for ``texts``, run in batches of equal word count (as in training)."""
        out: np.ndarray | None = None
        groups: dict[int, list[int]] = {}
        for i, text in enumerate(texts):
            groups.setdefault(self._featurizer.n_tokens(text), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), _EMBED_BATCH):
                part = idx[start : start + _EMBED_BATCH]
                emb = self._session.run(None, self._featurizer.encode([texts[i] for i in part]).feeds())[1]
                if out is None:
                    out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
                out[part] = emb
        assert out is not None
        return np.ascontiguousarray(out)

    @property
    def thresholds(self) -> dict[str, float]:
        """Gate thresholds shipped with the model (accept / reject / margin)."""
        return dict(self.config.thresholds)

    def info(self) -> dict[str, Any]:
        """Health fields: index sizes, backends, threads, model size."""
        model_path = self.model_dir / self.config.model_file
        return {
            "model_id": self.model_id,
            "intents": len(self._names),
            "examples_total": int(self._index.ntotal),
            "negatives_total": int(self._negatives.ntotal) if self._negatives is not None else 0,
            "catalog_rows_added": dict(self.added),
            "index_backend": f"faiss.{type(self._index).__name__}",
            "negatives_backend": f"faiss.{type(self._negatives).__name__}"
            if self._negatives is not None
            else None,
            "onnx_threads": self._threads,
            "tagger": {"slots": sorted({t[2:] for t in self._tags if t != "O"})} if self._tags else None,
            "model_bytes": model_path.stat().st_size,
            "folder_bytes": sum(p.stat().st_size for p in self.model_dir.iterdir() if p.is_file()),
        }
