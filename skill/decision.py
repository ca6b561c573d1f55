"""The one result type every stage returns, and the typed values that flow between stages."""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class Outcome(str, enum.Enum):  # noqa: UP042 - str() and format() of members stay "Outcome.X"
    """What a stage (or the whole pipeline) concluded."""

    ACCEPT = "accept"
    ABSTAIN = "abstain"
    REJECT = "reject"
    ERROR = "error"


class Candidate(msgspec.Struct, frozen=True):
    """One ranked intent with its calibrated probability."""

    intent: str
    confidence: float


class Decision(msgspec.Struct, frozen=True):
    """A stage's verdict: the intent (or None), calibrated confidence, slots and why.

    ``intent is None`` means the stage has no answer; ``outcome`` says whether that is an
    abstention (another stage may try) or a rejection (nobody should).
    """

    intent: str | None
    confidence: float
    outcome: Outcome
    via: str
    alternatives: tuple[Candidate, ...] = ()
    slots: dict[str, Any] = msgspec.field(default_factory=dict)
    evidence: dict[str, Any] = msgspec.field(default_factory=dict)
    reason: str | None = None

    @classmethod
    def abstain(cls, via: str, reason: str, evidence: dict[str, Any] | None = None) -> Decision:
        """A stage that has nothing to say."""
        return cls(
            intent=None,
            confidence=0.0,
            outcome=Outcome.ABSTAIN,
            via=via,
            evidence=evidence or {},
            reason=reason,
        )
