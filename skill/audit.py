"""Decision audit log: one JSON line per /parse decision, written by a background thread, rotated by size."""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import msgspec
from aiohttp import web

from .canonicalize import Canonical
from .config import Config
from .pipeline import ParseResult
from .values import tokenize

_LOGGER = logging.getLogger(__name__)

AUDIT_FILE = "nlu_decisions.jsonl"
SCHEMA_VERSION = 1
MAX_CANDIDATES = 5
_BATCH = 256  # records written per flush at most
Privacy = Literal["text", "hash", "none"]
# Evidence keys the pipeline copies from canonicalization: the record keeps them under "canonical".
_CANONICAL_KEYS = frozenset({"canonicalized_text", "entities", "ambiguities"})
# Evidence strings that come from the catalog or the model, never from the user's input.
_SAFE_STRING_KEYS = frozenset({"rule", "pattern", "matched_examples", "model_id", "intent"})


class Entry(NamedTuple):
    """What the hot path hands over: immutable references only; formatting happens later."""

    ts: float
    request_id: str
    result: ParseResult
    answered_intent: str  # what the hub saw on the wire ("" = abstain)
    answered_confidence: float
    total_ms: float
    # The conversation layer: session_id, scope, segment {index, of, start, end}, context, the words said.
    conversation: dict[str, Any] | None = None


def canonicalization_result(canonical: Canonical) -> str:
    """One label per request: ``ambiguity``, ``unresolved``, ``hit`` (entities or values found), ``miss``."""
    if canonical.ambiguities:
        return "ambiguity"
    if canonical.unresolved:
        return "unresolved"
    return "hit" if canonical.entities else "miss"


def text_hash(canonical: Canonical) -> str:
    """A stable pseudonym of the input: sha256 of the normalized text (not anonymous for short phrases)."""
    return hashlib.sha256(canonical.normalized.encode("utf-8")).hexdigest()[:16]


def _scrub(value: Any, key: str = "") -> Any:
    """Evidence without strings that may carry the user's words (hash / none privacy)."""
    if isinstance(value, dict):
        return {k: v for k, v in ((k, _scrub(v, str(k))) for k, v in value.items()) if v is not None}
    if isinstance(value, list | tuple):
        return [_scrub(v, key) for v in value]
    if isinstance(value, str):
        return value if key in _SAFE_STRING_KEYS else None
    return value


def _canonical_part(c: Canonical, privacy: Privacy) -> dict[str, Any]:
    keep_text = privacy == "text"
    entities = []
    for e in c.entities:
        item: dict[str, Any] = {"placeholder": e.placeholder, "kind": e.kind, "match_type": e.match_type}
        if e.ref:
            item["ref"] = e.ref
        if keep_text:
            item["text"] = e.text
            if not e.ref:
                item["value"] = e.value
        entities.append(item)
    part: dict[str, Any] = {"result": canonicalization_result(c), "entities": entities}
    part["ambiguities"] = [
        {"text": a.text, "candidates": list(a.candidates)}
        if keep_text
        else {"candidates": list(a.candidates)}
        for a in c.ambiguities
    ]
    part["unresolved"] = list(c.unresolved) if keep_text else len(c.unresolved)
    if keep_text:
        part["masked"] = c.masked
    return part


def to_record(entry: Entry, privacy: Privacy) -> dict[str, Any]:
    """The audit line of one decision (plain JSON types), honouring the privacy setting."""
    res = entry.result
    d, c = res.decision, res.canonical
    record: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "ts": _dt.datetime.fromtimestamp(entry.ts, _dt.UTC).isoformat(timespec="milliseconds"),
        "request_id": entry.request_id,
        "model_id": res.model_id,
        "locale": c.locale,
    }
    conv = entry.conversation or {}
    said = conv.get("text")  # a follow-up's own words; the result's canonical is the completed request
    if privacy == "text":
        record["text"] = said if said is not None else c.text
    elif privacy == "hash":
        record["text_sha256"] = (
            hashlib.sha256(" ".join(tokenize(said)).encode("utf-8")).hexdigest()[:16]
            if said is not None
            else text_hash(c)
        )
    for key in ("session_id", "scope", "segment", "context", "clarify"):
        if conv.get(key) is not None:
            record[key] = conv[key]
    candidates = [(d.intent, d.confidence)] if d.intent else []
    candidates += [(a.intent, a.confidence) for a in d.alternatives]
    evidence = {k: v for k, v in d.evidence.items() if k not in _CANONICAL_KEYS}
    record.update(
        decision=d.outcome.value,
        intent=d.intent,
        confidence=round(d.confidence, 4),
        via=d.via,
        reason=d.reason,
        answered={"intent": entry.answered_intent, "confidence": entry.answered_confidence},
        candidates=[{"intent": i, "confidence": round(p, 4)} for i, p in candidates[:MAX_CANDIDATES]],
        total_ms=round(entry.total_ms, 3),
        stages=[
            {
                "stage": s.stage,
                "outcome": s.outcome,
                "ms": s.ms,
                "intent": s.intent,
                "confidence": s.confidence,
                "reason": s.reason,
            }
            for s in res.stages
        ],
        canonical=_canonical_part(c, privacy),
        evidence=evidence if privacy == "text" else _scrub(evidence),
    )
    return record


class AuditWriter:
    """A bounded queue drained by one thread into a size-rotated JSONL file.

    ``submit`` never blocks and never raises: a full queue drops the record (warned once), a failing
    disk fails the batch (logged once per outage); both are counted for ``/metrics``.
    """

    def __init__(
        self, path: Path, *, max_bytes: int, backups: int, queue_size: int, privacy: Privacy
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.privacy = privacy
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._queue: queue.Queue[Entry | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._stream: IO[bytes] | None = None
        self._size = 0
        self._failing = False
        self._dropping = False
        self._encoder = msgspec.json.Encoder()

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nlu-audit", daemon=True)
            self._thread.start()

    def submit(self, entry: Entry) -> None:
        """Queue one decision; drops it (counted) when the writer is behind."""
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.dropped += 1
            if not self._dropping:  # once: the metric counts the rest
                self._dropping = True
                _LOGGER.warning(
                    "audit queue full: dropping decision records (counted in nlu_audit_records_total)"
                )

    def close(self, timeout: float = 5.0) -> None:
        """Drain what is queued, stop the thread and close the file."""
        if self._thread is not None:
            try:  # behind the backlog, so what is queued gets written first
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                _LOGGER.warning(
                    "audit writer did not drain in %.1f s; %d records lost", timeout, self._queue.qsize()
                )
            self._thread.join(timeout)
            self._thread = None
        self._close_stream()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < _BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._write(batch)
            if stop:
                return

    def _encode(self, batch: list[Entry]) -> list[bytes]:
        lines = []
        for entry in batch:
            try:
                lines.append(self._encoder.encode(to_record(entry, self.privacy)) + b"\n")
            except Exception as exc:  # noqa: BLE001 - a strange evidence value must not stop the writer
                self.failed += 1
                _LOGGER.error("cannot encode audit record %s: %s", entry.request_id, exc)
        return lines

    def _write(self, batch: list[Entry]) -> None:
        lines = self._encode(batch)
        pending = 0  # lines in the file buffer, not on disk yet
        done = 0  # lines of this batch handled so far
        try:
            for line in lines:
                stream = self._open()
                if self._size and self._size + len(line) > self.max_bytes:
                    self._rotate()  # closing the old file flushed what was pending
                    self.written += pending
                    pending = 0
                    stream = self._open()
                stream.write(line)
                self._size += len(line)
                pending += 1
                done += 1
            if self._stream is not None:
                self._stream.flush()
        except OSError as exc:
            self.failed += pending + len(lines) - done
            self._close_stream()
            if not self._failing:  # once per outage: the metric counts every lost record
                self._failing = True
                _LOGGER.error(
                    "audit log %s: write failed (%s); records are counted as failed", self.path, exc
                )
            return
        self.written += pending
        if self._failing:
            self._failing = False
            _LOGGER.info("audit log %s: writing again", self.path)

    def _open(self) -> IO[bytes]:
        if self._stream is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(self.path, "ab")  # noqa: SIM115 - kept open across batches
            self._size = os.fstat(self._stream.fileno()).st_size
            if self._size:
                self._cut_torn_tail()
        return self._stream

    def _cut_torn_tail(self) -> None:
        """A full disk or a kill mid-flush can leave half a line: cut it, or the next line merges into it."""
        assert self._stream is not None
        with open(self.path, "rb") as fh:
            fh.seek(self._size - 1)
            if fh.read(1) == b"\n":
                return
            end = self._size
            while end > 0:  # back to the last newline, 64 KiB at a time
                start = max(0, end - 65536)
                fh.seek(start)
                idx = fh.read(end - start).rfind(b"\n")
                if idx >= 0:
                    end = start + idx + 1
                    break
                end = start
        os.ftruncate(self._stream.fileno(), end)  # appends (O_APPEND) continue from the new end
        _LOGGER.warning("audit log %s: cut %d bytes of a torn last line", self.path, self._size - end)
        self._size = end

    def _rotate(self) -> None:
        """``f`` → ``f.1`` → ... → ``f.N`` (the oldest is overwritten), like RotatingFileHandler."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close()  # flushes: a failure here fails the pending records
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.path.exists():
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._size = 0

    def _close_stream(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except OSError:
                pass  # flushing a failed buffer again fails again; the failure is already counted
            self._stream = None


class DecisionLog:
    """Recent decisions in memory (for the status page) and, when enabled, the audit file."""

    def __init__(self, config: Config) -> None:
        self.privacy: Privacy = config.audit_text
        self.recent: deque[Entry] = deque(maxlen=max(config.recent_decisions, 1))
        self.writer: AuditWriter | None = None
        if config.audit_enabled:
            self.writer = AuditWriter(
                Path(config.audit_dir) / AUDIT_FILE,
                max_bytes=config.audit_max_bytes,
                backups=config.audit_backups,
                queue_size=config.audit_queue,
                privacy=config.audit_text,
            )

    @property
    def path(self) -> Path | None:
        """The current audit file, or None when the audit log is off."""
        return self.writer.path if self.writer is not None else None

    def add(
        self,
        result: ParseResult,
        wire: dict[str, Any],
        request_id: str,
        seconds: float,
        conversation: dict[str, Any] | None = None,
    ) -> None:
        """Record one decision: O(1) on the caller's thread, the file write happens on the writer's."""
        entry = Entry(
            time.time(),
            request_id,
            result,
            wire["top_intent"],
            wire["confidence"],
            seconds * 1000.0,
            conversation,
        )
        self.recent.append(entry)
        if self.writer is not None:
            self.writer.submit(entry)

    def recent_records(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest decisions first, formatted like audit lines."""
        entries = list(self.recent)[-limit:]
        return [to_record(e, self.privacy) for e in reversed(entries)]

    def stats(self) -> dict[str, Any]:
        """Counts for /metrics and the status page."""
        w = self.writer
        return {
            "enabled": w is not None,
            "path": str(w.path) if w is not None else None,
            "privacy": self.privacy,
            "written": w.written if w is not None else 0,
            "dropped": w.dropped if w is not None else 0,
            "failed": w.failed if w is not None else 0,
        }

    async def lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: start the writer with the app, drain and stop it on shutdown."""
        if self.writer is not None:
            self.writer.start()
            _LOGGER.info("audit log: %s (text: %s)", self.writer.path, self.privacy)
        yield
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
