"""Clarify instead of guessing: when an abstention is between a few close candidates, say which.

Intent ids carry their domain (``alarm.set`` → ``alarm``, ``voice.timer.start`` → ``voice.timer``).
Two cases ask ``which_intent``: the candidates of one domain together pass the accept threshold but
the top two of them are within the margin ("set or cancel the alarm?"); or no domain passes alone,
the top two domains together do, and the second is at least half as likely as the first ("the alarm
or the timer?"). An ambiguous registry name adds its entity candidates (``which_entity`` when the
intent itself is settled). The decision stays abstain; the field only adds what the hub needs to ask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..canonicalize import Canonical
from ..catalog import Catalog
from ..contracts import Clarify, ClarifyCandidate
from ..decision import Candidate, Decision, Outcome
from ..gate import GateConfig

CLOSE_RATIO = 0.5  # cross-domain: the second domain at least this share of the first
MIN_CONFIDENCE = 0.05  # same-domain: candidates below this are not offered
MAX_CANDIDATES = 4


def domain_of(intent: str) -> str:
    """``alarm.set`` → ``alarm``; ``voice.timer.start`` → ``voice.timer``."""
    return intent.rsplit(".", 1)[0] if "." in intent else intent


def action_of(intent: str) -> str:
    """``alarm.set`` → ``set``."""
    return intent.rsplit(".", 1)[-1]


def candidates_of(decision: Decision) -> list[Candidate]:
    """The decision's intent (when it has one) and its alternatives, best first."""
    top = [Candidate(decision.intent, decision.confidence)] if decision.intent else []
    return sorted([*top, *decision.alternatives], key=lambda c: -c.confidence)


def domain_masses(cands: Sequence[Candidate]) -> list[tuple[str, float]]:
    """Probability mass per domain, largest first."""
    mass: dict[str, float] = {}
    for c in cands:
        mass[domain_of(c.intent)] = mass.get(domain_of(c.intent), 0.0) + c.confidence
    return sorted(mass.items(), key=lambda kv: -kv[1])


def entity_label(catalog: Catalog, ref: str, locale: str) -> str | None:
    """The entity's label or first alias in ``locale``, for the hub's question."""
    for items in catalog.entities.values():
        for entity in items:
            if entity.ref == ref:
                names = entity.label.get(locale) or next(iter(entity.aliases.get(locale, [])), None)
                return names or next((a[0] for a in entity.aliases.values() if a), None)
    return None


def entity_question(catalog: Catalog, intent: str, text: str, refs: Sequence[str], locale: str) -> Clarify:
    """``which_entity``: the intent is clear, the registry name is not."""
    return Clarify(
        question_kind="which_entity",
        candidates=[ClarifyCandidate(ref=r, label=entity_label(catalog, r, locale)) for r in refs],
        domain=domain_of(intent),
        intent=intent,
        text=text,
    )


def for_decision(
    decision: Decision, canonical: Canonical, gate: GateConfig, catalog: Catalog
) -> Clarify | None:
    """The clarifying question for an abstention, or None when it is not a close call."""
    if decision.outcome is not Outcome.ABSTAIN:
        return None
    cands = candidates_of(decision)
    if not cands:
        return None
    extra: dict[str, Any] = (
        {"entities": [{"text": a.text, "candidates": list(a.candidates)} for a in canonical.ambiguities]}
        if canonical.ambiguities
        else {}
    )
    masses = domain_masses(cands)
    (d1, m1), (d2, m2) = masses[0], (masses[1] if len(masses) > 1 else ("", 0.0))
    group = [c for c in cands if domain_of(c.intent) == d1]
    if m1 >= gate.accept:
        if len(group) >= 2 and group[0].confidence - group[1].confidence < gate.margin:
            offered = [c for c in group if c.confidence >= MIN_CONFIDENCE][:MAX_CANDIDATES]
            if len(offered) >= 2:
                return Clarify(
                    question_kind="which_intent",
                    candidates=[
                        ClarifyCandidate(c.intent, None, round(c.confidence, 4), d1) for c in offered
                    ],
                    domain=d1,
                    **extra,
                )
        if canonical.ambiguities and group[0].confidence >= gate.accept:
            amb = canonical.ambiguities[0]
            return entity_question(catalog, group[0].intent, amb.text, amb.candidates, canonical.locale)
        return None
    if m2 and m1 + m2 >= gate.accept and m2 >= CLOSE_RATIO * m1:
        best = [next(c for c in cands if domain_of(c.intent) == d) for d in (d1, d2)]
        return Clarify(
            question_kind="which_intent",
            candidates=[
                ClarifyCandidate(c.intent, None, round(c.confidence, 4), domain_of(c.intent)) for c in best
            ],
            domain=None,
            **extra,
        )
    return None
