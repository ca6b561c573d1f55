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
