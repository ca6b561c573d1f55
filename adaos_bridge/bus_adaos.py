"""AdaOS adapter: handlers on the hub's in-process LocalEventBus, publishing through its emit helper.

Written against the documented API (contracts §3): ``bus.subscribe(type_prefix, handler)``,
``bus.publish(Event(type, payload, source, ts))`` and ``adaos.services.eventbus.emit(bus, type,
payload, source)``, which adds ``_meta.event``. The ``adaos`` package is imported only when present.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from typing import Any

from .bus import BusEvent, Handler

_LOGGER = logging.getLogger(__name__)

EmitFn = Callable[[Any, str, dict[str, Any], str], None]


def adaos_available() -> bool:
    """True when the hub's bus modules can be imported."""
    try:
        importlib.import_module("adaos.services.eventbus")
    except ImportError:
        return False
    return True


def _as_event(evt: Any) -> BusEvent:
    if isinstance(evt, dict):
        return BusEvent(str(evt.get("type", "")), dict(evt.get("payload") or {}))
    payload = getattr(evt, "payload", None)
    return BusEvent(
        type=str(getattr(evt, "type", "")),
        payload=dict(payload) if isinstance(payload, dict) else {},
        source=str(getattr(evt, "source", "") or ""),
        ts=float(getattr(evt, "ts", 0.0) or 0.0),
    )


class AdaosBus:
    """The hub's bus behind the bridge's interface."""

    def __init__(
        self,
        bus: Any,
        *,
        emit: EmitFn | None = None,
        event_cls: Callable[..., Any] | None = None,
        source: str = "nlu.neural",
    ) -> None:
        if emit is None and event_cls is None:
            raise ValueError("AdaosBus needs the emit helper or the Event class")
        self.bus = bus
        self.emit = emit
        self.event_cls = event_cls
        self.source = source

    @classmethod
    def from_adaos(cls, *, bus: Any | None = None, source: str = "nlu.neural") -> AdaosBus:
        """Bind to the running hub: its context's bus (unless given), ``emit`` and ``Event``."""
        eventbus = importlib.import_module("adaos.services.eventbus")
        if bus is None:
            bus = importlib.import_module("adaos.services.agent_context").get_ctx().bus
        emit = getattr(eventbus, "emit", None)
        event_cls = getattr(eventbus, "Event", None)
        if event_cls is None:
            try:
                event_cls = importlib.import_module("adaos.domain").Event
            except (ImportError, AttributeError):
                event_cls = None
        return cls(bus, emit=emit, event_cls=event_cls, source=source)

    async def start(self) -> None:
        """The hub's bus is already running."""

    async def subscribe(self, prefix: str, handler: Handler, *, shared: bool = True) -> None:
        """Register an async handler; the hub runs it as a task on its loop."""

        async def _adapter(evt: Any) -> None:
            await handler(_as_event(evt))

        _adapter.__name__ = f"adaos_bridge:{prefix}"
        self.bus.subscribe(prefix, _adapter)

    async def publish(self, type_: str, payload: dict[str, Any]) -> None:
        """Through ``emit`` (adds ``_meta.event``); without it, an ``Event`` with the same mark."""
        if self.emit is not None:
            self.emit(self.bus, type_, payload, self.source)
            return
        assert self.event_cls is not None
        meta = dict(payload.get("_meta") or {})
        meta.setdefault("event", type_)
        body = {**payload, "_meta": meta}
        self.bus.publish(self.event_cls(type=type_, payload=body, source=self.source, ts=time.time()))

    async def close(self) -> None:
        """The hub owns the bus."""
