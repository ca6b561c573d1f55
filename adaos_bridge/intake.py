"""Reading intent requests off the bus (every field variant the hub sends) and dropping duplicates."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

DEFAULT_WEBSPACE = "desktop"


class IntentRequest(msgspec.Struct, frozen=True):
    """A request as the bridge understands it, whatever the payload spelled."""

    text: str
    webspace_id: str
    request_id: str
    locale: str | None = None
    preferred_locales: tuple[str, ...] = ()
    meta: dict[str, Any] = msgspec.field(default_factory=dict)
    entities: dict[str, Any] | None = None
    canonicalized_text: str | None = None
    request_id_synthesized: bool = False
    event_type: str = ""
    payload: dict[str, Any] = msgspec.field(default_factory=dict)  # as received, for the stage events
    session_id: str | None = None  # the conversation's scope, passed through to the service and events
    segment_index: int | None = None  # one request of a multi-request utterance (set by the bridge)
    segments_total: int | None = None


def _str(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _first(*values: Any) -> str | None:
    for value in values:
        token = _str(value)
        if token:
            return token
    return None


def _preferred(raw: Any) -> tuple[str, ...]:
    """A list or a comma string; blanks and repeats dropped, order kept."""
    items: list[Any] = (
        raw.split(",") if isinstance(raw, str) else list(raw) if isinstance(raw, list | tuple) else []
    )
    out: list[str] = []
    for item in items:
        token = _str(item)
        if token and token not in out:
            out.append(token)
    return tuple(out)


def parse_request(payload: Mapping[str, Any], event_type: str = "") -> IntentRequest | None:
    """The request in ``payload``, or None when there is no text to parse.

    Text: ``text`` or ``utterance``. Webspace: ``webspace_id``, ``workspace_id``, ``_meta.webspace_id``
    (then ``_meta.workspace_id``), default "desktop". Locale: ``locale``, ``request_locale``,
    ``_meta.locale`` (then ``_meta.request_locale``). ``preferred_locales`` from the payload or
    ``_meta``, as a list or a comma string. A missing ``request_id`` is synthesised. ``session_id``
    (or ``_meta.session_id``) is passed through.
    """
    meta_raw = payload.get("_meta")
    meta: dict[str, Any] = dict(meta_raw) if isinstance(meta_raw, Mapping) else {}
    text = _first(payload.get("text"), payload.get("utterance"))
    if text is None:
        return None
    webspace = _first(
        payload.get("webspace_id"),
        payload.get("workspace_id"),
        meta.get("webspace_id"),
        meta.get("workspace_id"),
    )
    locale = _first(
        payload.get("locale"), payload.get("request_locale"), meta.get("locale"), meta.get("request_locale")
    )
    prefs = _preferred(payload.get("preferred_locales") or meta.get("preferred_locales"))
    rid = _str(payload.get("request_id")) or _str(meta.get("request_id"))
    entities = payload.get("entities") if isinstance(payload.get("entities"), Mapping) else None
    if entities is None and isinstance(payload.get("entity_resolution"), Mapping):
        entities = payload["entity_resolution"]
    canon = _str(payload.get("canonicalized_text"))
    session = _first(payload.get("session_id"), meta.get("session_id"))
    return IntentRequest(
        text=text,
        webspace_id=webspace or DEFAULT_WEBSPACE,
        request_id=rid or f"nlu-{uuid.uuid4().hex}",
        locale=locale,
        preferred_locales=prefs,
        meta=meta,
        entities=dict(entities) if entities is not None else None,
        canonicalized_text=canon,
        request_id_synthesized=rid is None,
        event_type=event_type,
        payload=dict(payload),
        session_id=session,
    )


def parse_body(req: IntentRequest) -> dict[str, Any]:
    """The ``POST /parse`` body for a request (contracts §2)."""
    body: dict[str, Any] = {"text": req.text, "webspace_id": req.webspace_id, "request_id": req.request_id}
    if req.session_id:
        body["session_id"] = req.session_id
    if req.locale:
        body["locale"] = req.locale
    if req.preferred_locales:
        body["preferred_locales"] = list(req.preferred_locales)
    if req.entities:
        body["entities"] = req.entities
        normalized = _str(req.entities.get("normalized_text"))
        if normalized and not req.canonicalized_text:
            body["canonicalized_text"] = normalized
    if req.canonicalized_text:
        body["canonicalized_text"] = req.canonicalized_text
    return body


class Deduper:
    """Remembers request ids for ``window_s``; ``seen`` is True for a repeat inside the window."""

    def __init__(
        self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic, limit: int = 100_000
    ):
        self.window_s = window_s
        self.clock = clock
        self.limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def seen(self, request_id: str) -> bool:
        """Record ``request_id``; True if it was already recorded less than ``window_s`` ago."""
        now = self.clock()
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at < self.window_s and len(self._seen) < self.limit:
                break
            del self._seen[oldest]
        if request_id in self._seen:
            return True
        self._seen[request_id] = now
        return False
