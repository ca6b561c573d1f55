"""Multi-intent segmentation: where one utterance may hold several requests, and which split to take.

Split points are conjunctions and sequencers («и», «а ещё», «потом», "and", "then", "also") and
punctuation (commas, full stops), found on the raw text so that every part keeps its character offsets.
Which split is taken is decided by :func:`joint_confidence` over the parts' gated decisions: a split is
taken only when it raises the confidence the whole utterance had on its own.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from ..decision import Outcome
from ..values import tokenize
from .lexicon import Lexicon, lexicon

# Words (numbers with their separators stay one token: "7:30", "2,5"), and the marks that may end a request.
_TOKEN = re.compile(r"[0-9]+(?:[:.,/][0-9]+)*|[^\W_]+(?:['’][^\W_]+)*|[,;.!?…]+|[—–]|(?<=\s)-(?=\s)")
_CUT_MARKS = frozenset(",;.!?…—–-")
_STRIP = " \t\r\n,;:—–-"
_MAX_PHRASE = 4  # words in the longest connector


class Part(NamedTuple):
    """A candidate request: its text and its [start, end) offsets into the utterance."""

    text: str
    start: int
    end: int


class Cut(NamedTuple):
    """What lies between two parts: [start, end) of the punctuation and connector words."""

    start: int
    end: int


class _Tok(NamedTuple):
    text: str  # normalized (lower case, ё → е)
    start: int
    end: int
    word: bool


def _tokens(text: str) -> list[_Tok]:
    out = []
    for m in _TOKEN.finditer(text):
        tok = m.group()
        out.append(_Tok(tok.lower().replace("ё", "е"), m.start(), m.end(), tok[0].isalnum()))
    return out


def _phrase_end(toks: Sequence[_Tok], i: int, phrases: frozenset[str]) -> int | None:
    """Exclusive index after the longest phrase of ``phrases`` starting at token ``i``, or None."""
    best = None
    words: list[str] = []
    for j in range(i, min(len(toks), i + _MAX_PHRASE)):
        if not toks[j].word:
            break
        words.append(toks[j].text)
        if " ".join(words) in phrases:
            best = j + 1
    return best


def find_cuts(text: str, locale: str, limit: int = 4) -> list[Cut]:
    """Candidate split points in ``text``, left to right, at most ``limit``.

    A cut needs a word on both sides; a comma inside a number ("2,5") is no cut.
    """
    lex = lexicon(locale)
    toks = _tokens(text)
    cuts: list[Cut] = []
    i = 0
    while i < len(toks) and len(cuts) < limit:
        tok = toks[i]
        end: int | None = None
        if not tok.word and _CUT_MARKS.intersection(tok.text):
            j = i + 1
            while j < len(toks) and not toks[j].word:
                j += 1
            end = _phrase_end(toks, j, lex.connectors | lex.after_punctuation) or j
        elif tok.word:
            end = _phrase_end(toks, i, lex.connectors)
        if end is None:
            i += 1
            continue
        before = any(t.word for t in toks[:i])
        after = any(t.word for t in toks[end:])
        if before and after:
            cuts.append(Cut(tok.start, toks[end - 1].end))
        i = end
    return cuts


def _part(text: str, start: int, end: int) -> Part | None:
    chunk = text[start:end]
    left = len(chunk) - len(chunk.lstrip(_STRIP))
    body = chunk.strip(_STRIP)
    if not body:
        return None
    return Part(body, start + left, start + left + len(body))


def is_filler(text: str, lex: Lexicon) -> bool:
    """A part made only of fillers ("пожалуйста", "hey") is no request of its own."""
    words = tokenize(text)
    i = 0
    while i < len(words):
        for n in range(min(_MAX_PHRASE, len(words) - i), 0, -1):
            if " ".join(words[i : i + n]) in lex.fillers:
                i += n
                break
        else:
            return False
    return True


def split_at(text: str, cuts: Sequence[Cut]) -> tuple[Part, ...] | None:
    """The parts between ``cuts`` (sorted), or None when one of them would be empty."""
    parts = []
    pos = 0
    for cut in [*cuts, Cut(len(text), len(text))]:
        part = _part(text, pos, cut.start)
        if part is None:
            return None
        parts.append(part)
        pos = cut.end
    return tuple(parts)


def plans(text: str, cuts: Sequence[Cut], locale: str) -> Iterator[tuple[Part, ...]]:
    """Every split over a non-empty subset of ``cuts``, fewer parts first; none with a filler-only part."""
    lex = lexicon(locale)
    for size in range(1, len(cuts) + 1):
        for subset in itertools.combinations(cuts, size):
            parts = split_at(text, subset)
            if parts is not None and not any(is_filler(p.text, lex) for p in parts):
                yield parts


def joint_confidence(
    parts: Sequence[tuple[Outcome, float]], whole: tuple[Outcome, float], reject: float
) -> float | None:
    """The confidence of a split, or None when it must not be taken.

    ``parts`` and ``whole`` are (gated outcome, confidence of the best candidate). A split needs at
    least one accepted part; a part that is not accepted must still look like a request (an abstention
    at or above the reject threshold, not a rejection); when the whole was accepted on its own, every
    part must be accepted. The joint confidence is the weakest part's, and it must be higher than the
    whole's: a split never lowers the floor of what the service is sure about.
    """
    if len(parts) < 2 or not any(o is Outcome.ACCEPT for o, _ in parts):
        return None
    whole_accepted = whole[0] is Outcome.ACCEPT
    for outcome, conf in parts:
        if outcome is Outcome.ACCEPT:
            continue
        if whole_accepted or outcome is not Outcome.ABSTAIN or conf < reject:
            return None
    joint = min(conf for _, conf in parts)
    return joint if joint > whole[1] else None
