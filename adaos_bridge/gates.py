"""The accept / abstain / reject gate: a pure function of the service's answer and the hub's thresholds."""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from .client import CallFailed, ServiceReply


class Status(enum.StrEnum):
    """What happened to one request (the hub's ``neural_usage.json`` status names)."""

    ACCEPTED = "accepted"
    LOW_CONFIDENCE = "low_confidence"
    REJECTED = "rejected"
    ABSTAINED = "abstained"
    ERROR = "error"


class Thresholds(msgspec.Struct, frozen=True):
    """``ADAOS_NLU_NEURAL_ACCEPT_CONFIDENCE`` / ``ADAOS_NLU_NEURAL_REJECT_CONFIDENCE``."""

    accept: float = 0.80
    reject: float = 0.45


class Verdict(msgspec.Struct, frozen=True):
    """The gate's answer: status, the contract's reason, and what the trace and teacher need."""

    status: Status
    reason: str
    trace_status: str  # nlu.trace.stage status: hit, miss, reject, ambiguous
    intent: str | None = None  # the top intent, or for an abstention the hidden best candidate
    confidence: float | None = None  # the wire confidence (0 for an abstention)
    teachable: bool = False  # a miss of the language, not of the infrastructure
    error: str | None = None  # why the call failed (timeout, connection, circuit_open, ...)
    clarify: dict[str, Any] | None = None  # the service's clarifying question for an abstention

    @property
    def accepted(self) -> bool:
        """True only when nlp.intent.detected may be emitted."""
        return self.status is Status.ACCEPTED


_REASONS = {
    Status.ACCEPTED: "neural_accepted",
    Status.LOW_CONFIDENCE: "neural_low_confidence",
    Status.REJECTED: "neural_rejected",
    Status.ABSTAINED: "neural_abstained",
    Status.ERROR: "neural_parse_failed",
}


def judge_failure(failure: CallFailed) -> Verdict:
    """No usable answer: always a fallback, never teachable."""
    reason = "neural_unsupported_locale" if failure.code == "unsupported_locale" else _REASONS[Status.ERROR]
    error = failure.kind if failure.code is None else f"{failure.kind}:{failure.code}"
    return Verdict(Status.ERROR, reason, "miss", error=error)


def judge(reply: ServiceReply, th: Thresholds) -> Verdict:
    """Gate an answer. The service's own ``decision`` wins: abstain or reject is never accepted.

    Then the hub's rule on ``confidence``: accept at ``>= accept``, reject below ``reject``, low
    confidence in between. An answer without a ``decision`` (an older service) is gated on
    confidence alone.
    """
    decision = (reply.decision or "accept").lower()
    intent = reply.top_intent.strip()
    conf = float(reply.confidence)
    ambiguous = bool(reply.evidence.get("ambiguities"))
    if decision == "error":
        return Verdict(Status.ERROR, _REASONS[Status.ERROR], "miss", error="service_error")
    if decision == "reject":
        status = Status.REJECTED
    elif decision != "accept" or not intent:
        status = Status.ABSTAINED
    elif conf < th.reject:
        status = Status.REJECTED
    elif conf < th.accept:
        status = Status.LOW_CONFIDENCE
    else:
        status = Status.ACCEPTED
    if not intent and reply.alternatives:  # an abstention keeps its best candidate here
        intent = str(reply.alternatives[0].get("intent") or "")
    if status is Status.ACCEPTED:
        trace = "hit"
    elif status is Status.REJECTED:
        trace = "reject"
    else:
        trace = "ambiguous" if ambiguous else "miss"
    clarify = reply.raw.get("clarify")
    return Verdict(
        status,
        _REASONS[status],
        trace,
        intent=intent or None,
        confidence=conf,
        teachable=status is not Status.ACCEPTED,
        clarify=clarify if isinstance(clarify, dict) and status is not Status.ACCEPTED else None,
    )
