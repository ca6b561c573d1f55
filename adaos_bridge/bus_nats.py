"""NATS adapter: subjects are the event type names, payloads JSON, shared subscriptions in a queue group."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from typing import Any

import msgspec

from .bus import BusEvent, Handler

_LOGGER = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()


class NatsBus:
    """Core NATS: a subscription to prefix ``p`` listens on ``p`` and ``p.>``.

    Shared subscriptions join ``queue_group``, so bridges on several machines split the requests
    and each request is taken by exactly one of them. A hub retry of the same request may land on
    another member, so the group also shares its dedup window (:meth:`claim`, a JetStream KV bucket).
    """

    def __init__(
        self,
        url: str,
        *,
        queue_group: str = "adaos-nlu-neural",
        name: str = "adaos-bridge",
        dedup: bool = True,
        dedup_window_s: float = 60.0,
    ) -> None:
        self.url = url
        self.queue_group = queue_group
        self.name = name
        # One bucket per queue group: another deployment's request ids are not ours to drop.
        self.dedup_bucket = re.sub(r"[^A-Za-z0-9_-]", "_", f"{queue_group}-dedup") if dedup else None
        self.dedup_window_s = dedup_window_s
        self.nc: Any = None
        self._kv: Any = None
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
        if self.dedup_bucket:
            await self._open_dedup()

    async def _open_dedup(self) -> None:
        """A KV bucket whose entries live ``dedup_window_s``: the group's shared memory of request ids."""
        try:
            js = self.nc.jetstream(timeout=2)
            try:
                self._kv = await js.key_value(self.dedup_bucket)
            except Exception:  # noqa: BLE001 - not there yet
                self._kv = await js.create_key_value(
                    bucket=self.dedup_bucket, ttl=self.dedup_window_s, history=1
                )
        except Exception as exc:  # noqa: BLE001 - a server without JetStream: per-instance dedup only
            _LOGGER.warning("NATS without JetStream (%s): duplicates are dropped per instance only", exc)
            self._kv = None

    async def claim(self, request_id: str) -> bool:
        """True if this instance is the first of the group to take ``request_id`` within the window.

        When the bucket cannot answer, the request is taken: answering twice beats not answering.
        """
        if self._kv is None:
            return True
        key = hashlib.sha256(request_id.encode()).hexdigest()[:40]
        try:
            await self._kv.create(key, b"1")
        except Exception as exc:  # noqa: BLE001 - KeyWrongLastSequenceError means "already taken"
            if type(exc).__name__ == "KeyWrongLastSequenceError":
                return False
            _LOGGER.debug("dedup claim failed: %s", exc)
        return True

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


class JetStreamFeed:
    """A durable pull consumer: events kept in a stream while this bridge was away, acked once handled.

    Used for ``nlp.teacher.example.save`` when the teacher publishes into a stream: every bridge
    instance has its own durable name, so each one's overlay gets every example.
    """

    def __init__(self, url: str, stream: str, subject: str, durable: str) -> None:
        self.url = url
        self.stream = stream
        self.subject = subject
        self.durable = re.sub(r"[^A-Za-z0-9_-]", "_", durable)
        self._nc: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, handler: Handler) -> None:
        """Connect, make sure the stream exists, consume in the background."""
        import nats  # noqa: PLC0415 - optional dependency (the `bridge` extra)
        from nats.js.errors import NotFoundError  # noqa: PLC0415

        self._nc = await nats.connect(self.url, connect_timeout=2, max_reconnect_attempts=-1)
        js = self._nc.jetstream(timeout=5)
        try:
            await js.stream_info(self.stream)
        except NotFoundError:
            await js.add_stream(name=self.stream, subjects=[self.subject])
        sub = await js.pull_subscribe(self.subject, durable=self.durable, stream=self.stream)
        self._task = asyncio.get_running_loop().create_task(self._consume(sub, handler))

    async def _consume(self, sub: Any, handler: Handler) -> None:
        from nats.errors import TimeoutError as NatsTimeout  # noqa: PLC0415

        while True:
            try:
                msgs = await sub.fetch(16, timeout=1.0)
            except (NatsTimeout, TimeoutError):
                continue
            except Exception as exc:  # noqa: BLE001 - reconnecting; try again shortly
                _LOGGER.debug("feed fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                try:
                    payload = msgspec.json.decode(msg.data)
                    if isinstance(payload, dict):
                        await handler(BusEvent(msg.subject, payload))
                except Exception:  # noqa: BLE001 - a poison message is acked and logged, not looped on
                    _LOGGER.exception("dropping an unusable message from %s", self.stream)
                await msg.ack()

    async def close(self) -> None:
        """Stop consuming and disconnect."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()
        self._nc = None
