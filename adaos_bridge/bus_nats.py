"""NATS adapter: subjects are the event type names, payloads JSON, shared subscriptions in a queue group."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec

from .bus import BusEvent, Handler

_LOGGER = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()


class NatsBus:
    """Core NATS: a subscription to prefix ``p`` listens on ``p`` and ``p.>``.

    Shared subscriptions join ``queue_group``, so bridges on several machines split the requests
    and each request is taken by exactly one of them.
    """

    def __init__(self, url: str, *, queue_group: str = "adaos-nlu-neural", name: str = "adaos-bridge") -> None:
        self.url = url
        self.queue_group = queue_group
        self.name = name
        self.nc: Any = None
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect; reconnects forever after the first success."""
        import nats  # noqa: PLC0415 - optional dependency (the `bridge` extra)

        self.nc = await nats.connect(
            self.url,
            name=self.name,
            connect_timeout=2,
            reconnect_time_wait=0.5,
            max_reconnect_attempts=-1,
            error_cb=self._on_error,
        )
        _LOGGER.info("connected to NATS at %s (queue group %s)", self.url, self.queue_group)

    @staticmethod
    async def _on_error(exc: Exception) -> None:
        _LOGGER.warning("NATS: %s", exc)

    async def subscribe(self, prefix: str, handler: Handler, *, shared: bool = True) -> None:
        """Subscribe to ``prefix`` and everything under it."""
        if self.nc is None:
            raise RuntimeError("NatsBus.start() first")

        async def _on_msg(msg: Any) -> None:
            try:
                payload = msgspec.json.decode(msg.data) if msg.data else {}
            except msgspec.DecodeError:
                _LOGGER.warning("dropping a non-JSON message on %s", msg.subject)
                return
            if not isinstance(payload, dict):
                _LOGGER.warning("dropping a non-object payload on %s", msg.subject)
                return
            # nats-py runs one subscription's callbacks one after another: hand off, so slow
            # requests do not queue behind each other.
            task = asyncio.get_running_loop().create_task(self._run(handler, BusEvent(msg.subject, payload)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        queue = self.queue_group if shared else ""
        subjects = [prefix] if prefix.endswith(">") else [prefix, f"{prefix}.>"]
        for subject in subjects:
            self._subs.append(await self.nc.subscribe(subject, queue=queue, cb=_on_msg))

    @staticmethod
    async def _run(handler: Handler, event: BusEvent) -> None:
        try:
            await handler(event)
        except Exception:  # noqa: BLE001 - keep the subscription alive
            _LOGGER.exception("handler crashed for %s", event.type)

    async def publish(self, type_: str, payload: dict[str, Any]) -> None:
        """Publish the payload as JSON on the subject named after the event type."""
        if self.nc is None:
            raise RuntimeError("NatsBus.start() first")
        await self.nc.publish(type_, _encoder.encode(payload))

    async def flush(self) -> None:
        """Wait until the server has everything published so far."""
        if self.nc is not None:
            await self.nc.flush()

    async def close(self) -> None:
        """Stop taking requests, finish the ones in flight (they still publish), then drain."""
        if self.nc is None:
            return
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may already be gone
                _LOGGER.debug("unsubscribe failed", exc_info=True)
        self._subs.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30)
        if not self.nc.is_closed:
            await self.nc.drain()
        self.nc = None
