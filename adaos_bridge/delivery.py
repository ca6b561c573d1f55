"""At-least-once delivery of queued misses to the teacher (HTTP with a token, or a JetStream stream)."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import random
from typing import Any, Protocol

import aiohttp

from .queue import QueuedMiss, SqliteQueue

_LOGGER = logging.getLogger(__name__)


class Sent(enum.StrEnum):
    """What a sink says about one attempt."""

    OK = "ok"  # stored by the teacher (or already had it: same idempotency key)
    RETRY = "retry"  # try again later
    REFUSED = "refused"  # the teacher will never take this one


class TeacherSink(Protocol):
    """Where misses go."""

    async def start(self) -> None:
        """Connect."""

    async def send(self, key: str, body: dict[str, Any]) -> tuple[Sent, str]:
        """One attempt; returns the outcome and a detail for the log."""

    async def close(self) -> None:
        """Disconnect."""


class HttpTeacherSink:
    """``POST <url>`` with ``Authorization: Bearer <token>`` and ``Idempotency-Key: <key>``.

    2xx and 409 (already stored) count as delivered; 400/413/422 as refused for good; anything else
    (5xx, 401/403 while a token is being fixed, connection errors, timeouts) is retried.
    """

    REFUSED_STATUSES = frozenset({400, 413, 422})

    def __init__(self, url: str, token: str | None, *, timeout_s: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the session."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def send(self, key: str, body: dict[str, Any]) -> tuple[Sent, str]:
        """One POST."""
        if self._session is None:
            await self.start()
        assert self._session is not None
        headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body, ensure_ascii=False).encode()
        try:
            async with self._session.post(self.url, data=data, headers=headers) as resp:
                status = resp.status
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Sent.RETRY, f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300 or status == 409:
            return Sent.OK, f"HTTP {status}"
        if status in self.REFUSED_STATUSES:
            return Sent.REFUSED, f"HTTP {status}"
        return Sent.RETRY, f"HTTP {status}"

    async def close(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class JetStreamTeacherSink:
    """Publishes to a JetStream stream with ``Nats-Msg-Id`` = the idempotency key.

    The server drops repeats within the stream's duplicate window; the teacher should still check
    the header for repeats older than that window (at-least-once).
    """

    def __init__(self, url: str, stream: str, subject: str = "nlu.teacher.miss", *, timeout_s: float = 5.0):
        self.url = url
        self.stream = stream
        self.subject = subject
        self.timeout_s = timeout_s
        self._nc: Any = None
        self._js: Any = None

    async def start(self) -> None:
        """Connect and make sure the stream exists."""
        import nats  # noqa: PLC0415 - optional dependency (the `bridge` extra)
        from nats.js.errors import NotFoundError  # noqa: PLC0415

        self._nc = await nats.connect(
            self.url, connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.5
        )
        self._js = self._nc.jetstream(timeout=self.timeout_s)
        try:
            await self._js.stream_info(self.stream)
        except NotFoundError:
            await self._js.add_stream(name=self.stream, subjects=[self.subject])

    async def send(self, key: str, body: dict[str, Any]) -> tuple[Sent, str]:
        """One publish, acknowledged by the stream."""
        if self._js is None:
            try:
                await self.start()
            except Exception as exc:  # noqa: BLE001 - NATS down: retry later
                return Sent.RETRY, f"connect: {exc}"
        try:
            ack = await self._js.publish(
                self.subject, json.dumps(body, ensure_ascii=False).encode(), headers={"Nats-Msg-Id": key}
            )
        except Exception as exc:  # noqa: BLE001 - every publish failure is retried
            return Sent.RETRY, f"{type(exc).__name__}: {exc}"
        return Sent.OK, "duplicate" if getattr(ack, "duplicate", False) else f"seq {ack.seq}"

    async def close(self) -> None:
        """Disconnect."""
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()
        self._nc = self._js = None


class Deliverer:
    """Drains the queue into a sink: due rows oldest first, exponential backoff with jitter per row."""

    def __init__(
        self,
        queue: SqliteQueue,
        sink: TeacherSink,
        *,
        batch: int = 32,
        parallel: int = 4,
        backoff_s: float = 0.5,
        backoff_max_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.queue = queue
        self.sink = sink
        self.batch = batch
        self.parallel = parallel
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Run in the background."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish the batch in flight and stop; undelivered rows stay queued."""
        self._stopping = True
        self.queue.added.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.sink.close()

    def _delay(self, attempts: int) -> float:
        capped = min(self.backoff_max_s, self.backoff_s * (2 ** min(attempts, 20)))
        return self.rng.uniform(capped / 2, capped)

    async def _run(self) -> None:
        try:
            await self.sink.start()
        except Exception as exc:  # noqa: BLE001 - the sink retries its connection on send
            _LOGGER.warning("teacher sink not reachable yet: %s", exc)
        while not self._stopping:
            try:
                sent = await self.deliver_due()
            except Exception:  # noqa: BLE001 - keep delivering; the rows are safe in SQLite
                _LOGGER.exception("teacher delivery failed")
                sent = 0
            if sent:
                continue
            self.queue.added.clear()  # before looking: a put from now on wakes us
            wait = await self.queue.next_due_in()
            try:
                await asyncio.wait_for(
                    self.queue.added.wait(), timeout=min(wait if wait is not None else 5.0, 5.0)
                )
            except TimeoutError:
                pass

    async def deliver_due(self) -> int:
        """One pass over the due rows; returns how many were delivered or refused."""
        rows = await self.queue.due(self.batch)
        if not rows:
            return 0
        slots = asyncio.Semaphore(self.parallel)

        async def one(row: QueuedMiss) -> tuple[QueuedMiss, Sent, str]:
            async with slots:
                outcome, detail = await self.sink.send(row.key, row.body)
            return row, outcome, detail

        results = await asyncio.gather(*(one(r) for r in rows))
        await self.queue.ack([r.id for r, outcome, _ in results if outcome is Sent.OK])
        for row, outcome, detail in results:
            if outcome is Sent.REFUSED:
                _LOGGER.error("teacher refused miss %s for good (%s); dropped", row.key, detail)
        await self.queue.refuse([r.id for r, outcome, _ in results if outcome is Sent.REFUSED])
        for row, outcome, detail in results:
            if outcome is Sent.RETRY:
                await self.queue.retry_later(row.id, self._delay(row.attempts), detail)
                _LOGGER.debug("teacher delivery of %s failed (%s); retrying", row.key, detail)
        return sum(1 for _, outcome, _ in results if outcome is not Sent.RETRY)
