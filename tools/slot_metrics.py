"""Span-level slot scoring shared by ``tools.probe`` and ``tools.bench`` (CoNLL style, micro-averaged).

Gold spans are ``{"start", "end", "slot", "value"?}`` over a row's text. A predicted slot is the
decision's slot name with the surface text of the entity (or tagged span) that filled it and its value.
A prediction matches a gold span with the same slot name when the gold span has a ``value`` and the
values agree (after format normalization: weekday names, decimal strings), or else when the
normalized surface texts agree. Each gold span is matched at most once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from skill.values import tokenize

_WEEKDAYS = {
    "monday": "mon",
    "tuesday": "tue",
    "wednesday": "wed",
    "thursday": "thu",
    "friday": "fri",
    "saturday": "sat",
    "sunday": "sun",
}


def norm_text(text: str) -> str:
    """Normalized surface text: the tokenizer's lower case, ё→е, punctuation folded."""
    return " ".join(tokenize(text))


def norm_value(value: Any) -> str:
    """Comparable value: weekday names to their 3-letter token, "19.50" to "19.5"."""
    s = str(value).strip().lower()
    s = _WEEKDAYS.get(s, s)
    try:
        x = float(s)
    except ValueError:
        return s
    return str(int(x)) if x == int(x) else repr(x)


def predicted_spans(
    slots: Mapping[str, Any], evidence: Mapping[str, Any], spec_sources: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Each filled slot with the surface text of what filled it (from ``evidence.entities``).

    A slot holding a list (a ``multiple`` slot) is one predicted span per value.
    """
    entities = evidence.get("entities") or []
    out = []
    used: set[int] = set()
    for name, filled in slots.items():
        source = spec_sources.get(name, name)
        for value in filled if isinstance(filled, list) else [filled]:
            surface = None
            for i, ent in enumerate(entities):
                if i in used or not isinstance(ent, Mapping):
                    continue
                ref = ent.get("ref") or ""
                same = value in (ref, ent.get("value"), ent.get("text")) or (
                    ref and ref.rsplit(":", 1)[-1] == value
                )
                if ent.get("placeholder") == source and same:
                    surface = ent.get("text")
                    used.add(i)
                    break
            if surface is None and isinstance(value, str):
                surface = value  # a slot from a stage's own output (regex group, tagger text)
            out.append({"slot": name, "text": surface or "", "value": value})
    return out


def gold_spans(text: str, spans: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Gold spans with their surface text."""
    return [
        {"slot": s["slot"], "text": text[int(s["start"]) : int(s["end"])], "value": s.get("value")}
        for s in spans
    ]


def match(pred: Sequence[Mapping[str, Any]], gold: Sequence[Mapping[str, Any]]) -> tuple[int, list[bool]]:
    """Number of true positives, and per gold span whether it was found."""
    found = [False] * len(gold)
    tp = 0
    for p in pred:
        for j, g in enumerate(gold):
            if found[j] or g["slot"] != p["slot"]:
                continue
            if g.get("value") is not None:
                ok = norm_value(p.get("value")) == norm_value(g["value"]) or (
                    norm_text(str(p.get("text") or "")) == norm_text(str(g["text"]))
                )
            else:
                ok = norm_text(str(p.get("text") or "")) == norm_text(str(g["text"]))
            if ok:
                found[j] = True
                tp += 1
                break
    return tp, found


class SlotScores:
    """Accumulates span counts; ``report()`` gives precision / recall / F1 overall and per slot."""

    def __init__(self) -> None:
        self.tp: Counter[str] = Counter()
        self.n_pred: Counter[str] = Counter()
        self.n_gold: Counter[str] = Counter()
        self.rows = 0

    def add(self, pred: Sequence[Mapping[str, Any]], gold: Sequence[Mapping[str, Any]]) -> bool:
        """Count one row; returns whether the row's slots are exactly right (every gold, no extra)."""
        self.rows += 1
        _, found = match(pred, gold)
        for g, ok in zip(gold, found, strict=True):
            self.n_gold[g["slot"]] += 1
            self.tp[g["slot"]] += ok
        for p in pred:
            self.n_pred[p["slot"]] += 1
        return all(found) and len(pred) == len(gold)

    @staticmethod
    def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float | None, float | None, float | None]:
        p = tp / n_pred if n_pred else None
        r = tp / n_gold if n_gold else None
        f = 2 * p * r / (p + r) if p and r else (0.0 if p is not None and r is not None else None)
        return p, r, f

    def report(self) -> dict[str, Any]:
        """``slot_precision``, ``slot_recall``, ``slot_f1``, ``slot_f1_by_slot`` (None without spans)."""
        n_gold = sum(self.n_gold.values())
        if not n_gold:
            return {"slot_precision": None, "slot_recall": None, "slot_f1": None, "slot_f1_by_slot": None}
        p, r, f = self._prf(sum(self.tp.values()), sum(self.n_pred.values()), n_gold)
        by = {}
        for slot in sorted(set(self.n_gold) | set(self.n_pred)):
            sp, sr, sf = self._prf(self.tp[slot], self.n_pred[slot], self.n_gold[slot])
            by[slot] = {
                "precision": _r(sp),
                "recall": _r(sr),
                "f1": _r(sf),
                "gold": self.n_gold[slot],
                "predicted": self.n_pred[slot],
            }
        return {"slot_precision": _r(p), "slot_recall": _r(r), "slot_f1": _r(f), "slot_f1_by_slot": by}


def _r(x: float | None) -> float | None:
    return round(x, 4) if x is not None else None
