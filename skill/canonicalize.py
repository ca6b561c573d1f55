"""Entity canonicalization: registry names and values become placeholders, refs become slots."""

from __future__ import annotations

from typing import Any

import msgspec

from .catalog import Catalog


class EntityMatch(msgspec.Struct, frozen=True):
    """One span of the input resolved to a placeholder."""

    placeholder: str  # "device", "scenario", "time", "duration", ...
    kind: str  # "device.light", "scenario", "time", ...
    text: str  # the surface text that matched
    start: int  # offsets into Canonical.normalized
    end: int
    value: str  # normalized value ("07:30", "PT10M", "Berlin") or the canonical ref
    ref: str | None = None  # canonical ref for registry entities ("device:light:kitchen_ceiling")
    source: str = "registry"  # "hub" | "registry" | "value"
    match_type: str = "exact"  # "exact" | "lemma" | "fuzzy" | "hub" | "parsed"
    confidence: float = 1.0


class Ambiguity(msgspec.Struct, frozen=True):
    """A span that matches several registry entities equally well."""

    text: str
    candidates: tuple[str, ...]


class Canonical(msgspec.Struct, frozen=True):
    """The input after canonicalization; what every later stage sees."""

    text: str  # raw input
    normalized: str  # lower-cased, ё→е, punctuation folded, whitespace collapsed
    masked: str  # normalized with spans replaced by "{placeholder}"
    locale: str
    entities: tuple[EntityMatch, ...] = ()
    ambiguities: tuple[Ambiguity, ...] = ()
    unresolved: tuple[str, ...] = ()


def detect_locale(text: str) -> str:
    """Cyrillic letters win → "ru"; otherwise "en"."""
    cyr = sum(1 for ch in text if "\u0400" <= ch <= "\u04ff")
    lat = sum(1 for ch in text if ch.isascii() and ch.isalpha())
    return "ru" if cyr > 0 and cyr >= lat / 2 else "en"


class Canonicalizer:
    """Built once from the catalog; ``canonicalize`` is pure and thread-safe. (Placeholder: to be replaced.)"""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def rules(self) -> dict[str, Any]:
        """The masking rules as plain data (stored with a model as ``masking_rules.json``)."""
        return dict(self.catalog.masking)

    def canonicalize(
        self, text: str, locale: str | None = None, hub_entities: dict[str, Any] | None = None
    ) -> Canonical:
        """Normalize ``text`` and mask entities and values."""
        norm = " ".join(text.lower().replace("ё", "е").split())
        return Canonical(text=text, normalized=norm, masked=norm, locale=locale or detect_locale(text))
