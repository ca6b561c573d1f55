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
    """The model's tokens of ``canonical.masked`` mapped back to normalized tokens (None if they differ)."""
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
            ent_at[first] = (last + 1, e.placeholder)
    tokens: list[str] = []
    ranges: list[tuple[int, int]] = []
    ph: list[bool] = []
    i = 0
    while i < len(norm):
        if i in ent_at:
            end, name = ent_at[i]
            tokens.append("{" + name + "}")
            ranges.append((i, end))
            ph.append(True)
            i = end
            continue
        for piece in pattern.findall(norm[i].lower()):
            tokens.append(piece)
            ranges.append((i, i + 1))
            ph.append(False)
        i += 1
    if pattern.findall(canonical.masked.lower()) != tokens:
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
) -> list[int]:
    """Label ids per model token: the tagged slots of unmasked words; placeholders stay ``O``."""
    index = {t: i for i, t in enumerate(tags)}
    norm_label: dict[int, str] = {}
    for start, end, slot in spans:
        if f"B-{slot}" not in index:
            continue
        rng = span_token_range(canonical.text, start, end)
        if rng is None:
            continue
        for j in range(rng[0], rng[1]):
            norm_label[j] = ("B-" if j == rng[0] else "I-") + slot
    out: list[int] = []
    prev_slot: str | None = None
    prev_range: tuple[int, int] | None = None
    for (a, b), is_ph in zip(tmap.ranges, tmap.placeholder, strict=True):
        label = norm_label.get(a, O_TAG)
        if is_ph:
            # A placeholder inside an open span ("play {number} luftballons") belongs to the span;
            # any other placeholder is canonicalization's and stays O.
            inside = all(norm_label.get(j, O_TAG) != O_TAG for j in range(a, b))
            label = label if inside and label != O_TAG else O_TAG
        if label.startswith("I-") and prev_range == (a, b):
            pass  # a normalized token cut into several model tokens ("7:30" unmasked): keep I-
        if label != O_TAG and prev_range == (a, b) and prev_slot == label[2:]:
            label = "I-" + label[2:]
        out.append(index.get(label, 0))
        prev_slot = label[2:] if label != O_TAG else None
        prev_range = (a, b)
    return out


def decode(
    probs: np.ndarray,
    tags: Sequence[str],
    tmap: TokenMap,
    canonical: Canonical,
    allowed: set[str] | None,
    min_confidence: float = 0.5,
) -> list[TaggedSpan]:
    """Constrained greedy BIO decode: only ``allowed`` slots, no I- without its B-, spans on words.

    ``probs`` is [tokens, tags]. A span's confidence is the mean probability of its labels; spans
    below ``min_confidence`` are dropped. Surface text and offsets come from the raw text.
    """
    n = min(len(tmap.tokens), probs.shape[0])
    keep = np.array(
        [t == O_TAG or (allowed is None or t[2:] in allowed) for t in tags], dtype=bool
    )
    spans: list[tuple[str, int, int, list[float]]] = []  # slot, first norm token, end, probs
    for i in range(n):
        row = np.where(keep, probs[i], -1.0)
        k = int(row.argmax())
        label = tags[k]
        if label == O_TAG or tmap.placeholder[i] and not spans:
            if label == O_TAG:
                continue
        a, b = tmap.ranges[i]
        slot = label[2:]
        cont = (
            spans
            and spans[-1][0] == slot
            and spans[-1][2] >= a
            and (label.startswith("I-") or spans[-1][2] == b)
        )
        if cont:
            s, first, _, ps = spans[-1]
            spans[-1] = (s, first, max(b, spans[-1][2]), [*ps, float(probs[i, k])])
        else:
            spans.append((slot, a, b, [float(probs[i, k])]))
    offs = token_offsets(canonical.text)
    out = []
    for slot, first, end, ps in spans:
        conf = float(np.mean(ps))
        if conf < min_confidence or first >= len(offs) or end > len(offs):
            continue
        start, stop = offs[first][1], offs[end - 1][2]
        out.append(TaggedSpan(slot, canonical.text[start:stop], start, stop, round(conf, 4)))
    return out
