"""Training-time noise: keyboard typos and ASR-like word slips, applied to canonicalized text."""

from __future__ import annotations

import random

_LATIN = "abcdefghijklmnopqrstuvwxyz"
_CYRILLIC = "абвгдежзийклмнопрстуфхцчшщъыьэюя"


def is_cyrillic(word: str) -> bool:
    """Whether a (lower-case) word has a Cyrillic letter: the script a slip or a swap stays in."""
    return any("а" <= ch <= "я" for ch in word)


def _alphabet(word: str) -> str:
    return _CYRILLIC if is_cyrillic(word) else _LATIN


def typo(word: str, rng: random.Random) -> str:
    """One keyboard slip: swap, drop, double or replace a character (words of 4+ letters only)."""
    if len(word) < 4 or word.startswith("{"):
        return word
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(4)
    if op == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if op == 1:
        return word[:i] + word[i + 1 :]
    if op == 2:
        return word[:i] + word[i] + word[i:]
    return word[:i] + rng.choice(_alphabet(word)) + word[i + 1 :]


def asr_slip(words: list[str], rng: random.Random) -> list[str]:
    """One speech-recognition-like slip: drop a short word, glue two words, or repeat one."""
    if len(words) < 3:
        return words
    op = rng.randrange(3)
    i = rng.randrange(len(words) - 1)
    if op == 0:
        short = [j for j, w in enumerate(words) if len(w) <= 3 and not w.startswith("{")]
        if short:
            j = rng.choice(short)
            return words[:j] + words[j + 1 :]
        return words
    if op == 1 and not words[i].startswith("{") and not words[i + 1].startswith("{"):
        return words[:i] + [words[i] + words[i + 1]] + words[i + 2 :]
    return words[: i + 1] + words[i:]


def augment(text: str, rng: random.Random, rate: float) -> str:
    """With probability ``rate`` add one or two slips to ``text``; otherwise return it unchanged."""
    if rate <= 0.0 or rng.random() >= rate:
        return text
    words = text.split()
    if not words:
        return text
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.6:
            j = rng.randrange(len(words))
            words[j] = typo(words[j], rng)
        else:
            words = asr_slip(words, rng)
    return " ".join(words)


def augment_tagged(
    words: list[str], tags: list[int], rng: random.Random, rate: float
) -> tuple[list[str], list[int]]:
    """:func:`augment` for a row with one BIO label id per word: the labels follow the slips.

    A typo keeps the word's label; a dropped word drops it; glued words keep the first label; a
    repeated word inside a span continues it (label ids: 0 = O, odd = B-x, the next even = I-x).
    """
    if rate <= 0.0 or rng.random() >= rate or not words:
        return words, tags
    words, tags = list(words), list(tags)
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.6 or len(words) < 3:
            j = rng.randrange(len(words))
            words[j] = typo(words[j], rng)
            continue
        op = rng.randrange(3)
        i = rng.randrange(len(words) - 1)
        if op == 0:
            short = [j for j, w in enumerate(words) if len(w) <= 3 and not w.startswith("{") and tags[j] == 0]
            if short:
                j = rng.choice(short)
                del words[j], tags[j]
        elif op == 1 and not words[i].startswith("{") and not words[i + 1].startswith("{"):
            if tags[i + 1] == 0 or tags[i + 1] % 2 == 0:  # never swallow the start of a span
                words[i : i + 2] = [words[i] + words[i + 1]]
                tags[i : i + 2] = [tags[i]]
        else:
            words.insert(i, words[i])
            tags.insert(i + 1, tags[i] + 1 if tags[i] % 2 == 1 else tags[i])
    return words, tags


def tag_spans(tags: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, B label id) of each span in a BIO label row (0 = O, odd = B-x, the next even = I-x)."""
    out: list[tuple[int, int, int]] = []
    for j, t in enumerate(tags):
        if t % 2 == 1:
            out.append((j, j + 1, t))
        elif t and out and out[-1][1] == j and out[-1][2] + 1 == t:
            out[-1] = (out[-1][0], j + 1, out[-1][2])
    return out


SpanPool = dict[tuple[int, int], list[tuple[str, ...]]]  # (intent label, B label id) -> span word tuples


def span_pool(rows: list[tuple[int, list[str], list[int]]]) -> SpanPool:
    """Every span's words per (intent, slot) over ``(label, words, tags)`` rows; placeholders stay out."""
    pool: dict[tuple[int, int], set[tuple[str, ...]]] = {}
    for label, words, tags in rows:
        for a, b, t in tag_spans(tags):
            span = tuple(words[a:b])
            if not any(w.startswith("{") for w in span):
                pool.setdefault((label, t), set()).add(span)
    return {k: sorted(v) for k, v in pool.items() if len(v) > 1}


def swap_spans(  # noqa: PLR0917 - one row's parallel lists and the run's pool
    words: list[str], tags: list[int], label: int, pool: SpanPool, rng: random.Random, rate: float
) -> tuple[list[str], list[int]]:
    """Replace each span, with probability ``rate``, by another span of the same slot of the same intent.

    "add [oat milk](item) to my list" becomes "add [dish soap](item) to my list": the tagger learns the
    carrier, not the few names the catalog happened to write, and the intent head sees names vary.
    """
    if rate <= 0.0 or not pool:
        return words, tags
    spans = tag_spans(tags)
    if not spans:
        return words, tags
    out_w, out_t, last = [], [], 0
    for a, b, t in spans:
        out_w += words[last:a]
        out_t += tags[last:a]
        choices = pool.get((label, t))
        span = tuple(words[a:b])
        if choices and rng.random() < rate and not any(w.startswith("{") for w in span):
            new = choices[rng.randrange(len(choices))]
            out_w += list(new)
            out_t += [t] + [t + 1] * (len(new) - 1)
        else:
            out_w += words[a:b]
            out_t += tags[a:b]
        last = b
    out_w += words[last:]
    out_t += tags[last:]
    return out_w, out_t
