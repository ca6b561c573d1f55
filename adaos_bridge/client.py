"""The service client: one deadline per call, retries on connection errors, a slot limit, a breaker."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec

_LOGGER = logging.getLogger(__name__)


class ServiceReply(msgspec.Struct, frozen=True):
    """The wire result of ``POST /parse`` (contracts §2 plus the service's decision fields)."""

    top_intent: str = ""
    confidence: float = 0.0
    alternatives: list[dict[str, Any]] = msgspec.field(default_factory=list)
    slots: dict[str, Any] = msgspec.field(default_factory=dict)
    via: str = "neural"
    model_id: str | None = None
    evidence: dict[str, Any] = msgspec.field(default_factory=dict)
    decision: str | None = None
    reason: str | None = None
    locale: str | None = None
    stages: list[dict[str, Any]] = msgspec.field(default_factory=list)
    request_id: str | None = None
    raw: dict[str, Any] = msgspec.field(default_factory=dict)  # the result exactly as received


class CallFailed(Exception):
    """The service gave no usable answer. ``kind`` says why (timeout, connection, circuit_open...)."""

    def __init__(self, kind: str, detail: str = "", *, code: str | None = None) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail
        self.code = code  # the service's error code for a 4xx/5xx JSON answer


class BreakerState(enum.StrEnum):
    """Closed: calls go through. Open: calls fail fast. Half-open: one trial call decides."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failures`` consecutive failures; lets one trial call through after ``reset_s``."""

    def __init__(self, failures: int = 5, reset_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.threshold = max(1, failures)
        self.reset_s = reset_s
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self.opens = 0
        self._trial_running = False

    def allow(self) -> bool:
        """May a call go out now? In half-open state only one trial at a time."""
        if self.state is BreakerState.OPEN:
            if self.clock() - self.opened_at < self.reset_s:
                return False
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            if self._trial_running:
                return False
            self._trial_running = True
        return True

    def success(self) -> None:
        """A call got an answer: close."""
        self.state = BreakerState.CLOSED
        self.consecutive = 0
        self._trial_running = False

    def failure(self) -> None:
        """A call failed: count, and open at the threshold (or at once when a trial fails)."""
        self._trial_running = False
        self.consecutive += 1
        if self.state is BreakerState.HALF_OPEN or self.consecutive >= self.threshold:
            if self.state is not BreakerState.OPEN:
                self.opens += 1
                _LOGGER.warning("circuit open after %d failures", self.consecutive)
            self.state = BreakerState.OPEN
            self.opened_at = self.clock()

    def release(self) -> None:
        """A call ended without saying anything about the service's health (cancelled)."""
        self._trial_running = False


def _retryable(exc: BaseException) -> bool:
    """Connection errors (refused, reset, a stale keep-alive socket); never a timeout."""
    return isinstance(exc, aiohttp.ClientConnectionError | ConnectionError) and not isinstance(
        exc, TimeoutError
    )


class ServiceClient:
    """``POST /parse`` with a whole-call deadline; the breaker makes a dead service fail fast."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 6.0,
        retries: int = 2,
        retry_base_s: float = 0.05,
        max_concurrency: int = 2,
        breaker: CircuitBreaker | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_base_s = retry_base_s
        self.slots = asyncio.Semaphore(max_concurrency)
        self.breaker = breaker or CircuitBreaker()
        self.rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._decoder = msgspec.json.Decoder()

    async def start(self) -> None:
        """Open the connection pool (keep-alive to the service)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None),
            )

    async def close(self) -> None:
        """Close the pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def parse(self, body: dict[str, Any]) -> ServiceReply:
        """One call under one deadline; raises :class:`CallFailed`."""
        if not self.breaker.allow():
            raise CallFailed("circuit_open", f"{self.base_url} failed {self.breaker.consecutive} times")
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.slots:
                    reply = await self._attempts(body)
        except TimeoutError:
            self.breaker.failure()
            raise CallFailed("timeout", f"no answer within {self.timeout_s:g} s") from None
        except CallFailed as exc:
            if exc.kind == "bad_request":  # the service is alive; the input was wrong
                self.breaker.success()
            else:
                self.breaker.failure()
            raise
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.success()
        return reply

    async def _attempts(self, body: dict[str, Any]) -> ServiceReply:
        await self.start()
        attempt = 0
        while True:
            try:
                return await self._post(body)
            except (aiohttp.ClientError, ConnectionError) as exc:
                if isinstance(exc, TimeoutError):
                    raise
                if not _retryable(exc):
                    raise CallFailed("client_error", f"{type(exc).__name__}: {exc}") from exc
                if attempt >= self.retries:
                    raise CallFailed("connection", str(exc) or type(exc).__name__) from exc
            # Full jitter: spread the retries of many requests hitting the same restart.
            await asyncio.sleep(self.rng.uniform(0, self.retry_base_s * (2**attempt)))
            attempt += 1

    async def _post(self, body: dict[str, Any]) -> ServiceReply:
        assert self._session is not None
        async with self._session.post(f"{self.base_url}/parse", json=body) as resp:
            raw = await resp.read()
            status = resp.status
        try:
            data = self._decoder.decode(raw)
        except msgspec.DecodeError:
            data = None
        if status >= 400:
            code = data.get("error") if isinstance(data, dict) else None
            kind = "bad_request" if 400 <= status < 500 else "http_error"
            raise CallFailed(kind, f"HTTP {status}", code=code if isinstance(code, str) else f"http_{status}")
        if not isinstance(data, dict):
            raise CallFailed("bad_response", "not a JSON object")
        inner = data.get("result")
        result: dict[str, Any] = inner if isinstance(inner, dict) else data
        merged = {**result, **{k: data[k] for k in ("decision", "reason", "locale", "stages") if k in data}}
        merged.pop("raw", None)
        try:
            reply = msgspec.convert(merged, ServiceReply, strict=False)
        except msgspec.ValidationError as exc:
            raise CallFailed("bad_response", str(exc)) from exc
        return msgspec.structs.replace(reply, raw=merged)

    async def health(self) -> dict[str, Any] | None:
        """``GET /health`` or None."""
        await self.start()
        assert self._session is not None
        try:
            async with asyncio.timeout(min(self.timeout_s, 2.0)):
                async with self._session.get(f"{self.base_url}/health") as resp:
                    data = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return data if isinstance(data, dict) else None
