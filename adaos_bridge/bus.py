"""The small bus interface every adapter implements, and the in-memory bus for tests and embedding."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

_LOGGER = logging.getLogger(__name__)


class BusEvent(msgspec.Struct, frozen=True):
    """One event as the bridge sees it, whatever the transport."""

    type: str
    payload: dict[str, Any]
    source: str = ""
    ts: float = 0.0


Handler = Callable[[BusEvent], Awaitable[None]]


class Bus(Protocol):
    """Subscribe by event-type prefix, publish by event type.

    ``shared=True`` marks a subscription whose events one instance of a group should take (a NATS
    queue group); ``shared=False`` means every instance gets every event (feedback, for example).
    Adapters without groups ignore it. An adapter whose instances share a group may also offer
    ``async claim(request_id) -> bool`` so the group drops duplicates together (see ``NatsBus``).
    """

    async def start(self) -> None:
        """Connect."""

    async def subscribe(self, prefix: str, handler: Handler, *, shared: bool = True) -> None:
        """Call ``handler`` for every event whose type starts with ``prefix``."""

    async def publish(self, type_: str, payload: dict[str, Any]) -> None:
        """Publish one event."""

    async def close(self) -> None:
        """Flush and disconnect."""


def matches(prefix: str, type_: str) -> bool:
    """The hub's rule: ``""`` and ``"*"`` match everything, otherwise a string prefix."""
    return prefix in ("", "*") or type_.startswith(prefix)


class InMemoryBus:
    """An in-process bus with the hub's semantics: handlers run as tasks, publish never blocks."""

    def __init__(self, source: str = "") -> None:
        self.source = source
        self._subs: list[tuple[str, Handler]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Nothing to connect."""

    async def subscribe(self, prefix: str, handler: Handler, *, shared: bool = True) -> None:
        """Register a handler for a prefix."""
        self._subs.append((prefix, handler))

    async def publish(self, type_: str, payload: dict[str, Any]) -> None:
        """Schedule every matching handler."""
        self.publish_nowait(type_, payload)

    def publish_nowait(self, type_: str, payload: dict[str, Any], source: str | None = None) -> None:
        """Publish from synchronous code (tests, embedding)."""
        event = BusEvent(type_, payload, source if source is not None else self.source, time.time())
        for prefix, handler in list(self._subs):
            if matches(prefix, type_):
                task = asyncio.get_running_loop().create_task(self._run(handler, event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(handler: Handler, event: BusEvent) -> None:
        try:
            await handler(event)
        except Exception:  # noqa: BLE001 - one bad handler must not break the bus
            _LOGGER.exception("handler crashed for %s", event.type)

    async def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until every spawned handler task is done (handlers may publish more)."""
        deadline = time.monotonic() + timeout
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.wait(list(self._tasks), timeout=remaining)
        return True

    async def close(self) -> None:
        """Let running handlers finish."""
        await self.wait_idle()


class Recorder:
    """Collects events of given prefixes; tests and the bench wait on it."""

    def __init__(self) -> None:
        self.events: list[BusEvent] = []
        self._changed = asyncio.Condition()

    async def __call__(self, event: BusEvent) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def of(self, type_: str) -> list[BusEvent]:
        """Events of exactly this type."""
        return [e for e in self.events if e.type == type_]

    async def wait_for(self, predicate: Callable[[list[BusEvent]], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate(events)`` holds."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self.events)), timeout)
            except TimeoutError:
                return False
        return True
