"""Registry matcher: alias lemma sequences (pymorphy3) with fuzzy single-word fallback (rapidfuzz)."""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import pymorphy3
from rapidfuzz import fuzz, process

from .values import Lemmas, Matching

_LOGGER = logging.getLogger(__name__)

_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_LATIN = re.compile(r"[a-z]")
_MAX_WORD = 40  # longer "words" are noise (pasted hashes, keyboard mashing): no analysis
EXACT, LEMMA, FUZZY = "exact", "lemma", "fuzzy"


def _singular(word: str) -> str:
    """English plural folding for alias matching ("lights" → "light", "batteries" → "battery")."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("xes", "zes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


class Lemmatizer:
    """Word → ``Lemmas`` (surface, most likely lemma, other likely lemmas); cached, thread-safe."""

    # Bounded for a service that hears new words for months: the catalog's own words fill about 10,000
    # lemma and 5,000 known-word entries at start, and 65,536 of each let a soak of novel words grow the
    # service by about 30 MB (`python -m tools.load --soak 150 --novel-words`).
    def __init__(self, min_score: float, cache_size: int = 16384) -> None:
        self._morph = pymorphy3.MorphAnalyzer()
        self._lock = threading.Lock()  # pymorphy3 does not promise thread safety; only misses lock
        self._min_score = min_score
        self.lemmas: Callable[[str], Lemmas] = functools.lru_cache(maxsize=cache_size)(self._lemmas)
        self.is_known: Callable[[str], bool] = functools.lru_cache(maxsize=cache_size // 2)(self._is_known)

    def _lemmas(self, word: str) -> Lemmas:
        if not word or len(word) > _MAX_WORD or word[0].isdigit():
            return (word,)
        if _CYRILLIC.search(word):
            with self._lock:
                parses = self._morph.parse(word)
            scores: dict[str, float] = {}
            for parse in parses:
                form = parse.normal_form.replace("ё", "е")
                scores[form] = scores.get(form, 0.0) + parse.score
            ranked = sorted(scores.items(), key=lambda kv: -kv[1])
            likely = [form for i, (form, score) in enumerate(ranked) if i == 0 or score >= self._min_score]
            return tuple(dict.fromkeys([word, *likely]))
        if _LATIN.search(word):
            return tuple(dict.fromkeys([word, _singular(word)]))
        return (word,)

    def alias_forms(self, word: str) -> frozenset[str]:
        """Forms an alias word accepts; a word that can be a noun keeps only its noun lemmas."""
        # "детская" (the room) must match "в детской" but not the adjective in "детский анекдот".
        if not _CYRILLIC.search(word) or len(word) > _MAX_WORD:
            return frozenset(self.lemmas(word))
        with self._lock:
            parses = self._morph.parse(word)
        nouns: dict[str, float] = {}
        for parse in parses:
            if parse.tag.POS == "NOUN":
                form = parse.normal_form.replace("ё", "е")
                nouns[form] = nouns.get(form, 0.0) + parse.score
        likely = [form for form, score in nouns.items() if score >= self._min_score]
        return frozenset([word, *likely]) if likely else frozenset(self.lemmas(word))

    def _is_known(self, word: str) -> bool:
        if len(word) > _MAX_WORD:
            return False
        with self._lock:
            return bool(self._morph.word_is_known(word))


class Target(NamedTuple):
    """What an alias resolves to: placeholder, kind, slot value, registry ref, source."""

    placeholder: str
    kind: str
    value: str
    ref: str | None
    source: str


class Hit(NamedTuple):
    """An alias match over tokens ``start:end``; more than one target means an ambiguity."""

    start: int
    end: int
    targets: tuple[Target, ...]
    match_type: str
    confidence: float


class _Alias(NamedTuple):
    surface: tuple[str, ...]
    forms: tuple[frozenset[str], ...]
    target: Target


class EntityIndex:
    """Alias index over lemma sequences, built once; ``find`` is pure and thread-safe."""

    def __init__(
        self,
        entries: Iterable[tuple[Target, Sequence[str]]],
        lemmatizer: Lemmatizer,
        matching: Matching,
    ) -> None:
        self._lemmatizer = lemmatizer
        self._cfg = matching
        aliases: list[_Alias] = []
        first: dict[str, list[int]] = {}
        for target, words in entries:
            if not words:
                continue
            forms = tuple(lemmatizer.alias_forms(w) for w in words)
            for form in forms[0]:
                first.setdefault(form, []).append(len(aliases))
            aliases.append(_Alias(tuple(words), forms, target))
        self._aliases = tuple(aliases)
        self._first = {k: tuple(v) for k, v in first.items()}
        self._known = frozenset(f for a in aliases for forms in a.forms for f in forms)
        vocab: dict[str, set[str]] = {}
        for form in self._known:
            if len(form) >= matching.fuzzy_min_len and form.isalpha():
                vocab.setdefault(form[0], set()).add(form)
        self._vocab = {k: tuple(sorted(v)) for k, v in vocab.items()}
        self._fuzzy: Callable[[str], tuple[str, float] | None] = functools.lru_cache(maxsize=8192)(
            self._fuzzy_uncached
        )
        _LOGGER.debug("entity index: %d aliases, %d forms", len(self._aliases), len(self._known))

    def find(self, words: Sequence[str], lems: Sequence[Lemmas], blocked: Sequence[bool]) -> list[Hit]:
        """Every alias match not touching a blocked token; one ``Hit`` per span with its best targets."""
        n = len(words)
        forms: list[Lemmas] = []
        fuzzy_score: list[float | None] = []
        for word, lem in zip(words, lems, strict=True):
            guess = self._fuzzy(word) if self._known.isdisjoint(lem) else None
            forms.append((*lem, guess[0]) if guess else lem)
            fuzzy_score.append(guess[1] if guess else None)
        best: dict[tuple[int, int], tuple[tuple[int, float], list[Target]]] = {}
        for i in range(n):
            if blocked[i]:
                continue
            seen: set[int] = set()
            for form in forms[i]:
                seen.update(self._first.get(form, ()))
            for alias_id in sorted(seen):
                alias = self._aliases[alias_id]
                quality = self._quality(
                    alias, i, words=words, lems=lems, forms=forms, fuzzy_score=fuzzy_score, blocked=blocked
                )
                if quality is None:
                    continue
                end = i + len(alias.forms)
                current = best.get((i, end))
                if current is None or quality < current[0]:
                    best[(i, end)] = (quality, [alias.target])
                elif quality == current[0] and alias.target not in current[1]:
                    current[1].append(alias.target)
        hits = []
        for (start, end), ((rank, neg_conf), targets) in best.items():
            match_type = (EXACT, LEMMA, FUZZY)[rank]
            hits.append(Hit(start, end, tuple(targets), match_type, -neg_conf))
        return hits

    def _quality(
        self,
        alias: _Alias,
        start: int,
        *,
        words: Sequence[str],
        lems: Sequence[Lemmas],
        forms: Sequence[Lemmas],
        fuzzy_score: Sequence[float | None],
        blocked: Sequence[bool],
    ) -> tuple[int, float] | None:
        """(rank, -confidence) of an alias at ``start``; rank 0 exact, 1 lemma, 2 fuzzy."""
        if start + len(alias.forms) > len(words):
            return None
        rank, score = 0, 100.0
        for offset, accepted in enumerate(alias.forms):
            k = start + offset
            if blocked[k] or accepted.isdisjoint(forms[k]):
                return None
            if words[k] != alias.surface[offset]:
                if accepted.isdisjoint(lems[k]):
                    rank, score = 2, min(score, fuzzy_score[k] or 0.0)
                else:
                    rank = max(rank, 1)
        if rank == 2:
            return 2, -(score / 100.0 * self._cfg.fuzzy_max_confidence)
        return rank, -(1.0 if rank == 0 else self._cfg.lemma_confidence)

    def _fuzzy_uncached(self, word: str) -> tuple[str, float] | None:
        """The closest alias word (same first letter, length within 2) above the cutoff."""
        if len(word) < self._cfg.fuzzy_min_len or len(word) > _MAX_WORD or not word.isalpha():
            return None
        if _CYRILLIC.search(word) and self._lemmatizer.is_known(word):
            return None  # a real Russian word: its lemma is trusted, a near-miss is another word
        pool = [v for v in self._vocab.get(word[0], ()) if abs(len(v) - len(word)) <= 2]
        if not pool:
            return None
        best: tuple[str, float] | None = None
        for probe in dict.fromkeys(self._lemmatizer.lemmas(word)[:2]):  # the typo, its guessed lemma
            found = process.extractOne(probe, pool, scorer=fuzz.ratio, score_cutoff=self._cfg.fuzzy_cutoff)
            if found and (best is None or found[1] > best[1]):
                best = (found[0], float(found[1]))
        return best
