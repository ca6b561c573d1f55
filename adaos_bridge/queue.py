"""The durable teacher queue: SQLite in WAL mode, bounded, one writer thread, counted drops.

A miss is committed here before the bridge emits anything for it, and leaves only when the
teacher acknowledged it (or refused it for good). The database survives a SIGKILL: a commit with
``synchronous=FULL`` is on disk before ``put`` returns.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS misses (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS misses_due ON misses (next_at, id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
COUNTERS = ("enqueued", "duplicates", "delivered", "dropped_overflow", "dropped_refused")


class QueueLocked(RuntimeError):
    """Another bridge process already owns this queue."""


class QueuedMiss(msgspec.Struct, frozen=True):
    """One row waiting for delivery."""

    id: int
    key: str
    body: dict[str, Any]
    attempts: int
    created_at: float


class SqliteQueue:
    """All SQLite work runs on one private thread; the async methods never block the loop."""

    def __init__(self, path: Path | str, *, max_items: int = 10_000, sync: str = "full") -> None:
        self.path = Path(path)
        self.max_items = max_items
        self.sync = sync.upper()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-queue")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._pending = 0
        self.added = asyncio.Event()

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> None:
        """Take the lock file, open the database, count what survived the last run."""
        await self._call(self._open)
        if self._pending:
            _LOGGER.info("teacher queue: %d misses from the previous run to deliver", self._pending)
            self.added.set()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise QueueLocked(f"{self.path} is used by another bridge process") from exc
        self._lock_fd = fd
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'FULL' else 'NORMAL'}")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        # A restart is a good moment to try again: whatever waited for its backoff is due now.
        db.execute("UPDATE misses SET next_at = 0 WHERE next_at > 0")
        self._db = db
        self._pending = int(db.execute("SELECT COUNT(*) FROM misses").fetchone()[0])

    async def close(self) -> None:
        """Checkpoint and close; release the lock."""
        await self._call(self._close)
        self._pool.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def pending(self) -> int:
        """Rows waiting (as of the last operation)."""
        return self._pending

    async def put(self, key: str, body: dict[str, Any]) -> bool:
        """Commit a miss; False when the key is already queued. Over ``max_items`` the oldest go."""
        added = await self._call(self._put, key, json.dumps(body, ensure_ascii=False), time.time())
        if added:
            self.added.set()
        return bool(added)

    def _bump(self, db: sqlite3.Connection, name: str, amount: int = 1) -> None:
        db.execute(
            "INSERT INTO counters(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )

    def _put(self, key: str, body: str, now: float) -> bool:
        db = self._require()
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute(
                "INSERT OR IGNORE INTO misses(key, body, created_at, next_at) VALUES (?, ?, ?, 0)",
                (key, body, now),
            )
            added = cur.rowcount == 1
            self._bump(db, "enqueued" if added else "duplicates")
            overflow = self._pending + (1 if added else 0) - self.max_items
            if overflow > 0:
                # Drop the oldest: a fresh miss says more about today's model than a stale one.
                db.execute(
                    "DELETE FROM misses WHERE id IN (SELECT id FROM misses ORDER BY id LIMIT ?)", (overflow,)
                )
                self._bump(db, "dropped_overflow", overflow)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite already rolled back on SQLITE_FULL: keep its error, not ours
                db.execute("ROLLBACK")
            raise
        self._pending += (1 if added else 0) - max(0, overflow)
        if overflow > 0:
            _LOGGER.warning("teacher queue full (%d): dropped the %d oldest", self.max_items, overflow)
        return added

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("SqliteQueue.open() first")
        return self._db

    async def due(self, limit: int, now: float | None = None) -> list[QueuedMiss]:
        """Rows whose next attempt is due, oldest first."""
        return list(await self._call(self._due, limit, time.time() if now is None else now))

    def _due(self, limit: int, now: float) -> list[QueuedMiss]:
        rows = (
            self._require()
            .execute(
                "SELECT id, key, body, attempts, created_at FROM misses "
                "WHERE next_at <= ? ORDER BY id LIMIT ?",
                (now, limit),
            )
            .fetchall()
        )
        return [QueuedMiss(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]

    async def next_due_in(self, now: float | None = None) -> float | None:
        """Seconds until the next row is due (0 if one is due now), None if the queue is empty."""
        return await self._call(self._next_due_in, time.time() if now is None else now)

    def _next_due_in(self, now: float) -> float | None:
        row = self._require().execute("SELECT MIN(next_at) FROM misses").fetchone()
        return None if row[0] is None else max(0.0, float(row[0]) - now)

    async def ack(self, ids: list[int]) -> None:
        """Delivered: remove and count."""
        await self._call(self._remove, ids, "delivered")

    async def refuse(self, ids: list[int]) -> None:
        """The teacher refused for good (bad request): remove and count."""
        await self._call(self._remove, ids, "dropped_refused")

    def _remove(self, ids: list[int], counter: str) -> None:
        if not ids:
            return
        db = self._require()
        db.execute("BEGIN IMMEDIATE")
        try:
            marks = ",".join("?" * len(ids))
            removed = db.execute(f"DELETE FROM misses WHERE id IN ({marks})", ids).rowcount  # noqa: S608
            self._bump(db, counter, removed)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite already rolled back on SQLITE_FULL: keep its error, not ours
                db.execute("ROLLBACK")
            raise
        self._pending -= removed

    async def retry_later(self, row_id: int, delay_s: float, error: str) -> None:
        """Count the attempt and schedule the next one."""
        await self._call(self._retry_later, row_id, time.time() + delay_s, error[:500])

    def _retry_later(self, row_id: int, next_at: float, error: str) -> None:
        self._require().execute(
            "UPDATE misses SET attempts = attempts + 1, next_at = ?, last_error = ? WHERE id = ?",
            (next_at, error, row_id),
        )

    async def stats(self) -> dict[str, int]:
        """Counters since the queue file was created, plus ``pending``."""
        return dict(await self._call(self._stats))

    def _stats(self) -> dict[str, int]:
        rows = dict(self._require().execute("SELECT name, value FROM counters").fetchall())
        out = {name: int(rows.get(name, 0)) for name in COUNTERS}
        out["pending"] = self._pending
        return out
