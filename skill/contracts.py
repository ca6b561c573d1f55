"""Wire structs for /parse, /health and /reindex (field names are the AdaOS contract)."""

from __future__ import annotations

from typing import Any

import msgspec

from .decision import Outcome
from .pipeline import ParseResult

MAX_ALTERNATIVES = 4
SUPPORTED_LOCALES = ("ru", "en")


class ParseRequest(msgspec.Struct, frozen=True):
    """``POST /parse`` body; unknown fields are ignored (the wire stays lenient)."""

    text: str | None = None
    webspace_id: str | None = None
    locale: str | None = None
    request_locale: str | None = None
    preferred_locales: list[str] | str | None = None
    canonicalized_text: str | None = None
    entities: dict[str, Any] | None = None
    request_id: str | None = None
    session_id: str | None = None  # the conversation's scope for follow-ups (default: webspace_id)


class ReindexRequest(msgspec.Struct, frozen=True):
    """``POST /reindex`` body."""

    purge_indexes: bool = False


class Alternative(msgspec.Struct, frozen=True):
    """A runner-up intent."""

    intent: str
    confidence: float


class SegmentContext(msgspec.Struct, frozen=True):
    """``context``: what a request does to the session's frames (start / update / cancel / noop)."""

    action: str
    refers_to: str | None = None  # the request_id of the frame it updates or cancels
    resolution: str | msgspec.UnsetType = msgspec.UNSET  # slot_update, cancel, clarify_answer, carry_over


class ClarifyCandidate(msgspec.Struct, frozen=True, omit_defaults=True):
    """One option of a clarifying question: an intent, or a registry entity."""

    intent: str | None = None
    ref: str | None = None
    confidence: float | None = None
    domain: str | None = None
    label: str | None = None


class Clarify(msgspec.Struct, frozen=True):
    """``clarify``: what the hub needs to ask instead of guessing; the decision stays abstain."""

    question_kind: str  # which_intent | which_entity
    candidates: list[ClarifyCandidate]
    domain: str | None = None
    intent: str | msgspec.UnsetType = msgspec.UNSET  # which_entity: the intent whose slot is ambiguous
    text: str | msgspec.UnsetType = msgspec.UNSET  # which_entity: the ambiguous words
    entities: list[dict[str, Any]] | msgspec.UnsetType = msgspec.UNSET  # ambiguous registry names
    segment_index: int | msgspec.UnsetType = msgspec.UNSET


class Segment(msgspec.Struct, frozen=True):
    """One request of a multi-request utterance (``segments``, in order)."""

    index: int
    text: str
    start: int
    end: int
    top_intent: str
    confidence: float
    slots: dict[str, Any]
    via: str
    decision: str
    reason: str | None
    alternatives: list[Alternative]
    missing_slots: list[str] = msgspec.field(default_factory=list)
    context: SegmentContext | msgspec.UnsetType = msgspec.UNSET
    clarify: Clarify | msgspec.UnsetType = msgspec.UNSET
    carried_over: bool | msgspec.UnsetType = msgspec.UNSET  # completed from the previous segment


class ParseResponseResult(msgspec.Struct, frozen=True):
    """The result fields, sent both at the top level and under ``result``."""

    top_intent: str
    confidence: float
    alternatives: list[Alternative]
    slots: dict[str, Any]
    via: str
    model_id: str | None
    evidence: dict[str, Any]
    decision: str
    reason: str | None
    locale: str
    stages: list[dict[str, Any]]
    request_id: str | None = None
    missing_slots: list[str] = msgspec.field(default_factory=list)  # required slots nothing filled
    invalid_slots: list[str] = msgspec.field(default_factory=list)  # values out of the slot's range
    # The conversation layer (skill/conversation): absent when they do not apply.
    segments: list[Segment] | msgspec.UnsetType = msgspec.UNSET  # only when a split was taken
    context: SegmentContext | msgspec.UnsetType = msgspec.UNSET
    clarify: Clarify | msgspec.UnsetType = msgspec.UNSET


class BadRequest(ValueError):
    """Bad input: mapped to 400 with a code and the offending field."""

    def __init__(self, code: str, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.status = status


def normalize_locale(value: str) -> str | None:
    """ "ru-RU" / "en_US" / "RU" → "ru" / "en"; None when unsupported."""
    primary = value.strip().replace("_", "-").split("-", 1)[0].lower()
    return primary if primary in SUPPORTED_LOCALES else None


def pick_locale(req: ParseRequest) -> str | None:
    """The request's locale (``locale``, ``request_locale``, then the first supported preferred one).

    None means "detect from the script". An explicit unsupported locale is a 400, so a caller never
    gets a silent guess in a language we have no data for.
    """
    for field in ("locale", "request_locale"):
        raw = getattr(req, field)
        if raw:
            loc = normalize_locale(raw)
            if loc is None:
                raise BadRequest(
                    "unsupported_locale",
                    f"locale {raw!r} is not supported; supported: {', '.join(SUPPORTED_LOCALES)}",
                    field,
                )
            return loc
    prefs = req.preferred_locales
    if isinstance(prefs, str):
        prefs = [p for p in prefs.split(",") if p.strip()]
    for raw in prefs or []:
        if not isinstance(raw, str):
            continue
        loc = normalize_locale(raw)
        if loc is not None:
            return loc
    return None


def wire_result(res: ParseResult, accept_threshold: float, request_id: str | None) -> ParseResponseResult:
    """Map a pipeline result onto the contract.

    The hub gates on ``confidence`` alone, so a decision the service did not accept must never
    look acceptable to the hub: when the service abstains although the confidence is above the
    accept threshold (small margin, stricter per-intent threshold), or rejects via out-of-scope
    evidence, the wire carries ``top_intent: ""`` with ``confidence: 0`` (the contract's
    "abstain") and the real candidates stay in ``alternatives`` and ``evidence``.
    """
    d = res.decision
    alts = [Alternative(c.intent, round(c.confidence, 4)) for c in d.alternatives]
    top, conf = d.intent or "", d.confidence if d.intent else 0.0
    hide = d.outcome is not Outcome.ACCEPT and conf >= min(accept_threshold, 0.999999)
    if d.outcome is Outcome.REJECT and d.reason not in (None, "below_reject_threshold"):
        hide = True
    if hide and top:
        alts = [Alternative(top, round(conf, 4)), *alts]
        top, conf = "", 0.0
    return ParseResponseResult(
        top_intent=top,
        confidence=round(conf, 4),
        alternatives=alts[:MAX_ALTERNATIVES],
        slots=d.slots if top else {},
        via=d.via,
        model_id=res.model_id,
        evidence=d.evidence,
        decision=d.outcome.value,
        reason=d.reason,
        locale=res.canonical.locale,
        stages=[msgspec.to_builtins(s) for s in res.stages],
        request_id=request_id,
        missing_slots=list(res.missing_slots) if top else [],
        invalid_slots=list(res.invalid_slots),
    )
