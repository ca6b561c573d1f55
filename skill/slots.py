"""Slots of a decided intent: filled from canonicalization, checked against the catalog's declarations.

Three checks, each reported and never silently applied:

* kind: a slot that declares ``kinds`` (``device: {kinds: [light]}``) conflicts with a resolved entity
  of another kind ("set the TV volume" is no light brightness); the pipeline drops such candidates;
* range: a numeric value outside the slot's ``range`` (a level of 250, a timer of 0 s) is invalid and
  the answer is not accepted;
* required: a required slot nothing filled is missing; the hub can ask "which one?".
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from .canonicalize import Canonical, EntityMatch
from .catalog import Catalog, Intent, SlotSpec
from .decision import Candidate, Decision, Outcome

_ISO = re.compile(
    r"^P(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$"
)
_EXTREMES = ("max", "min")


class SlotCheck(msgspec.Struct, frozen=True):
    """The filled slots and what is wrong with them."""

    slots: dict[str, Any]
    missing: tuple[str, ...] = ()
    invalid: tuple[dict[str, Any], ...] = ()


def duration_seconds(iso: str) -> float | None:
    """Seconds of an ISO 8601 duration ("PT1H30M" → 5400), or None."""
    m = _ISO.match(iso)
    if not m or iso in ("P", "PT"):
        return None
    w, d, h, mi, s = (float(x) if x else 0.0 for x in m.groups())
    return (((w * 7 + d) * 24 + h) * 60 + mi) * 60 + s


def _kind_ok(spec: SlotSpec, kind: str) -> bool:
    return any(kind in (k, f"device.{k}") for k in spec.kinds)


def kind_conflicts(intent: Intent | None, canonical: Canonical) -> list[dict[str, Any]]:
    """Resolved entities whose kind the intent's slot does not accept ("TV" for light brightness)."""
    if intent is None:
        return []
    out = []
    for name, spec in intent.slots.items():
        if not spec.kinds:
            continue
        source = spec.source or name
        for ent in canonical.entities:
            if ent.placeholder == source and ent.ref and not _kind_ok(spec, ent.kind):
                out.append({"intent": intent.intent, "slot": name, "kind": ent.kind, "ref": ent.ref})
    return out


def _numeric(spec: SlotSpec, ent: EntityMatch | None, value: str) -> float | None:
    if ent is not None and ent.placeholder == "duration":
        return duration_seconds(value)
    try:
        return float(value)
    except ValueError:
        return None


def _in_range(spec: SlotSpec, ent: EntityMatch | None, value: str, locale: str) -> tuple[bool, str]:
    """Whether the value fits the slot's range, and why not (Fahrenheit is converted to Celsius).

    A temperature said without a unit is read as Fahrenheit only in English and only when Celsius
    does not fit ("set the thermostat to seventy two").
    """
    if spec.range is None:
        return True, ""
    x = _numeric(spec, ent, value)
    if x is None:
        return False, "not a number"
    kind = ent.kind if ent is not None else ""
    if ent is not None and ent.placeholder == "temperature":
        celsius = (x - 32.0) * 5.0 / 9.0
        guess_f = locale == "en" and not spec.range.admits(x) and spec.range.admits(celsius)
        if kind == "temperature.fahrenheit" or (kind == "temperature" and guess_f):
            x = celsius  # "seventy two" on an English thermostat is Fahrenheit
    if spec.range.admits(x):
        return True, ""
    return False, f"outside [{spec.range.min}, {spec.range.max}]"


def _extreme(spec: SlotSpec, value: str) -> str | None:
    """ "max" / "min" as the slot declares it (``extremes``, else the range's bound)."""
    if value in spec.extremes:
        return spec.extremes[value]  # type: ignore[index]
    bound = None
    if spec.range is not None:
        bound = spec.range.max if value == "max" else spec.range.min
    if bound is None:
        return None
    return str(int(bound)) if bound == int(bound) else str(bound)


def _entity_value(spec: SlotSpec, ent: EntityMatch) -> str:
    if spec.value == "ref":
        return ent.ref or ent.value
    if spec.value == "id":
        return (ent.ref or ent.value).rsplit(":", 1)[-1]
    if spec.value == "text":
        return ent.text
    return ent.value


def _checked(  # noqa: PLR0917 - fill_slots's check of one value, called positionally
    name: str, spec: SlotSpec, ent: EntityMatch | None, value: Any, locale: str, invalid: list[dict[str, Any]]
) -> tuple[bool, Any]:
    """(keep, value): extremes mapped to the slot's meaning, out-of-range values recorded in ``invalid``."""
    if isinstance(value, str) and value in _EXTREMES and spec.value == "value":
        mapped = _extreme(spec, value)
        if mapped is None:
            invalid.append({"slot": name, "value": value, "why": "no meaning for an extreme"})
            return False, value
        value = mapped
    if isinstance(value, str) and spec.value == "value":
        ok, why = _in_range(spec, ent, value, locale)
        if not ok:
            invalid.append({"slot": name, "value": value, "why": why})
    return True, value


def fill_slots(intent: Intent | None, canonical: Canonical, extra: dict[str, Any]) -> SlotCheck:
    """The intent's declared slots from canonicalized entities and the stage's own slots, checked.

    A ``multiple`` slot gets the list of every value its source found, in the order said.
    """
    if intent is None:
        return SlotCheck({})
    slots: dict[str, Any] = {}
    invalid: list[dict[str, Any]] = []
    for name, spec in intent.slots.items():
        pairs: list[tuple[EntityMatch | None, Any]]  # what may fill the slot, and from which entity
        if name in extra:
            given = extra[name]
            many = given if spec.multiple and isinstance(given, list) else [given]
            pairs = [(None, v) for v in many]
        else:
            source = spec.source or name
            found = [
                e
                for e in canonical.entities
                if e.placeholder == source and (not spec.kinds or not e.ref or _kind_ok(spec, e.kind))
            ]
            pairs = [(e, _entity_value(spec, e)) for e in (found if spec.multiple else found[:1])]
        checked = (_checked(name, spec, e, v, canonical.locale, invalid) for e, v in pairs)
        values = [v for keep, v in checked if keep]
        if values:
            slots[name] = values if spec.multiple else values[0]
    missing = tuple(n for n, s in intent.slots.items() if s.required and n not in slots)
    return SlotCheck(slots, missing, tuple(invalid))


def drop_kind_conflicts(decision: Decision, catalog: Catalog, canonical: Canonical) -> Decision:
    """Drop candidates whose slot kinds the resolved entities contradict; renormalize the rest.

    "set the TV volume to 50" must never become light brightness: when the top candidate
    conflicts, the next one that does not becomes the proposal with its conditional probability
    (its share of what the dropped candidates left), and the gate decides as usual.
    """
    if not canonical.entities or decision.intent is None:
        return decision
    cands = [Candidate(decision.intent, decision.confidence), *decision.alternatives]
    conflicts = [c for cand in cands for c in kind_conflicts(catalog.intents.get(cand.intent), canonical)]
    if not conflicts:
        return decision
    bad = {c["intent"] for c in conflicts}
    keep = [c for c in cands if c.intent not in bad]
    lost = sum(c.confidence for c in cands if c.intent in bad)
    scale = 1.0 / max(1e-9, 1.0 - min(lost, 1.0 - 1e-9))
    keep = [Candidate(c.intent, min(1.0, c.confidence * scale)) for c in keep]
    evidence = {**decision.evidence, "kind_conflicts": conflicts, "kind_conflict_action": "dropped"}
    if decision.intent not in bad:
        return msgspec.structs.replace(decision, alternatives=tuple(keep[1:]), evidence=evidence)
    if not keep:
        return msgspec.structs.replace(
            decision,
            intent=None,
            confidence=0.0,
            alternatives=(),
            outcome=Outcome.ABSTAIN,
            reason="kind_conflict",
            evidence=evidence,
        )
    return msgspec.structs.replace(
        decision,
        intent=keep[0].intent,
        confidence=keep[0].confidence,
        alternatives=tuple(keep[1:]),
        outcome=Outcome.ACCEPT if decision.outcome is Outcome.ACCEPT else decision.outcome,
        reason=None,
        evidence=evidence,
        slots={},
    )
