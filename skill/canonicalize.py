"""Entity canonicalization: registry names and values become placeholders, refs become slots."""

# Order: hub entities are masked first; then time / date / duration / registry / city candidates compete
# (longest span wins; on equal length time > date > duration > registry); bare numbers fill what is left.
#
# The hub's entities (``entities`` of /parse: AdaOS's resolver output), in this precedence:
#   1. a resolved entity's ``text`` (or its ``start``/``end`` in the raw text), located in the words;
#   2. for one without a usable span: the registry aliases of its ``canonical_ref`` in the text;
#   3. then a same-placeholder ``{slot}`` of the hub's canonicalized text, aligned word by word with the
#      service's normalization. That text is ``canonicalized_text`` if it carries placeholders, else
#      ``normalized_text``; it counts only when every placeholder in it is one the service knows;
#   4. else the entity stays a slot without a span (``match_type: hub_unlocated``, offsets -1), masks
#      nothing, and fills its slot only if no located entity of its placeholder does.
# A hub-text placeholder no entity took masks its words only where the service's own matchers find
# nothing. Ambiguity candidates are kept as the hub sent them (objects stay objects).

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from .catalog import LOCALES, Catalog, CatalogError
from .entities import EntityIndex, Hit, Lemmatizer, Target
from .values import Lemmas, MaskingRules, ValueParser, ValueSpan, tokenize

_LOGGER = logging.getLogger(__name__)

_CYRILLIC = re.compile("[\u0400-\u04ff]")
_LATIN = re.compile("[A-Za-z]")

REGISTRY_PLACEHOLDERS = ("device", "room", "scenario", "app", "modal", "webspace", "skill")
VALUE_PLACEHOLDERS = ("time", "date", "duration", "number", "city", "temperature", "color", "genre")
_PRIORITY = {"time": 0, "date": 1, "duration": 2}  # anything else (registry, city): 3


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
    """A span that matches several entities equally well.

    ``candidates``: canonical refs when the service's own registry found the ambiguity; the hub's
    candidates exactly as it sent them (objects stay objects) when the hub did.
    """

    text: str
    candidates: tuple[Any, ...]


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
    cyr = len(_CYRILLIC.findall(text))
    lat = len(_LATIN.findall(text))
    return "ru" if cyr > 0 and cyr >= lat / 2 else "en"


def placeholder_for(kind: str) -> str:
    """Registry kind → placeholder: ``device.*`` → ``device``, others by their first segment."""
    return kind.split(".", 1)[0]


def load_rules(catalog: Catalog) -> MaskingRules:
    """``catalog.masking`` checked against the schema; unknown keys raise :class:`CatalogError`."""
    try:
        return msgspec.convert(catalog.masking or {}, MaskingRules)
    except msgspec.ValidationError as exc:
        text = str(exc)
        key = text.rsplit("at `", 1)[-1].rstrip("`") if "at `" in text else "$"
        raise CatalogError(Path(catalog.root) / "masking.yaml", key, text) from exc


class _Span(NamedTuple):
    start: int  # token indices
    end: int
    priority: int
    placeholder: str
    kind: str
    value: str
    ref: str | None
    source: str
    match_type: str
    confidence: float
    candidates: tuple[str, ...] = ()


class Canonicalizer:
    """Built once from the catalog; ``canonicalize`` is pure and thread-safe."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._rules = load_rules(catalog)
        cfg = self._rules.matching
        self._lemmatizer = Lemmatizer(cfg.lemma_min_score)
        self._values = ValueParser(self._rules, self._lemmatizer.lemmas, self._lemmatizer.is_known)
        entries: list[tuple[Target, Sequence[str]]] = []
        for kind, items in catalog.entities.items():
            for entity in items:
                target = Target(placeholder_for(kind), kind, entity.ref, entity.ref, "registry")
                entries.extend((target, tokenize(a)) for names in entity.aliases.values() for a in names)
        for city in self._rules.cities:
            target = Target("city", "city", city.name, None, "value")
            entries.extend((target, tokenize(a)) for names in city.aliases.values() for a in names)
        self._index = EntityIndex(entries, self._lemmatizer, cfg)
        self._kind_nouns = {
            " ".join(tokenize(word)): placeholder
            for placeholder, words in self._rules.kind_nouns.items()
            for word in words
        }
        self._weak = frozenset(" ".join(tokenize(w)) for w in cfg.weak_aliases)
        self._cued = frozenset(" ".join(tokenize(w)) for w in cfg.cued_aliases)
        self._cues = frozenset(" ".join(tokenize(w)) for w in cfg.cue_words)

    def rules(self) -> dict[str, Any]:
        """The masking rules as plain data (stored with a model as ``masking_rules.json``)."""
        rules: dict[str, Any] = msgspec.to_builtins(self._rules)
        return rules

    @property
    def lemmatizer(self) -> Lemmatizer:
        """The shared, cached lemmatizer (the tagger's span resolver uses it too)."""
        return self._lemmatizer

    def canonicalize(
        self, text: str, locale: str | None = None, hub_entities: dict[str, Any] | None = None
    ) -> Canonical:
        """Normalize ``text`` and mask entities and values; never raises on a ``str``."""
        if not isinstance(text, str):
            text = "" if text is None else str(text)
        lang = (locale or "").replace("_", "-").split("-", 1)[0].lower() if isinstance(locale, str) else ""
        lang = lang if lang in LOCALES else detect_locale(text)
        try:
            return self._canonicalize(text, lang, hub_entities)
        except Exception:  # a bug here must not take the request down: degrade to unmasked text
            _LOGGER.exception("canonicalization failed; passing the text through unmasked")
            norm = " ".join(tokenize(text))
            return Canonical(text=text, normalized=norm, masked=norm, locale=lang)

    def _canonicalize(self, text: str, lang: str, hub: Any) -> Canonical:
        words = tokenize(text)
        lems: list[Lemmas] = [self._lemmatizer.lemmas(w) for w in words]
        taken = [False] * len(words)
        ambiguities: list[Ambiguity] = []
        unresolved: list[str] = []
        chosen: list[_Span] = []
        hub_text: list[_Span] = []  # placeholders of the hub's canonicalized text that no hub entity filled
        unlocated: list[EntityMatch] = []  # hub entities kept as slots without a span
        if hub is not None:
            chosen = self._hub(
                hub,
                text,
                words,
                lems,
                taken=taken,
                ambiguities=ambiguities,
                unresolved=unresolved,
                hub_text=hub_text,
                unlocated=unlocated,
            )
        n_hub = len(chosen)

        candidates = [self._from_value(v) for v in self._values.find(words, lems)]
        candidates += [
            span
            for span in map(self._from_hit, self._index.find(words, lems, taken))
            if not self._lacks_cue(span, words, lems)
        ]
        candidates.sort(key=lambda s: (s.start - s.end, s.priority, s.start, -s.confidence))
        for span in candidates:
            if not any(taken[span.start : span.end]):
                taken[span.start : span.end] = [True] * (span.end - span.start)
                chosen.append(span)
        weak = [s for s in chosen[n_hub:] if s.source == "registry" and self._is_weak(s, words, lems)]
        if weak and len(chosen) > len(weak):  # "погода в Москве": the topic word is no app here
            for span in weak:
                chosen.remove(span)
                taken[span.start : span.end] = [False] * (span.end - span.start)
        chosen += [self._from_value(v) for v in self._values.numbers(words, lems, [not t for t in taken])]
        for span in hub_text:  # the service found nothing there: the hub's placeholder stands
            if not any(taken[span.start : span.end]):
                taken[span.start : span.end] = [True] * (span.end - span.start)
                chosen.append(span)

        found = {s.placeholder for s in chosen}
        for i, lem in enumerate(lems):
            if taken[i]:
                continue
            noun = self._kind_nouns.get(lem[0]) or (self._kind_nouns.get(lem[1]) if len(lem) > 1 else None)
            if noun and noun not in found and words[i] not in unresolved:
                unresolved.append(words[i])
        canonical = self._assemble(
            text, lang, words, chosen=chosen, ambiguities=ambiguities, unresolved=unresolved
        )
        if unlocated:
            canonical = msgspec.structs.replace(canonical, entities=canonical.entities + tuple(unlocated))
        return canonical

    def _lacks_cue(self, span: _Span, words: Sequence[str], lems: Sequence[Lemmas]) -> bool:
        """A one-word alias that is an everyday word too ("вечером", "at work") with no cue near it.

        A cue (``cue_words``: "запусти", "сценарий", "mode"...) counts within the two words before
        the alias or right after it: "переключи на утро", "режим кино", "evening scenario".
        """
        if not self._cued or span.source != "registry" or span.end - span.start != 1:
            return False
        if words[span.start] not in self._cued and self._cued.isdisjoint(lems[span.start][:2]):
            return False
        near = [*range(max(0, span.start - 2), span.start), *range(span.end, min(len(words), span.end + 1))]
        return not any(words[k] in self._cues or not self._cues.isdisjoint(lems[k][:2]) for k in near)

    def _is_weak(self, span: _Span, words: Sequence[str], lems: Sequence[Lemmas]) -> bool:
        if " ".join(words[span.start : span.end]) in self._weak:
            return True
        return span.end - span.start == 1 and not self._weak.isdisjoint(lems[span.start][:2])

    @staticmethod
    def _from_value(v: ValueSpan) -> _Span:
        return _Span(
            v.start,
            v.end,
            _PRIORITY.get(v.placeholder, 3),
            v.placeholder,
            v.kind or v.placeholder,
            v.value,
            None,
            "value",
            "parsed",
            v.confidence,
        )

    def _from_hit(self, hit: Hit) -> _Span:
        targets = sorted(hit.targets, key=lambda t: (t.ref or t.value, t.kind))
        top = targets[0]
        refs = tuple(dict.fromkeys(t.ref or t.value for t in targets))
        conf = hit.confidence * (self._rules.matching.ambiguity_penalty if len(refs) > 1 else 1.0)
        return _Span(
            hit.start,
            hit.end,
            3,
            top.placeholder,
            top.kind,
            top.value,
            top.ref,
            top.source,
            hit.match_type,
            conf,
            refs if len(refs) > 1 else (),
        )

    def _hub(
        self,
        hub: Any,
        text: str,
        words: Sequence[str],
        lems: Sequence[Lemmas],
        *,
        taken: list[bool],
        ambiguities: list[Ambiguity],
        unresolved: list[str],
        hub_text: list[_Span],
        unlocated: list[EntityMatch],
    ) -> list[_Span]:
        """Spans of the hub resolver's entities (masked first); malformed items are skipped.

        Each entity with a known placeholder is placed by the first of these that works:
        its ``text`` (or ``start``/``end`` in the raw text); the registry aliases of its
        ``canonical_ref``; a same-placeholder slot of the hub's canonicalized text. Otherwise it is
        kept as a slot with no span (``match_type: hub_unlocated``, offsets -1) and masks nothing.
        Placeholders of the hub's canonicalized text that no entity took go to ``hub_text``: they
        mask their span only if the service's own matchers find nothing there.
        """
        if not isinstance(hub, Mapping):
            _LOGGER.debug("hub entities ignored: not a mapping (%s)", type(hub).__name__)
            return []
        spans: list[_Span] = []
        floating: list[_HubEntity] = []
        items = hub.get("resolved_entities")
        for item in items if isinstance(items, (list, tuple)) else ():
            ent = self._hub_item(item, text)
            if ent is None:
                _LOGGER.debug("hub entity ignored: %r", item)
                continue
            where = _locate(tokenize(ent.surface), words, taken, ent.start) if ent.surface else None
            if where is None:
                floating.append(ent)
                continue
            spans.append(ent.span(where, "hub"))
            taken[where[0] : where[1]] = [True] * (where[1] - where[0])
        if floating:
            hits = self._index.find(words, lems, taken)
            rest = []
            for ent in floating:
                where = _alias_span(hits, ent.ref, taken)
                if where is None:
                    rest.append(ent)
                    continue
                spans.append(ent.span(where, "hub_alias"))
                taken[where[0] : where[1]] = [True] * (where[1] - where[0])
            floating = rest
        slots = [slot for slot in _hub_text_slots(hub, words) if not any(taken[slot[1] : slot[2]])]
        placed = {s.ref for s in spans}
        for ent in floating:
            slot = next((x for x in slots if x[0] == ent.placeholder), None)
            if slot is not None:
                slots.remove(slot)
                spans.append(ent.span((slot[1], slot[2]), "hub_text"))
                taken[slot[1] : slot[2]] = [True] * (slot[2] - slot[1])
                placed.add(ent.ref)
            elif ent.ref not in placed:
                placed.add(ent.ref)
                unlocated.append(
                    EntityMatch(
                        placeholder=ent.placeholder,
                        kind=ent.kind,
                        text="",
                        start=-1,
                        end=-1,
                        value=ent.ref,
                        ref=ent.ref,
                        source="hub",
                        match_type="hub_unlocated",
                        confidence=round(ent.confidence, 4),
                    )
                )
        for name, start, end in slots:
            surface = " ".join(words[start:end])
            hub_text.append(_Span(start, end, -1, name, name, surface, None, "hub", "hub_text", 0.5))
        raw_amb = hub.get("ambiguities")
        for amb in raw_amb if isinstance(raw_amb, (list, tuple)) else ():
            cands = amb.get("candidates") if isinstance(amb, Mapping) else None
            label = amb.get("text") if isinstance(amb, Mapping) else None
            if isinstance(label, str) and isinstance(cands, (list, tuple)):
                kept = tuple(_candidate(c) for c in cands if c is not None)
                ambiguities.append(Ambiguity(label, kept))
        raw_unres = hub.get("unresolved_entity_spans")
        for item in raw_unres if isinstance(raw_unres, (list, tuple)) else ():
            value = item.get("text") if isinstance(item, Mapping) else item
            if isinstance(value, str) and value.strip():
                unresolved.append(value)
        return spans

    @staticmethod
    def _hub_item(item: Any, text: str) -> _HubEntity | None:
        """One ``resolved_entities`` item, checked; its surface text when it gives one."""
        if not isinstance(item, Mapping):
            return None
        ref = item.get("canonical_ref")
        if not isinstance(ref, str) or not ref.strip():
            return None
        kind = item.get("kind")
        if not isinstance(kind, str) or not kind:
            kind = ref.rsplit(":", 1)[0].replace(":", ".") if ":" in ref else ""
        placeholder = placeholder_for(kind)
        if placeholder not in REGISTRY_PLACEHOLDERS and placeholder not in VALUE_PLACEHOLDERS:
            return None
        start = item.get("start")
        start = start if isinstance(start, int) and not isinstance(start, bool) else None
        surface = item.get("text")
        if not isinstance(surface, str) or not surface.strip():
            end = item.get("end")
            if start is not None and isinstance(end, int) and 0 <= start < end <= len(text):
                surface = text[start:end]
            else:
                surface = None
        conf = item.get("confidence")
        confidence = 1.0
        if isinstance(conf, (int, float)) and not isinstance(conf, bool) and math.isfinite(conf):
            confidence = min(1.0, max(0.0, float(conf)))
        return _HubEntity(placeholder, kind, ref, confidence, surface, start)

    @staticmethod
    def _assemble(
        text: str,
        lang: str,
        words: Sequence[str],
        *,
        chosen: list[_Span],
        ambiguities: list[Ambiguity],
        unresolved: list[str],
    ) -> Canonical:
        offsets, pos = [], 0
        for word in words:
            offsets.append(pos)
            pos += len(word) + 1
        normalized = " ".join(words)
        pieces: list[str] = []
        matches: list[EntityMatch] = []
        i = 0
        for span in sorted(chosen, key=lambda s: s.start):
            pieces.extend(words[i : span.start])
            pieces.append("{" + span.placeholder + "}")
            start, end = offsets[span.start], offsets[span.end - 1] + len(words[span.end - 1])
            surface = normalized[start:end]
            matches.append(
                EntityMatch(
                    placeholder=span.placeholder,
                    kind=span.kind,
                    text=surface,
                    start=start,
                    end=end,
                    value=span.value,
                    ref=span.ref,
                    source=span.source,
                    match_type=span.match_type,
                    confidence=round(span.confidence, 4),
                )
            )
            if span.candidates:
                ambiguities.append(Ambiguity(surface, span.candidates))
            i = span.end
        pieces.extend(words[i:])
        return Canonical(
            text=text,
            normalized=normalized,
            masked=" ".join(pieces),
            locale=lang,
            entities=tuple(matches),
            ambiguities=tuple(ambiguities),
            unresolved=tuple(unresolved),
        )


class _HubEntity(NamedTuple):
    """A usable item of the hub's ``resolved_entities``."""

    placeholder: str
    kind: str
    ref: str
    confidence: float
    surface: str | None  # the text the hub matched (from ``text`` or its offsets), if it gave one
    start: int | None  # the hub's character offset, a hint for repeated words

    def span(self, where: tuple[int, int], match_type: str) -> _Span:
        return _Span(
            where[0],
            where[1],
            -1,
            self.placeholder,
            self.kind,
            self.ref,
            self.ref,
            "hub",
            match_type,
            self.confidence,
        )


# The hub's canonicalized text: "{device}"-style placeholders among normalized words.
_HUB_PLACEHOLDER = re.compile(r"\{([A-Za-z_]+)\}")
_HUB_TEXT_MAX_WORDS = 128  # longer texts, or more placeholders, are not aligned (bounded work)
_HUB_TEXT_MAX_SLOTS = 8


def _hub_canonical_text(hub: Mapping[str, Any]) -> str | None:
    """The hub's canonicalized text: ``canonicalized_text``, else ``normalized_text``.

    The first of the two that carries any ``{placeholder}`` is the one; it counts only when every
    placeholder in it is one the service knows (an unknown one, ``{person}``, voids it).
    """
    for key in ("canonicalized_text", "normalized_text"):
        raw = hub.get(key)
        if isinstance(raw, str) and _HUB_PLACEHOLDER.search(raw):
            names = [n.lower() for n in _HUB_PLACEHOLDER.findall(raw)]
            known = all(n in REGISTRY_PLACEHOLDERS or n in VALUE_PLACEHOLDERS for n in names)
            return raw if known else None
    return None


def _hub_text_slots(hub: Mapping[str, Any], words: Sequence[str]) -> list[tuple[str, int, int]]:
    """(placeholder, start, end) token spans of the hub's placeholders, aligned with ``words``.

    Literal words must match the service's normalization exactly and each placeholder covers one
    word or more (the shortest reading, left to right); a text that does not align gives nothing.
    """
    raw = _hub_canonical_text(hub)
    if raw is None or len(words) > _HUB_TEXT_MAX_WORDS:
        return []
    pattern: list[str | tuple[str]] = []
    pos = 0
    for m in _HUB_PLACEHOLDER.finditer(raw):
        pattern += tokenize(raw[pos : m.start()])
        pattern.append((m.group(1).lower(),))
        pos = m.end()
    pattern += tokenize(raw[pos:])
    if sum(isinstance(p, tuple) for p in pattern) > _HUB_TEXT_MAX_SLOTS:
        return []
    failed: set[tuple[int, int]] = set()

    def align(i: int, j: int) -> list[tuple[str, int, int]] | None:
        if i == len(pattern):
            return [] if j == len(words) else None
        if (i, j) in failed:
            return None
        p = pattern[i]
        if isinstance(p, str):
            found = align(i + 1, j + 1) if j < len(words) and words[j] == p else None
        else:
            found = None
            for end in range(j + 1, len(words) + 1):
                rest = align(i + 1, end)
                if rest is not None:
                    found = [(p[0], j, end), *rest]
                    break
        if found is None:
            failed.add((i, j))
        return found

    return align(0, 0) or []


def _alias_span(hits: Sequence[Hit], ref: str, taken: Sequence[bool]) -> tuple[int, int] | None:
    """The longest (then first) free registry-alias match whose targets include ``ref``."""
    own = [h for h in hits if any(t.ref == ref for t in h.targets) and not any(taken[h.start : h.end])]
    if not own:
        return None
    best = min(own, key=lambda h: (h.start - h.end, h.start))
    return best.start, best.end


def _candidate(value: Any) -> Any:
    """A hub ambiguity candidate as sent: a string, a number or an object (a plain dict)."""
    return dict(value) if isinstance(value, Mapping) else value


def _locate(
    needle: Sequence[str], words: Sequence[str], taken: Sequence[bool], hint: int | None
) -> tuple[int, int] | None:
    """Token span of ``needle`` in ``words`` (free tokens only), nearest to the character ``hint``."""
    k = len(needle)
    if not k:
        return None
    found: list[tuple[int, int]] = []
    pos = 0
    for i in range(len(words) - k + 1):
        if words[i] == needle[0] and list(words[i : i + k]) == list(needle) and not any(taken[i : i + k]):
            found.append((abs(pos - hint) if hint is not None else 0, i))
        pos += len(words[i]) + 1
    if not found:
        return None
    i = min(found)[1]
    return i, i + k
