"""Training-time noise: keyboard typos and ASR-like word slips, applied to canonicalized text."""

from __future__ import annotations

import random

_LATIN = "abcdefghijklmnopqrstuvwxyz"
_CYRILLIC = "абвгдежзийклмнопрстуфхцчшщъыьэюя"


def _alphabet(word: str) -> str:
    return _CYRILLIC if any("а" <= ch <= "я" for ch in word) else _LATIN


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
