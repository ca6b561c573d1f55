"""Registry resolution of the tagger's spans: a tagged name the registry can place gets its ref.

Canonicalization has already matched every alias it could (exact, by lemma, one-word fuzzy), so what
reaches the tagger is a name it could not place. Two looser ways remain, both over lemmas and both
limited to the entity kinds the slot accepts:

* **phrase**: the whole span against every alias, word order free (rapidfuzz ``token_sort_ratio``
  over lemma strings): "the lights of the kitchen", «лампу на кухне» when the alias is «свет на кухне»
  does not pass, but «кухонную люстру» does for «люстра на кухне»;
* **room and noun**: the utterance names a registered room and the span shares a lemma with the aliases
  of exactly one device of an accepted kind in that room ("the lamp in the bedroom" → the bedroom's
  bedside lamp), or the span's noun is generic and the room has exactly one device of the kinds the slot
  accepts.

An answer is given only when one entity wins; several candidates stay unresolved (the hub asks), and
the candidates are named so it can offer them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec
from rapidfuzz import fuzz

from .canonicalize import Canonical, EntityMatch
from .catalog import Catalog, Intent, SlotSpec
from .entities import Lemmatizer
from .values import tokenize

PHRASE_CUTOFF = 88.0
PHRASE_CONFIDENCE = 0.85
ROOM_CONFIDENCE = 0.75


class _Known(NamedTuple):
    ref: str
    kind: str  # registry kind: "device.light", "room", "scenario"
    room: str | None
    phrases: tuple[str, ...]  # aliases as sorted lemma strings
    lemmas: frozenset[str]


class Resolved(NamedTuple):
    """A tagged span placed in the registry (``ref``) or the entities it could be (``candidates``)."""

    ref: str | None
    kind: str | None
    match_type: str
    confidence: float
    candidates: tuple[str, ...] = ()


class SpanResolver:
    """Built once per catalog; :meth:`resolve` is pure."""

    def __init__(self, catalog: Catalog, lemmatizer: Lemmatizer) -> None:
        self._lemma = lemmatizer
        known: list[_Known] = []
        for kind, items in catalog.entities.items():
            for entity in items:
                aliases = [a for names in entity.aliases.values() for a in names]
                lemmas_of = [self._lemmas(a) for a in aliases]
                known.append(
                    _Known(
                        ref=entity.ref,
                        kind=kind,
                        room=entity.room,
                        phrases=tuple(" ".join(sorted(ls)) for ls in lemmas_of if ls),
                        lemmas=frozenset(x for ls in lemmas_of for x in ls),
                    )
                )
        self._known = tuple(known)
        self._by_ref = {k.ref: k for k in known}
        self._room_lemmas = frozenset(x for k in known if k.kind == "room" for x in k.lemmas)
        # Words that say nothing about which entity ("the device", «устройство»): generic nouns.
        masking = catalog.masking or {}
        nouns = masking.get("kind_nouns") or {}
        self._generic = frozenset(lem for words in nouns.values() for w in words for lem in self._lemmas(w))
        self._kind_of: dict[str, set[str]] = {}
        for kind, words in (masking.get("kind_words") or {}).items():
            for w in words:
                for lem in self._lemmas(w):
                    self._kind_of.setdefault(lem, set()).add(kind)

    def reconcile(self, canonical: Canonical) -> Canonical:
        """A device alias that names no room ("шторы", "curtains") but belongs to another room than the one
        the user names ("open the curtains in the bedroom") is swapped for the one device of that kind in
        the named room; with none or several there, it stays as it is."""
        rooms = {e.ref.split(":", 1)[-1] for e in canonical.entities if e.placeholder == "room" and e.ref}
        if len(rooms) != 1:
            return canonical
        (room,) = rooms
        entities = list(canonical.entities)
        for i, e in enumerate(entities):
            known = self._by_ref.get(e.ref or "")
            if e.placeholder != "device" or known is None or known.room in (None, room):
                continue
            if set(self._lemmas(e.text)) & self._room_lemmas:
                continue  # the alias names its own room («шторы в гостиной»): the user said both
            same = [k for k in self._known if k.kind == known.kind and k.room == room]
            if len(same) == 1:
                entities[i] = msgspec.structs.replace(
                    e, ref=same[0].ref, value=same[0].ref, confidence=round(e.confidence * 0.9, 4)
                )
        return msgspec.structs.replace(canonical, entities=tuple(entities))

    def place(
        self, intent: Intent, spans: Iterable[Mapping[str, Any]], entities: Sequence[EntityMatch]
    ) -> list[tuple[EntityMatch, tuple[str, ...]]]:
        """The tagger's spans for ``intent`` as entities (placed in the registry where they can be),
        each with the registry entities it could be when it is ambiguous."""
        rooms = [e.ref for e in entities if e.placeholder == "room" and e.ref]
        out: list[tuple[EntityMatch, tuple[str, ...]]] = []
        for sp in spans:
            spec = intent.slots.get(sp["slot"])
            if spec is None:
                continue
            placed = None if spec.open else self.resolve(sp["text"], spec, sp["slot"], rooms)
            ref = placed.ref if placed is not None else None
            entity = EntityMatch(
                placeholder=spec.source or sp["slot"],
                kind=placed.kind if placed is not None and placed.kind else sp["slot"],
                text=sp["text"],
                start=sp["start"],
                end=sp["end"],
                value=ref or sp["text"],
                ref=ref,
                source="tagger",
                match_type=placed.match_type if placed is not None and ref else "tagged",
                confidence=round(min(sp["confidence"], placed.confidence), 4)
                if placed is not None and ref
                else sp["confidence"],
            )
            out.append((entity, placed.candidates if placed is not None else ()))
        return out

    def _lemmas(self, text: str) -> list[str]:
        out = []
        for word in tokenize(text):
            lems = self._lemma.lemmas(word)
            out.append(lems[1] if len(lems) > 1 else lems[0])
        return out

    @staticmethod
    def _accepts(spec: SlotSpec, placeholder: str, kind: str) -> bool:
        if spec.kinds:
            return kind in {f"{placeholder}.{k}" for k in spec.kinds} or kind in spec.kinds
        return kind == placeholder or kind.startswith(placeholder + ".")

    def resolve(self, text: str, spec: SlotSpec, slot: str, rooms: Iterable[str] = ()) -> Resolved | None:
        """Place ``text`` (a tagged span for ``slot``) in the registry, or ``None`` when nothing fits.

        ``rooms`` are the room refs the utterance names ("room:bedroom").
        """
        placeholder = spec.source or slot
        pool = [k for k in self._known if self._accepts(spec, placeholder, k.kind)]
        if not pool:
            return None
        lemmas = self._lemmas(text)
        if not lemmas:
            return None
        query = " ".join(sorted(lemmas))
        scored = sorted(
            ((max(fuzz.token_sort_ratio(query, p) for p in k.phrases), k) for k in pool if k.phrases),
            key=lambda sk: -sk[0],
        )
        if scored and scored[0][0] >= PHRASE_CUTOFF:
            top = [k for s, k in scored if s >= scored[0][0] - 1e-9]
            if len(top) == 1:
                return Resolved(top[0].ref, top[0].kind, "tagged_fuzzy", PHRASE_CONFIDENCE)
        room_ids = {r.split(":", 1)[-1] for r in rooms}
        if not room_ids:
            return None
        in_room = [k for k in pool if k.room in room_ids]
        words = set(lemmas)
        for word in words:  # "lamp" is only ever a light: keep the kinds every telling word allows
            kinds = self._kind_of.get(word) or {k.kind for k in pool if word in k.lemmas}
            if kinds:
                in_room = [k for k in in_room if k.kind in kinds]
        if not in_room:
            return None
        specific = words - self._generic
        sharing = [k for k in in_room if specific & k.lemmas]
        if len(sharing) == 1:
            return Resolved(sharing[0].ref, sharing[0].kind, "tagged_room", ROOM_CONFIDENCE)
        if len(in_room) == 1:
            return Resolved(in_room[0].ref, in_room[0].kind, "tagged_room", ROOM_CONFIDENCE)
        candidates = tuple(k.ref for k in (sharing or in_room))
        return Resolved(None, None, "unresolved", 0.0, candidates) if len(candidates) > 1 else None
