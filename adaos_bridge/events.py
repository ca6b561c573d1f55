"""Payloads of the events the bridge emits (contracts §3); pure functions of request, answer and verdict."""

from __future__ import annotations

from typing import Any

from .client import ServiceReply
from .gates import Verdict
from .intake import IntentRequest

DETECTED = "nlp.intent.detected"
DETECT_RASA = "nlp.intent.detect.rasa"
NOT_OBTAINED = "nlp.intent.not_obtained"
TRACE = "nlu.trace.stage"
DETECT_NEURAL = "nlp.intent.detect.neural"
DETECT_REQUEST = "nlp.intent.detect.request"
EXAMPLE_SAVE = "nlp.teacher.example.save"


def _meta(req: IntentRequest) -> dict[str, Any]:
    meta = dict(req.meta)
    meta.pop("event", None)  # the incoming event's mark; the outgoing one gets its own
    return meta


def _conversation(req: IntentRequest, payload: dict[str, Any]) -> dict[str, Any]:
    """``session_id`` and, for one request of several, ``segment_index`` (and ``_meta.segments_total``)."""
    if req.session_id:
        payload["session_id"] = req.session_id
    if req.segment_index is not None:
        payload["segment_index"] = req.segment_index
        meta = payload.setdefault("_meta", {})
        meta["segment_index"] = req.segment_index
        meta["segments_total"] = req.segments_total
    return payload


def detected(req: IntentRequest, reply: ServiceReply, verdict: Verdict) -> dict[str, Any]:
    """``nlp.intent.detected``; ``_raw`` is the whole service result (alternatives, model_id, evidence).

    For one request of a multi-request utterance: one event per accepted segment, the shared
    ``request_id``, its ``segment_index``, and ``_raw`` the segment's result.
    """
    payload = {
        "intent": reply.top_intent,
        "confidence": float(reply.confidence),
        "slots": dict(reply.slots),
        "text": req.text,
        "webspace_id": req.webspace_id,
        "request_id": req.request_id,
        "via": reply.via or "neural",
        "_raw": dict(reply.raw),
        "_meta": _meta(req),
    }
    missing = reply.raw.get("missing_slots")
    if missing:
        payload["missing_slots"] = list(missing)  # required slots nothing filled: the hub may ask
    return _conversation(req, payload)


def rasa_fallback(req: IntentRequest, verdict: Verdict) -> dict[str, Any]:
    """``nlp.intent.detect.rasa``: the request's payload plus the fallback marks in ``_meta``."""
    meta = _meta(req)
    meta.setdefault("nlu_pipeline", {"active_stages": {"neural": True, "rasa": True}})
    meta["neural_fallback"] = True
    meta["neural_fallback_reason"] = verdict.reason
    if verdict.error:
        meta["neural_error"] = verdict.error
    payload = {k: v for k, v in req.payload.items() if k != "_meta"}
    payload.update(text=req.text, webspace_id=req.webspace_id, request_id=req.request_id, _meta=meta)
    if req.locale:
        payload.setdefault("locale", req.locale)
        payload.setdefault("request_locale", req.locale)
    if req.preferred_locales:
        payload["preferred_locales"] = list(req.preferred_locales)
    if verdict.clarify:
        meta["neural_clarify"] = verdict.clarify
    return _conversation(req, payload)


def not_obtained(req: IntentRequest, verdict: Verdict) -> dict[str, Any]:
    """``nlp.intent.not_obtained`` when the Rasa fallback is disabled."""
    meta = _meta(req)
    if verdict.error:
        meta["neural_error"] = verdict.error
    if verdict.clarify:
        meta["neural_clarify"] = verdict.clarify
    payload = {
        "reason": verdict.reason,
        "text": req.text,
        "via": "neural",
        "webspace_id": req.webspace_id,
        "request_id": req.request_id,
        "_meta": meta,
    }
    return _conversation(req, payload)


def trace(
    req: IntentRequest,
    verdict: Verdict,
    reply: ServiceReply | None,
    *,
    stage: str = "neural",
    status: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """``nlu.trace.stage`` for one outcome."""
    payload: dict[str, Any] = {
        "stage": stage,
        "status": status or verdict.trace_status,
        "text": req.text,
        "via": (reply.via if reply is not None and verdict.accepted else stage) or stage,
        "webspace_id": req.webspace_id,
        "request_id": req.request_id,
    }
    why = reason if reason is not None else (None if verdict.accepted else verdict.reason)
    if why:
        payload["reason"] = why
    if stage == "neural":
        if verdict.intent:
            payload["intent"] = verdict.intent
        if verdict.confidence is not None:
            payload["confidence"] = verdict.confidence
        if reply is not None and reply.slots and verdict.accepted:
            payload["slots"] = dict(reply.slots)
        if reply is not None and reply.model_id:
            payload["model_id"] = reply.model_id
    meta = _meta(req)
    if meta:
        payload["_meta"] = meta
    if req.segment_index is not None:
        payload["segment_index"] = req.segment_index
    return payload
