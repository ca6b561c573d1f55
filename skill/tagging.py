"""Slot tagging: BIO labels over the model's tokens of the masked text, shared by training and serving.

The ranker's network has a tagging head over the BiLSTM's per-word states. It labels the words that
canonicalization left unmasked: names no registry lists ("turn on the *ceiling fan*"), songs, a
reminder's text. Placeholders stay what canonicalization made them: registry names and parsed values
keep their refs and win.

Alignment: the masked text is the normalized tokens (``skill.values.tokenize``) with each entity's
tokens folded into one ``{placeholder}``; the model cuts that text again with its token pattern. A
gold span (character offsets into the raw text) covers the normalized tokens it contains, and each
model token inherits the label of the normalized token it came from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec
import numpy as np

from .canonicalize import Canonical
from .features import model_text, placeholder_token
from .values import token_offsets

O_TAG = "O"
# Slots whose values a parser normalizes ("07:30", "PT10M", "50"): the tagger does not label them.
VALUE_SLOTS = frozenset({"time", "date", "duration", "number", "level", "temperature"})


class TaggedSpan(msgspec.Struct, frozen=True):
    """A span the tagger labelled: slot, surface text, offsets into the raw text, confidence."""

    slot: str
    text: str
    start: int
    end: int
    confidence: float


class TokenMap(msgspec.Struct, frozen=True):
    """Model tokens of a masked text and, for each, the normalized-token range it stands for."""

    tokens: list[str]
    ranges: list[tuple[int, int]]  # [start, end) over normalized tokens
    placeholder: list[bool]


def tag_names(slots: Sequence[str]) -> list[str]:
    """``O`` then ``B-x``, ``I-x`` for each slot (sorted, so the order is deterministic)."""
    out = [O_TAG]
    for s in sorted(set(slots)):
        out += [f"B-{s}", f"I-{s}"]
    return out


def token_map(canonical: Canonical, pattern: re.Pattern[str], max_words: int) -> TokenMap | None:
    """The model's tokens of :func:`model_text` mapped back to normalized tokens (None if they differ)."""
    norm = canonical.normalized.split(" ") if canonical.normalized else []
    starts: list[int] = []
    pos = 0
    for tok in norm:
        starts.append(pos)
        pos += len(tok) + 1
    ent_at: dict[int, tuple[int, str]] = {}
    for e in canonical.entities:
        first = next((i for i, s in enumerate(starts) if s >= e.start), None)
        last = next((i for i in range(len(starts) - 1, -1, -1) if starts[i] < e.end), None)
        if first is not None and last is not None and last >= first:
            ent_at[first] = (last + 1, placeholder_token(e.placeholder, e.kind, e.ref))
    tokens: list[str] = []
    ranges: list[tuple[int, int]] = []
    ph: list[bool] = []
    i = 0
    while i < len(norm):
        if i in ent_at:
            end, name = ent_at[i]
            tokens.append(name)
            ranges.append((i, end))
            ph.append(True)
            i = end
            continue
        for piece in pattern.findall(norm[i].lower()):
            tokens.append(piece)
            ranges.append((i, i + 1))
            ph.append(False)
        i += 1
    if pattern.findall(model_text(canonical).lower()) != tokens:
        return None
    return TokenMap(tokens[:max_words], ranges[:max_words], ph[:max_words])


def span_token_range(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Normalized-token range [first, last+1) covered by characters ``start:end`` of ``text``."""
    offs = token_offsets(text)
    inside = [i for i, (_, s, e) in enumerate(offs) if s >= start and e <= end]
    return (inside[0], inside[-1] + 1) if inside else None


def bio_labels(
    canonical: Canonical,
    spans: Sequence[tuple[int, int, str]],
    tags: Sequence[str],
    tmap: TokenMap,
    raw: bool = False,
) -> list[int]:
    """Label ids per model token: the tagged slots of unmasked words; placeholders stay ``O``.

    ``raw``: the row's intent is no catalog intent (bench data), so no slot of it is canonicalization's:
    a placeholder inside a span takes the span's label too.
    """
    index = {t: i for i, t in enumerate(tags)}
    norm_label: dict[int, str] = {}
    norm_span: dict[int, tuple[int, int]] = {}
    for start, end, slot in spans:
        if f"B-{slot}" not in index:
            continue
        rng = span_token_range(canonical.text, start, end)
        if rng is None:
            continue
        for j in range(rng[0], rng[1]):
            norm_label[j] = ("B-" if j == rng[0] else "I-") + slot
            norm_span[j] = rng
    out: list[int] = []
    prev_slot: str | None = None
    prev_range: tuple[int, int] | None = None
    for (a, b), is_ph in zip(tmap.ranges, tmap.placeholder, strict=True):
        label = norm_label.get(a, O_TAG)
        if is_ph:
            # A placeholder inside an open span ("play {number} luftballons") belongs to the span;
            # any other placeholder is canonicalization's and stays O.
            span = norm_span.get(a)
            inside = span is not None and span[0] <= a and b <= span[1] and (raw or span != (a, b))
            label = label if inside and label != O_TAG else O_TAG
        if label.startswith("I-") and prev_range == (a, b):
            pass  # a normalized token cut into several model tokens ("7:30" unmasked): keep I-
        if label != O_TAG and prev_range == (a, b) and prev_slot == label[2:]:
            label = "I-" + label[2:]
        out.append(index.get(label, 0))
        prev_slot = label[2:] if label != O_TAG else None
        prev_range = (a, b)
    return out


def decode(  # noqa: PLR0917 - arrays and maps of one utterance, positionally as the ranker holds them
    probs: np.ndarray,
    tags: Sequence[str],
    tmap: TokenMap,
    canonical: Canonical,
    allowed: set[str] | None,
    min_confidence: float = 0.5,
    placeholders: bool = False,
) -> list[TaggedSpan]:
    """Constrained decode: only ``allowed`` slots; a word is in a span when the allowed slots' mass beats
    ``min_confidence`` against O (1/2 by default; ``tools.train`` fits it on val).

    ``probs`` is [tokens, tags]. Per word, the slot is the one with the most B + I mass; adjacent
    words of the same slot form one span (one value per slot). A span's confidence is the mean
    P(not O) of its words; spans below ``min_confidence`` are dropped, so are spans that start on
    a placeholder (canonicalization's) unless ``placeholders``. Surface text and offsets come from the
    raw text.
    """
    slots = sorted({t[2:] for t in tags if t != O_TAG and (allowed is None or t[2:] in allowed)})
    if not slots:
        return []
    col = {t: i for i, t in enumerate(tags)}
    n = min(len(tmap.tokens), probs.shape[0])
    # [words, slots]: each allowed slot's B + I mass per word, in one array operation.
    masses = probs[:n, [col[f"B-{s}"] for s in slots]] + probs[:n, [col[f"I-{s}"] for s in slots]]
    p_ins = masses.sum(axis=1).tolist()
    p_os = probs[:n, col[O_TAG]].tolist()
    best = masses.argmax(axis=1).tolist()
    spans: list[tuple[str, int, int, list[float]]] = []  # slot, first norm token, end, P(not O)
    last_end = -1
    for i in range(n):
        p_in = p_ins[i]
        if p_in <= min_confidence * (p_in + p_os[i]):
            continue  # P(a slot | a slot or O) at most the threshold: the word is O
        slot = slots[best[i]]
        a, b = tmap.ranges[i]
        if spans and spans[-1][0] == slot and spans[-1][2] >= a and last_end == i - 1:
            s0, first, end, ps = spans[-1]
            spans[-1] = (s0, first, max(end, b), [*ps, p_in])
        elif placeholders or not tmap.placeholder[i]:
            spans.append((slot, a, b, [p_in]))
        else:
            continue
        last_end = i
    if not spans:
        return []
    offs = token_offsets(canonical.text)
    out = []
    for slot, first, end, ps in spans:
        conf = float(np.mean(ps))
        if conf < min_confidence or first >= len(offs) or end > len(offs):
            continue
        start, stop = offs[first][1], offs[end - 1][2]
        out.append(TaggedSpan(slot, canonical.text[start:stop], start, stop, round(conf, 4)))
    return out
