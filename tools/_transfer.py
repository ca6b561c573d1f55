"""A transfer set for distillation: new texts made from the training texts, labelled by the teacher.

Soft labels on the training rows themselves teach the student little (it fits those rows with their
hard labels anyway; measured in session 7). What the student lacks is the teacher's judgement *between*
the training rows: on fragments, on sentences with a word gone or a word swapped. Following Tang et al.
(2019, "Distilling task-specific knowledge from BERT into simple neural networks", a BiLSTM student),
each training text gets variants made by dropping words, replacing words with other words of the
corpus in the same script, and sampling an n-gram of one to five words. The teacher embeds every
variant (cached by content hash like everything it embeds), and a softmax regression fitted on the
teacher's embeddings of the labelled training rows gives each variant a class distribution; an
out-of-scope class, when the training data has out-of-scope rows, spreads its mass evenly over the
intents, which is what outlier exposure asks of such a row. The student learns those distributions
(and the teacher's embedding of the variant) next to its labelled rows; the variants have no label of
their own, so they take no part in the hard cross-entropy or the contrastive loss. Their source row's
slot spans follow the words (:func:`carry_spans`), so the tagger trains on them like on any row.

Variants are drawn with a fixed seed of their own and the text (not the training seed), so every
training seed, and a retrain after a catalog edit, reuses the cached teacher embeddings of the texts
that did not change.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import msgspec
import numpy as np

from ._augment import is_cyrillic


def _script(word: str) -> str:
    return "cyr" if is_cyrillic(word.lower()) else "lat"


# Words that turn a request around ("stop the timer but don't clear it"): a variant never drops, swaps
# or cuts them away, because the teacher reads topic, not polarity, and would label what is left.
NEGATIONS = frozenset(
    "not no don't dont never без не нет ни нельзя".split() + "doesn't isn't won't can't cannot".split()
)


def _norm(word: str) -> str:
    """A raw word as the featurizer's vocabulary spells it (lower case, ё→е, no edge punctuation)."""
    return word.lower().replace("ё", "е").strip(".,!?;:\"'«»()[]")


class TransferSet(msgspec.Struct, frozen=True):
    """Model texts of the variants, the teacher's centred targets of them and their class targets."""

    texts: list[str]
    teacher: np.ndarray  # [n, D], centred like the training rows' targets, L2-normalized
    probs: np.ndarray  # [n, classes], rows sum to 1
    # Per variant, BIO label ids per model token carried over from its source row's spans (None: the
    # source had no span labels, or the variant's tokens could not be mapped); the tagger trains on them.
    tags: list[list[int] | None] | None = None


class Variant(NamedTuple):
    """A variant of ``texts[source]``; ``positions[k]`` is the source word its ``k``-th word stands in
    for (kept or swapped), so spans can follow the words."""

    source: int
    text: str
    positions: tuple[int, ...]


_WORD = re.compile(r"\S+")


def carry_spans(
    source: str, spans: Sequence[tuple[int, int, str]], variant: Variant
) -> tuple[tuple[int, int, str], ...]:
    """The source's (start, end, slot) spans over ``variant.text``: each variant word standing in for a
    source word inside a span is in that span (a kept word keeps its share of the span, a swapped word
    all of itself); consecutive words of one source span make one span."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(source)]
    out: list[tuple[int, int, str]] = []
    last: tuple[int, int] | None = None  # (span index, output index) of the previous word in a span
    offset = 0
    for k, (pos, word) in enumerate(zip(variant.positions, variant.text.split(" "), strict=True)):
        ws, we = words[pos]
        kept = source[ws:we] == word
        hit = None
        for si, (a, b, slot) in enumerate(spans):
            if a < we and b > ws:
                start = offset + (max(a, ws) - ws if kept else 0)
                end = offset + (min(b, we) - ws if kept else len(word))
                hit = (si, start, end, slot)
                break
        if hit is not None:
            si, start, end, slot = hit
            if last is not None and last[0] == si and last[1] == k - 1:
                out[-1] = (out[-1][0], end, slot)
            else:
                out.append((start, end, slot))
            last = (si, k)
        offset += len(word) + 1
    return tuple(out)


def variants(  # noqa: PLR0917 - the generator's knobs, all with Tang et al.'s defaults
    texts: Sequence[str],
    per_text: int,
    seed: int = 20261202,
    p_drop: float = 0.1,
    p_swap: float = 0.1,
    p_ngram: float = 0.25,
    max_ngram: int = 5,
    tries: int = 8,
    neighbours: Mapping[str, Sequence[str]] | None = None,
) -> list[Variant]:
    """Up to ``per_text`` new texts for each input text (:class:`Variant`).

    Each word is dropped with probability ``p_drop`` or replaced, with probability ``p_swap``, by a
    word drawn from the corpus's words of the same script (in proportion to their counts), or, when
    ``neighbours`` has the word (normalized), by one of its neighbours there; then, with
    probability ``p_ngram``, one n-gram (1 to ``max_ngram`` words) of the result is kept. A negation
    (:data:`NEGATIONS`) is never dropped, swapped in or out, or cut away. Each text's draws are seeded
    by ``seed`` and the text. A variant equal to any input text, to an earlier variant, or empty is
    drawn again (``tries`` times).
    """
    pools: dict[str, list[str]] = {"cyr": [], "lat": []}
    for text in texts:
        for w in text.split():
            pools[_script(w)].append(w)
    seen = {" ".join(t.split()) for t in texts}
    out: list[Variant] = []
    for i, text in enumerate(texts):
        words = text.split()
        if not words:
            continue
        # Seeded by the text itself: its variants (and their cached teacher embeddings) do not move when
        # other texts are added, removed or drawn differently.
        rng = random.Random(f"{seed}\0{text}")
        for _ in range(per_text):
            for _attempt in range(tries):
                new: list[str] = []
                pos: list[int] = []
                for j, w in enumerate(words):
                    r = rng.random()
                    if r < p_drop and _norm(w) not in NEGATIONS:
                        continue
                    pos.append(j)
                    if r < p_drop or r >= p_drop + p_swap:
                        new.append(w)
                        continue
                    near = neighbours.get(_norm(w)) if neighbours is not None else None
                    pool = near or pools[_script(w)]
                    other = rng.choice(pool) if pool else w
                    # a negation is neither swapped away nor swapped in (the draw is made either way)
                    new.append(w if _norm(w) in NEGATIONS or _norm(other) in NEGATIONS else other)
                if new and rng.random() < p_ngram:
                    n = rng.randint(1, min(max_ngram, len(new)))
                    start = rng.randrange(len(new) - n + 1)
                    cut = [*new[:start], *new[start + n :]]
                    if not any(_norm(w) in NEGATIONS for w in cut):  # the same draws either way
                        new, pos = new[start : start + n], pos[start : start + n]
                candidate = " ".join(new)
                if candidate and candidate not in seen:
                    seen.add(candidate)
                    out.append(Variant(i, candidate, tuple(pos)))
                    break
    return out


def teacher_neighbours(words: Sequence[str], table: np.ndarray, sources: int, k: int) -> dict[str, list[str]]:
    """For each of the first ``sources`` words, its ``k`` nearest other words by the cosine of their
    teacher vectors (``table[i]`` is ``words[i]``'s vector; all-zero rows have none and take no part),
    nearest first, in the same script. The swap pool of :func:`variants` with ``neighbours``: words the
    training texts never used (the teacher's frequent words) enter sentences that way."""
    has = [int(i) for i in np.nonzero(np.abs(table).sum(axis=1) > 0)[0]]
    if not has or k <= 0:
        return {}
    vecs = table[has] / np.linalg.norm(table[has], axis=1, keepdims=True)
    script = np.array([_script(words[i]) == "cyr" for i in has])
    out: dict[str, list[str]] = {}
    src = [j for j, i in enumerate(has) if i < sources]
    for start in range(0, len(src), 1024):
        rows = src[start : start + 1024]
        sims = vecs[rows] @ vecs.T
        sims[np.arange(len(rows)), rows] = -np.inf
        sims[script[rows][:, None] != script[None, :]] = -np.inf
        top = np.argsort(-sims, axis=1)[:, :k]
        for r, j in enumerate(rows):
            out[words[has[j]]] = [words[has[t]] for t in top[r] if np.isfinite(sims[r, t])]
    return out


def teacher_classifier_probs(  # noqa: PLR0917 - arrays of one training run and its settings
    train_targets: np.ndarray,
    labels: Sequence[int],
    n_classes: int,
    queries: np.ndarray,
    c: float,
    iters: int = 100,
    keep_oos: bool = False,
) -> np.ndarray:
    """[queries, n_classes]: a softmax regression fitted on the training rows' teacher targets
    (in-scope rows by intent; out-of-scope rows, if any, as one more class whose probability is spread
    evenly over the intents), applied to ``queries``. ``keep_oos``: [queries, n_classes + 1], the
    out-of-scope class kept as the last column (a student with an out-of-scope output; zero if the
    training rows have none)."""
    import torch  # noqa: PLC0415 - training only
    import torch.nn.functional as F  # noqa: PLC0415, N812

    from ._loop import _softmax_regression  # noqa: PLC0415 - the same regression as the soft labels

    y = np.asarray(labels, dtype=np.int64)
    has_oos = bool((y < 0).any())
    classes = n_classes + (1 if has_oos else 0)
    y = np.where(y < 0, n_classes, y)
    x = torch.from_numpy(np.ascontiguousarray(train_targets, dtype=np.float32))
    w, b = _softmax_regression(x, torch.from_numpy(y), classes, c, iters)
    with torch.no_grad():
        p = F.softmax(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)) @ w + b, dim=1)
    probs = p.numpy().astype(np.float32)
    if keep_oos:
        return probs if has_oos else np.pad(probs, ((0, 0), (0, 1)))
    if has_oos:
        probs = (probs[:, :n_classes] + probs[:, n_classes:] / n_classes).astype(np.float32)
    return probs / probs.sum(axis=1, keepdims=True)


def mix_source_labels(
    probs: np.ndarray, source_labels: Sequence[int], mix: float, oos_column: bool = False
) -> np.ndarray:
    """``(1 - mix)`` of the teacher's distribution plus ``mix`` of the source row's own label (one-hot;
    for an out-of-scope source, label < 0, uniform, or the last column with ``oos_column``); ``mix``
    is clipped to [0, 1]."""
    mix = min(1.0, max(0.0, mix))
    if mix == 0 or not len(probs):
        return probs
    n = probs.shape[1]
    src = np.asarray(source_labels, dtype=np.int64)
    own = np.full_like(probs, 1.0 / n)
    if oos_column:
        own[src < 0] = np.eye(n, dtype=probs.dtype)[n - 1]
    own[src >= 0] = np.eye(n, dtype=probs.dtype)[src[src >= 0]]
    return ((1.0 - mix) * probs + mix * own).astype(probs.dtype)


def agreeing(probs: np.ndarray, source_labels: Sequence[int], n_intents: int | None = None) -> np.ndarray:
    """A mask over the variants: True where the source is out of scope (label < 0) or the teacher's
    top intent is the source's own label. Only the first ``n_intents`` columns compete (default all):
    an out-of-scope column kept for the student (``keep_oos``) is not another intent, so a variant the
    teacher finds out of scope is kept as it was when that mass was spread over the intents (adding
    the same share to every intent never changes which intent is on top)."""
    src = np.asarray(source_labels, dtype=np.int64)
    return (src < 0) | (probs[:, :n_intents].argmax(axis=1) == src)
