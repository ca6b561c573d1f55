"""Text → model inputs (char ids per word, word ids, n-gram ids), driven by the model's vocab file."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

_LOGGER = logging.getLogger(__name__)

PAD = 0
UNK = 1
VOCAB_NAME = "vocab.json"
# Words whose ids are kept (the cache is emptied when full). A home hears new names and typos for
# months: at 50,000 entries the cache alone grew the service by about 25 MB in a soak where every
# request brought a new word (`python -m tools.load --soak 150 --novel-words`); 8,192 bounds it at ~4 MB.
_CACHE_LIMIT = 8192


class FeatureSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How text is cut into model inputs; stored in ``vocab.json`` so serving cuts it the same way."""

    token_pattern: str = r"\{[a-z_]+\}|[^\W_]+"
    max_words: int = 32
    word_chars: int = 16  # every word is padded/truncated to this many chars (fixed: train == serve)
    char_ngram_min: int = 2
    char_ngram_max: int = 5
    word_ngram_max: int = 2
    max_ngrams: int = 384
    min_count: int = 2
    max_vocab_ngrams: int = 24_000
    max_vocab_words: int = 20_000


class Vocab(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Preprocessing data: the spec plus char, word and n-gram vocabularies (id = list position + offset)."""

    spec: FeatureSpec
    chars: list[str]  # id = index + 2 (0 pad, 1 unknown)
    words: list[str]  # id = index + 2
    ngrams: list[str]  # id = index + 1 (0 pad; unknown n-grams are dropped)
    schema_version: int = 1
    # Words no training text used, known from a teacher's word vectors (id = len(words) + 2 + index):
    # they have a meaningful embedding but still count as unseen for calibration.
    extra_words: list[str] = msgspec.field(default_factory=list)

    @property
    def n_chars(self) -> int:
        """Size of the char embedding table."""
        return len(self.chars) + 2

    @property
    def n_words(self) -> int:
        """Size of the word embedding table."""
        return len(self.words) + len(self.extra_words) + 2

    @property
    def n_trained_words(self) -> int:
        """Word ids below this were seen in training texts (0 pad and 1 unknown included)."""
        return len(self.words) + 2

    @property
    def n_ngrams(self) -> int:
        """Size of the n-gram embedding table."""
        return len(self.ngrams) + 1


class Encoded(msgspec.Struct, frozen=True):
    """A padded batch of model inputs (all int64)."""

    chars: np.ndarray  # [B, W, word_chars]
    words: np.ndarray  # [B, W]
    ngrams: np.ndarray  # [B, N]

    def feeds(self) -> dict[str, np.ndarray]:
        """The onnxruntime input dict."""
        return {"chars": self.chars, "words": self.words, "ngrams": self.ngrams}


_NAMED = re.compile(r"\{(device|list)\}")


def placeholder_token(placeholder: str, kind: str, ref: str | None = None) -> str:
    """How a placeholder reaches the model: ``{device}`` names its kind (``{device_cover}``), so
    "закрой {device}" can tell a curtain from a lock, and ``{list}`` names its list (``{list_todo}``),
    so "what's on my shopping list" stays apart from "what's on my to-do list"; every other
    placeholder stays as it is."""
    if placeholder == "device" and kind.startswith("device."):
        return "{device_" + kind.split(".", 1)[1].replace(".", "_") + "}"
    if placeholder == "list" and ref and ref.startswith("list:"):
        return "{list_" + ref.split(":", 1)[1].replace(".", "_").replace("-", "_") + "}"
    return "{" + placeholder + "}"


def model_text(canonical: Any) -> str:
    """The ranker's input: ``canonical.masked`` with each ``{device}`` carrying its kind and each
    ``{list}`` its list (train = serve)."""
    masked: str = canonical.masked
    if "{device}" not in masked and "{list}" not in masked:
        return masked
    named = {
        ph: iter(sorted((e for e in canonical.entities if e.placeholder == ph), key=lambda e: e.start))
        for ph in ("device", "list")
    }

    def token(m: re.Match[str]) -> str:
        e = next(named[m[1]], None)
        return placeholder_token(m[1], getattr(e, "kind", ""), getattr(e, "ref", None))

    return _NAMED.sub(token, masked)


def tokenize(text: str, spec: FeatureSpec) -> list[str]:
    """Words of already-canonicalized text (placeholders like ``{time}`` stay whole)."""
    return re.findall(spec.token_pattern, text.lower())[: spec.max_words]


def word_char_ngrams(word: str, spec: FeatureSpec) -> list[str]:
    """Char n-grams of ``<word>`` (fastText style); a placeholder is one n-gram."""
    if word.startswith("{"):
        return [word]
    padded = f"<{word}>"
    out: list[str] = []
    for n in range(spec.char_ngram_min, spec.char_ngram_max + 1):
        out.extend(padded[i : i + n] for i in range(len(padded) - n + 1))
    return out


def text_ngrams(
    words: Sequence[str], spec: FeatureSpec, per_word: Sequence[list[str]] | None = None
) -> list[str]:
    """Every n-gram feature of an utterance: words, word n-grams (``a b``), char n-grams (``#xyz``)."""
    out: list[str] = [f"w:{w}" for w in words]
    for n in range(2, spec.word_ngram_max + 1):
        out.extend("w:" + " ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    grams = per_word if per_word is not None else [word_char_ngrams(w, spec) for w in words]
    for g in grams:
        out.extend("c:" + x for x in g)
    return out


def build_vocab(texts: Iterable[str], spec: FeatureSpec | None = None) -> Vocab:
    """Count chars, words and n-grams over training texts; keep the frequent ones (deterministic order)."""
    spec = spec or FeatureSpec()
    chars: Counter[str] = Counter()
    words: Counter[str] = Counter()
    grams: Counter[str] = Counter()
    for text in texts:
        toks = tokenize(text, spec)
        words.update(toks)
        for tok in toks:
            chars.update(tok)
        grams.update(set(text_ngrams(toks, spec)))

    def top(counter: Counter[str], limit: int, min_count: int) -> list[str]:
        kept = [k for k, c in counter.items() if c >= min_count]
        kept.sort(key=lambda k: (-counter[k], k))
        return sorted(kept[:limit])

    return Vocab(
        spec=spec,
        chars=top(chars, 2000, 1),
        words=top(words, spec.max_vocab_words, 1),
        ngrams=top(grams, spec.max_vocab_ngrams, spec.min_count),
    )


class Featurizer:
    """Turns canonicalized text into padded id arrays; thread-safe (the word cache holds whole entries)."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self.spec = vocab.spec
        self._pattern = re.compile(vocab.spec.token_pattern)
        self._char_id = {c: i + 2 for i, c in enumerate(vocab.chars)}
        self._word_id = {w: i + 2 for i, w in enumerate([*vocab.words, *vocab.extra_words])}
        self._gram_id = {g: i + 1 for i, g in enumerate(vocab.ngrams)}
        self._cache: dict[str, tuple[np.ndarray, int, list[int]]] = {}

    @classmethod
    def load(cls, path: Path) -> Featurizer:
        """Read ``vocab.json``."""
        return cls(msgspec.json.decode(path.read_bytes(), type=Vocab))

    def _word(self, word: str) -> tuple[np.ndarray, int, list[int]]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        spec = self.spec
        row = np.zeros(spec.word_chars, dtype=np.int64)
        ids = [self._char_id.get(c, UNK) for c in word[: spec.word_chars]]
        row[: len(ids)] = ids
        gram_ids = [g for g in (self._gram_id.get("c:" + x, 0) for x in word_char_ngrams(word, spec)) if g]
        entry = (row, self._word_id.get(word, UNK), gram_ids)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache = {}
        self._cache[word] = entry
        return entry

    def encode_one(self, text: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """One utterance: chars [W, word_chars], word ids [W], n-gram ids (unpadded)."""
        spec = self.spec
        words = self._pattern.findall(text.lower())[: spec.max_words] or [""]
        parts = [self._word(w) for w in words]
        chars = np.stack([p[0] for p in parts])
        word_ids = np.fromiter((p[1] for p in parts), dtype=np.int64, count=len(parts))
        grams: list[int] = []
        for p in parts:
            grams.extend(p[2])
        get = self._gram_id.get
        for n in range(1, spec.word_ngram_max + 1):
            for i in range(len(words) - n + 1):
                g = get("w:" + " ".join(words[i : i + n]), 0)
                if g:
                    grams.append(g)
        return chars, word_ids, grams[: spec.max_ngrams]

    def encode(self, texts: Sequence[str]) -> Encoded:
        """A batch; words are padded to the longest utterance, n-grams with 0 (models mask both)."""
        rows = [self.encode_one(t) for t in texts]
        if len(rows) == 1:  # the serving path: no padding to do
            c, w, g = rows[0]
            grams_one = np.asarray(g or [0], dtype=np.int64)[None, :]
            return Encoded(chars=c[None, :, :], words=w[None, :], ngrams=grams_one)
        n_words = max(r[0].shape[0] for r in rows)
        n_grams = max(1, *(len(r[2]) for r in rows))
        chars = np.zeros((len(rows), n_words, self.spec.word_chars), dtype=np.int64)
        words = np.zeros((len(rows), n_words), dtype=np.int64)
        grams = np.zeros((len(rows), n_grams), dtype=np.int64)
        for i, (c, w, g) in enumerate(rows):
            chars[i, : c.shape[0]] = c
            words[i, : w.shape[0]] = w
            grams[i, : len(g)] = g
        return Encoded(chars=chars, words=words, ngrams=grams)

    def unseen_share(self, word_ids: np.ndarray) -> float:
        """Share of the words training never saw (unknown, or known only from teacher word vectors)."""
        ids = word_ids.ravel().tolist()  # a handful of words: plain ints beat three numpy calls here
        if not ids:
            return 1.0
        limit = self.vocab.n_trained_words
        return sum(1 for i in ids if i == UNK or i >= limit) / len(ids)

    def n_tokens(self, text: str) -> int:
        """How many words the model sees (used to bucket training batches by length)."""
        return max(1, len(self._pattern.findall(text.lower())[: self.spec.max_words]))
