"""Session context: the last accepted frames (and an open clarification) per scope, for a short TTL.

Memory is bounded three ways: at most ``max_sessions`` scopes (least recently updated evicted first),
at most ``frames`` frames per scope, and nothing older than ``ttl_s``: every item carries the time it
was stored and is dropped, text and all, once it is older than the TTL (on access, and by
:meth:`SessionStore.sweep`, which the service calls periodically so an idle service keeps no text).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import msgspec

from ..canonicalize import Canonical


class Frame(msgspec.Struct, frozen=True):
    """One accepted request: what a follow-up can lean on."""

    intent: str
    slots: dict[str, Any]
    request_id: str
    segment_index: int
    canonical: Canonical  # the (possibly rewritten) utterance that was accepted: the template of a rewrite
    at: float


class Pending(msgspec.Struct, frozen=True):
    """An abstention the service asked about (``clarify``); the next turn may answer it."""

    request_id: str
    question_kind: str  # which_intent | which_entity
    candidates: tuple[str, ...]  # intents, or entity refs
    canonical: Canonical  # the utterance the question is about
    at: float
    intent: str | None = None  # which_entity: the intent whose slot is ambiguous
    span: tuple[int, int] | None = None  # which_entity: offsets of the ambiguous span in canonical.normalized
    same_domain: bool = False  # which_intent: the candidates share a domain
    refers_to: str | None = None  # which_entity after a follow-up: the frame the follow-up updated


class Snapshot(msgspec.Struct, frozen=True):
    """What one request sees of its scope: frames newest first, and the open clarification."""

    frames: tuple[Frame, ...] = ()
    pending: Pending | None = None


class _Session:
    __slots__ = ("frames", "pending", "updated")

    def __init__(self, frames: int) -> None:
        self.frames: deque[Frame] = deque(maxlen=frames)
        self.pending: Pending | None = None
        self.updated = 0.0

    def prune(self, oldest: float) -> None:
        while self.frames and self.frames[0].at < oldest:
            self.frames.popleft()
        if self.pending is not None and self.pending.at < oldest:
            self.pending = None

    def empty(self) -> bool:
        return not self.frames and self.pending is None


class SessionStore:
    """Thread-safe (the parse handler runs in a thread pool); every operation is O(1) amortized."""

    def __init__(
        self,
        ttl_s: float = 90.0,
        *,
        max_sessions: int = 10_000,
        frames: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max(1, max_sessions)
        self.frames = max(1, frames)
        self.clock = clock
        self.evicted = 0
        self.expired = 0
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently updated first
        self._expiry: deque[tuple[float, str]] = deque()  # (stored at, scope), in time order
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def now(self) -> float:
        """The store's clock (tests drive it)."""
        return self.clock()

    def get(self, scope: str | None) -> Snapshot:
        """The live frames and clarification of ``scope`` (empty for no scope)."""
        if not scope or self.ttl_s <= 0:
            return Snapshot()
        with self._lock:
            now = self.clock()
            self._sweep_locked(now)
            session = self._sessions.get(scope)
            if session is None:
                return Snapshot()
            session.prune(now - self.ttl_s)
            return Snapshot(tuple(reversed(session.frames)), session.pending)

    def update(self, scope: str | None, frames: list[Frame], pending: Pending | None) -> None:
        """Append this turn's accepted frames and replace the open clarification (None closes it)."""
        if not scope or self.ttl_s <= 0:
            return
        with self._lock:
            now = self.clock()
            self._sweep_locked(now)
            session = self._sessions.get(scope)
            if session is None:
                if not frames and pending is None:
                    return
                session = self._sessions[scope] = _Session(self.frames)
            session.frames.extend(frames)
            session.pending = pending
            session.updated = now
            self._sessions.move_to_end(scope)
            if session.empty():
                del self._sessions[scope]
                return
            self._expiry.append((now, scope))
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
                self.evicted += 1
            if len(self._expiry) > 4 * self.max_sessions * (self.frames + 1):
                self._compact_locked()

    def sweep(self) -> int:
        """Drop everything older than the TTL now; returns how many scopes went away."""
        with self._lock:
            return self._sweep_locked(self.clock())

    def _sweep_locked(self, now: float) -> int:
        oldest = now - self.ttl_s
        gone = 0
        while self._expiry and self._expiry[0][0] < oldest:
            _, scope = self._expiry.popleft()
            session = self._sessions.get(scope)
            if session is None:
                continue
            session.prune(oldest)
            if session.empty():
                del self._sessions[scope]
                gone += 1
        self.expired += gone
        return gone

    def _compact_locked(self) -> None:
        """Rebuild the expiry queue from what is live (it only grows past its bound under a flood)."""
        items = sorted(
            (t, scope)
            for scope, s in self._sessions.items()
            for t in {f.at for f in s.frames} | ({s.pending.at} if s.pending else set())
        )
        self._expiry = deque(items)

    def stats(self) -> dict[str, Any]:
        """Counts for /health."""
        with self._lock:
            return {
                "sessions": len(self._sessions),
                "ttl_s": self.ttl_s,
                "max_sessions": self.max_sessions,
                "evicted": self.evicted,
                "expired": self.expired,
            }
