"""Follow-ups: an elliptical utterance is completed from a frame, then judged by the pipeline like any other.

"а в спальне?" after "выключи свет на кухне" becomes "выключи свет в спальне" (the same kind of device,
in the new room); "make it eight instead" after "set an alarm for seven" becomes "set an alarm for
eight"; "cancel that" becomes one of the cancel counterpart's own catalog examples filled with the
frame's values. The rewritten utterance goes through the whole pipeline and its gates: context
supplies the missing words, never the confidence, so an abstention stays an abstention.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import msgspec

from ..canonicalize import Canonical, EntityMatch
from ..catalog import Catalog, Entity
from ..decision import Candidate, Decision, Outcome
from ..gate import gate
from ..pipeline import ParseResult, Pipeline
from ..slots import fill_slots
from .clarify import action_of, candidates_of, domain_of
from .context import Frame, Pending
from .lexicon import Lexicon

PREPOSITIONS = {
    "ru": frozenset("в во на к ко до с со у по через для".split()),
    "en": frozenset("in at on for to by until from".split()),
}
_VALUE_SLOTS = ("time", "duration", "number")
_TEMPLATES = 3  # cancel templates tried at most
_TEMPLATE_EXAMPLES = 60  # examples of a counterpart canonicalized for templates


class Rewrite(NamedTuple):
    """A completed utterance and the pipeline's verdict on it."""

    result: ParseResult
    text: str


class Ambiguous(NamedTuple):
    """The follow-up fits the frame, but the registry has several matching entities."""

    intent: str
    refs: tuple[str, ...]
    text: str  # the follow-up's words that name the place
    template: Canonical  # the frame's utterance
    span: tuple[int, int]  # the device span in ``template.normalized`` a choice replaces


def _strip(words: Sequence[str], phrases: frozenset[str]) -> list[str]:
    """``words`` without any of ``phrases`` (longest first, up to four words)."""
    out: list[str] = []
    i = 0
    while i < len(words):
        for n in range(min(4, len(words) - i), 0, -1):
            if " ".join(words[i : i + n]) in phrases:
                i += n
                break
        else:
            out.append(words[i])
            i += 1
    return out


def leftover(canonical: Canonical) -> list[str]:
    """The normalized words outside every entity span."""
    text = canonical.normalized
    pieces, pos = [], 0
    for e in sorted(canonical.entities, key=lambda e: e.start):
        pieces.append(text[pos : e.start])
        pos = max(pos, e.end)
    pieces.append(text[pos:])
    return " ".join(pieces).split()


def is_slot_only(canonical: Canonical, lex: Lexicon) -> bool:
    """Values and small words only: "а в спальне?", "make it eight instead", "и на завтра"."""
    return bool(canonical.entities) and not _strip(leftover(canonical), lex.ellipsis | lex.fillers)


def is_bare_cancel(canonical: Canonical, lex: Lexicon) -> bool:
    """The whole utterance (fillers aside) is a cancel phrase: «отмени», "never mind"."""
    if canonical.entities:
        return False
    words = _strip(canonical.normalized.split(), lex.fillers)
    return bool(words) and " ".join(words) in lex.cancel


def cancel_intent_of(catalog: Catalog, intent: str) -> str | None:
    """The catalog's declared counterpart (``cancel_intent``), else ``<domain>.cancel`` if it exists."""
    spec = catalog.intents.get(intent)
    declared = getattr(spec, "cancel_intent", None) if spec is not None else None
    if declared and declared in catalog.intents:
        return str(declared)
    guess = f"{domain_of(intent)}.cancel"
    return guess if guess != intent and guess in catalog.intents else None


def entity_by_ref(catalog: Catalog, ref: str) -> tuple[str, Entity] | None:
    """(kind, entity) of a registry ref."""
    for kind, items in catalog.entities.items():
        for entity in items:
            if entity.ref == ref:
                return kind, entity
    return None


def alias(entity: Entity, locale: str) -> str:
    """The entity's first alias in ``locale`` (any locale as a last resort)."""
    names = entity.aliases.get(locale) or next((a for a in entity.aliases.values() if a), [entity.ref])
    return names[0]


def _room_id(ref: str | None) -> str | None:
    return ref.split(":", 1)[1] if ref and ref.startswith("room:") else None


def _apply(text: str, edits: Iterable[tuple[int, int, str]]) -> str:
    for start, end, new in sorted(edits, key=lambda e: -e[0]):
        text = f"{text[:start]}{new}{text[end:]}"
    return " ".join(text.split())


def _pin(ref: str, kind: str, surface: str) -> dict[str, Any]:
    """A hub-style resolved entity: the rewrite's registry value is the one context chose."""
    return {"canonical_ref": ref, "kind": kind, "text": surface}


def _hub(pins: list[dict[str, Any]]) -> dict[str, Any] | None:
    return {"resolved_entities": pins} if pins else None


def with_slots(result: ParseResult, slots: dict[str, Any]) -> ParseResult:
    """``result`` with ``slots`` (a filled-in copy of the decision)."""
    return msgspec.structs.replace(result, decision=msgspec.structs.replace(result.decision, slots=slots))


def _votes(option: str, votes: Sequence[Candidate], same_domain: bool) -> float:
    """The reply's support for one option: same action ("отменить") or same domain ("будильник")."""
    if same_domain:
        return sum(c.confidence for c in votes if action_of(c.intent) == action_of(option))
    return sum(c.confidence for c in votes if domain_of(c.intent) == domain_of(option))


class FollowUps:
    """Completes elliptical utterances from frames; caches the cancel templates per catalog."""

    def __init__(self) -> None:
        self._templates: dict[tuple[str, str, str], list[Canonical]] = {}
        self._lock = threading.Lock()

    # -- "а в спальне?", "make it eight instead": the previous intent with the new value --------------

    def update(self, pipeline: Pipeline, canonical: Canonical, frame: Frame) -> Rewrite | Ambiguous | None:
        """Rewrite ``frame``'s utterance with the follow-up's values; None when they do not fit it."""
        catalog = pipeline.catalog
        spec = catalog.intents.get(frame.intent)
        if spec is None:
            return None
        template = frame.canonical
        sources = {s.source or name for name, s in spec.slots.items()}
        edits: list[tuple[int, int, str]] = []
        pins: list[dict[str, Any]] = []
        appended: list[str] = []
        used: set[int] = set()
        for ent in canonical.entities:
            same = [
                i
                for i, f in enumerate(template.entities)
                if f.placeholder == ent.placeholder and i not in used
            ]
            if ent.placeholder == "room" and (dev := self._device(template)) is not None:
                swap = self._room_swap(catalog, template, dev, ent, frame)
                if isinstance(swap, Ambiguous) or swap is None:
                    return swap
                edits.append(swap[0])
                pins.append(swap[1])
                used.add(template.entities.index(dev))
                if not same:
                    continue
            if same:
                target = template.entities[same[0]]
                used.add(same[0])
                edits.append((target.start, target.end, ent.text))  # its own words re-resolve it
            elif ent.placeholder == "number" and (val := self._value(template, used)) is not None:
                used.add(template.entities.index(val))
                surface = ent.text
                unit = (
                    val.text.split()[-1]
                    if val.placeholder == "duration" and len(val.text.split()) > 1
                    else ""
                )
                edits.append((val.start, val.end, f"{surface} {unit}".strip()))
            elif ent.placeholder in sources:
                appended.append(self._with_preposition(ent, canonical))
            else:
                return None
        text = _apply(template.normalized, edits)
        if appended:
            text = f"{text} {' '.join(appended)}"
        result = pipeline.parse(text, template.locale, _hub(pins), fallback=False)
        return Rewrite(result, text)

    @staticmethod
    def _device(template: Canonical) -> EntityMatch | None:
        return next((e for e in template.entities if e.placeholder == "device" and e.ref), None)

    @staticmethod
    def _value(template: Canonical, used: set[int]) -> EntityMatch | None:
        for placeholder in _VALUE_SLOTS:
            for i, e in enumerate(template.entities):
                if e.placeholder == placeholder and i not in used:
                    return e
        return None

    @staticmethod
    def _with_preposition(ent: EntityMatch, canonical: Canonical) -> str:
        before = canonical.normalized[: ent.start].split()
        prep = before[-1] if before and before[-1] in PREPOSITIONS.get(canonical.locale, ()) else ""
        return f"{prep} {ent.text}".strip()

    @staticmethod
    def _room_swap(
        catalog: Catalog, template: Canonical, dev: EntityMatch, room: EntityMatch, frame: Frame
    ) -> tuple[tuple[int, int, str], dict[str, Any]] | Ambiguous | None:
        """The frame's kind of device in the new room: one → swap it in; several → ask which."""
        room_id = _room_id(room.ref)
        if room_id is None:
            return None
        found = [e for e in catalog.entities.get(dev.kind, []) if e.room == room_id]
        if not found:
            return None
        if len(found) > 1:
            refs = tuple(e.ref for e in found)
            return Ambiguous(frame.intent, refs, room.text, template, (dev.start, dev.end))
        name = alias(found[0], template.locale)
        return (dev.start, dev.end, name), _pin(found[0].ref, dev.kind, name)

    def choose_entity(self, pipeline: Pipeline, pending: Pending, ref: str) -> Rewrite | None:
        """The clarified entity put into the ambiguous span of the pending utterance."""
        found = entity_by_ref(pipeline.catalog, ref)
        if found is None or pending.span is None:
            return None
        kind, entity = found
        name = alias(entity, pending.canonical.locale)
        text = _apply(pending.canonical.normalized, [(pending.span[0], pending.span[1], name)])
        result = pipeline.parse(text, pending.canonical.locale, _hub([_pin(ref, kind, name)]), fallback=False)
        return Rewrite(result, text)

    # -- "cancel that": the counterpart's own example, filled with the frame's values ------------------

    def cancel(self, pipeline: Pipeline, frame: Frame) -> Rewrite | None:
        """The frame's cancel counterpart, through the pipeline; None when nothing accepts it."""
        catalog = pipeline.catalog
        counterpart = cancel_intent_of(catalog, frame.intent)
        if counterpart is None:
            return None
        spec = catalog.intents[counterpart]
        declared = {s.source or name for name, s in spec.slots.items()}
        values = {str(v) for v in frame.slots.values()}
        filled = [
            e for e in frame.canonical.entities if {e.ref, e.value, e.text} & values
        ]  # the frame's slots
        wanted = sorted(e.placeholder for e in filled if e.placeholder in declared)
        templates = self._cancel_templates(pipeline, counterpart, frame.canonical.locale)
        full = [t for t in templates if sorted(e.placeholder for e in t.entities) == wanted]
        bare = [t for t in templates if not t.entities] if wanted else []
        for template in [*full, *bare][:_TEMPLATES]:
            edits, pins, taken = [], [], set()
            for ent in template.entities:
                src = next(
                    (i for i, f in enumerate(filled) if f.placeholder == ent.placeholder and i not in taken),
                    None,
                )
                if src is None:
                    break
                taken.add(src)
                value = filled[src]
                edits.append((ent.start, ent.end, value.text))
                if value.ref:
                    pins.append(_pin(value.ref, value.kind, value.text))
            else:
                text = _apply(template.normalized, edits)
                result = pipeline.parse(text, template.locale, _hub(pins), fallback=False)
                d = result.decision
                if d.outcome is Outcome.ACCEPT and d.intent == counterpart:
                    kept = {k: v for k, v in frame.slots.items() if k in spec.slots}  # the frame's values win
                    return Rewrite(with_slots(result, {**d.slots, **kept}), text)
        return None

    def _cancel_templates(self, pipeline: Pipeline, intent: str, locale: str) -> list[Canonical]:
        key = (pipeline.catalog.digest, intent, locale)
        with self._lock:
            cached = self._templates.get(key)
        if cached is None:
            texts = pipeline.catalog.intents[intent].examples.get(locale, [])[:_TEMPLATE_EXAMPLES]
            cached = sorted(
                (pipeline.canonicalizer.canonicalize(t, locale) for t in texts),
                key=lambda c: (len(c.entities), len(c.normalized)),
            )
            with self._lock:
                if len(self._templates) > 256:  # catalogs come and go with reloads
                    self._templates.clear()
                self._templates[key] = cached
        return cached

    # -- the answer to a clarifying question ----------------------------------------------------------

    def choose_intent(self, pipeline: Pipeline, reply: ParseResult, pending: Pending) -> ParseResult | None:
        """Which of the pending candidates the reply picks, gated; None when it picks none of them.

        The reply's own candidates vote: for "the alarm or the timer?" by domain, for "set or cancel?"
        by intent and action. Their shares among the asked options are gated like any confidence.
        """
        options = list(pending.candidates)
        d = reply.decision
        alts: tuple[Candidate, ...] = ()
        if d.outcome is Outcome.ACCEPT and d.intent in options:
            chosen, conf = d.intent, d.confidence
        else:
            votes = candidates_of(d)
            mass = {o: _votes(o, votes, pending.same_domain) for o in options}
            total = sum(mass.values())
            if total < pipeline.gate_config.reject:
                return None
            ranked = sorted(options, key=lambda o: -mass[o])
            chosen, conf = ranked[0], mass[ranked[0]] / total
            alts = tuple(Candidate(o, mass[o] / total) for o in ranked[1:])
        spec = pipeline.catalog.intents.get(chosen)
        if spec is None:
            return None
        proposal = Decision(
            chosen, conf, Outcome.ACCEPT, d.via, alts, evidence={"clarified": pending.request_id}
        )
        final = gate(proposal, pipeline.gate_config, pipeline.policies.get(chosen))
        check = fill_slots(spec, pending.canonical, {})
        slots = {**check.slots, **(d.slots if d.intent == chosen else {})}
        if check.invalid and final.outcome is Outcome.ACCEPT:
            final = msgspec.structs.replace(final, outcome=Outcome.ABSTAIN, reason="invalid_slot_value")
        final = msgspec.structs.replace(final, slots=slots if final.outcome is Outcome.ACCEPT else {})
        return ParseResult(
            final,
            pending.canonical,
            reply.stages,
            reply.model_id,
            missing_slots=check.missing,
            invalid_slots=tuple(i["slot"] for i in check.invalid),
        )
