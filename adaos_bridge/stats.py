"""Usage statistics in the hub's ``neural_usage.json`` schema (version 1), plus the bridge's extras.

Hub fields: ``totals{requests, fallback_to_rasa, fallback_ratio}``, ``by_status``, ``by_reason``,
``by_intent{intent: {status: n}}``, ``confidence_bands``, ``canonicalization{hit, miss, ambiguity,
unresolved}``, ``latency_ms{count, sum, min, max, avg, last}``, ``recent[]`` (≤100),
``review_samples[]`` (≤50, non-accepted only). Extras under ``bridge``: per-intent service
decisions (accept / abstain / reject), requests per ``model_id``, service latency, duplicates
dropped, breaker opens and the teacher queue's counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from skill.fsutil import atomic_write

from .client import ServiceReply
from .gates import Status, Verdict
from .intake import IntentRequest

_LOGGER = logging.getLogger(__name__)
RECENT_MAX = 100
SAMPLES_MAX = 50


def confidence_band(confidence: float | None) -> str | None:
    """The hub's four bands."""
    if confidence is None:
        return None
    value = max(0.0, min(1.0, float(confidence)))
    if value < 0.25:
        return "0.00-0.24"
    if value < 0.45:
        return "0.25-0.44"
    if value < 0.80:
        return "0.45-0.79"
    return "0.80-1.00"


def canonicalization_bucket(reply: ServiceReply | None, req: IntentRequest) -> str:
    """From the service's ``evidence.entities`` / ``ambiguities`` and the hub's unresolved spans."""
    if reply is None:
        return "unknown"
    if reply.evidence.get("ambiguities"):
        return "ambiguity"
    if (req.entities or {}).get("unresolved_entity_spans") and not reply.evidence.get("entities"):
        return "unresolved"
    return "hit" if reply.evidence.get("entities") else "miss"


def _bump(container: dict[str, Any], key: str, amount: int = 1) -> None:
    container[key] = int(container.get(key, 0)) + amount


def _latency(block: dict[str, Any], ms: float) -> None:
    ms = round(max(0.0, ms), 3)
    block["count"] = int(block.get("count", 0)) + 1
    block["sum"] = round(float(block.get("sum", 0.0)) + ms, 3)
    block["min"] = ms if block.get("min") is None else min(block["min"], ms)
    block["max"] = ms if block.get("max") is None else max(block["max"], ms)
    block["avg"] = round(block["sum"] / block["count"], 3)
    block["last"] = ms


def empty_stats() -> dict[str, Any]:
    """A fresh document."""
    return {
        "schema_version": 1,
        "updated_at": 0.0,
        "totals": {"requests": 0, "fallback_to_rasa": 0, "fallback_ratio": 0.0},
        "by_status": {},
        "by_reason": {},
        "by_intent": {},
        "confidence_bands": {},
        "canonicalization": {},
        "latency_ms": {"count": 0, "sum": 0.0, "min": None, "max": None, "avg": None, "last": None},
        "recent": [],
        "review_samples": [],
        "bridge": {
            "by_intent_decision": {},
            "by_model": {},
            "service_latency_ms": {
                "count": 0,
                "sum": 0.0,
                "min": None,
                "max": None,
                "avg": None,
                "last": None,
            },
            "duplicates_dropped": 0,
            "breaker_opens": 0,
            "teacher_queue": {},
            "feedback": {"saved": 0, "repeated": 0, "invalid": 0},
        },
    }


class UsageStats:
    """Kept in memory, written atomically at most every ``flush_s`` seconds and on close."""

    def __init__(self, path: Path | str | None, *, flush_s: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self.flush_s = flush_s
        self.data = self._read()
        self._dirty = False
        self._task: asyncio.Task[None] | None = None

    def _read(self) -> dict[str, Any]:
        fresh = empty_stats()
        if self.path is None or not self.path.exists():
            return fresh
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            _LOGGER.warning("unreadable %s; starting fresh statistics", self.path)
            return fresh
        if not isinstance(loaded, dict) or loaded.get("schema_version") != 1:
            return fresh
        for key, value in fresh.items():
            loaded.setdefault(key, value)
        for key, value in fresh["bridge"].items():
            loaded["bridge"].setdefault(key, value)
        return loaded

    def record(
        self,
        req: IntentRequest,
        verdict: Verdict,
        reply: ServiceReply | None,
        *,
        latency_ms: float,
        service_ms: float | None,
        fallback_to_rasa: bool,
    ) -> None:
        """Count one request."""
        d = self.data
        now = time.time()
        d["updated_at"] = now
        totals = d["totals"]
        _bump(totals, "requests")
        if fallback_to_rasa:
            _bump(totals, "fallback_to_rasa")
        totals["fallback_ratio"] = round(totals["fallback_to_rasa"] / max(1, totals["requests"]), 6)
        status = verdict.status.value
        _bump(d["by_status"], status)
        _bump(d["by_reason"], verdict.reason)
        canon = canonicalization_bucket(reply, req)
        _bump(d["canonicalization"], canon)
        band = confidence_band(verdict.confidence)
        if band:
            _bump(d["confidence_bands"], band)
        if verdict.intent:
            _bump(d["by_intent"].setdefault(verdict.intent, {}), status)
        _latency(d["latency_ms"], latency_ms)
        extra = d["bridge"]
        if reply is not None:
            if verdict.intent:
                decision = reply.decision or ("accept" if reply.top_intent else "abstain")
                _bump(extra["by_intent_decision"].setdefault(verdict.intent, {}), decision)
            _bump(extra["by_model"], reply.model_id or "none")
        if service_ms is not None:
            _latency(extra["service_latency_ms"], service_ms)
        item = {
            "ts": now,
            "status": status,
            "reason": verdict.reason,
            "intent": verdict.intent,
            "confidence": round(verdict.confidence, 6) if verdict.confidence is not None else None,
            "latency_ms": round(latency_ms, 3),
            "model_id": reply.model_id if reply is not None else None,
            "webspace_id": req.webspace_id,
            "request_id": req.request_id,
            "canonicalization": canon,
            "fallback_to_rasa": fallback_to_rasa,
        }
        d["recent"] = [*d["recent"], item][-RECENT_MAX:]
        if verdict.status is not Status.ACCEPTED:
            d["review_samples"] = [*d["review_samples"], {**item, "text": req.text}][-SAMPLES_MAX:]
        self._dirty = True

    def bump_bridge(self, key: str, amount: int = 1) -> None:
        """Count a bridge-level event (duplicates_dropped, breaker_opens)."""
        _bump(self.data["bridge"], key, amount)
        self._dirty = True

    def feedback(self, outcome: str) -> None:
        """Count an example: saved, repeated or invalid."""
        _bump(self.data["bridge"]["feedback"], outcome)
        self._dirty = True

    def set_queue(self, counters: dict[str, int]) -> None:
        """The teacher queue's counters as of now."""
        self.data["bridge"]["teacher_queue"] = dict(counters)
        self._dirty = True

    def snapshot(self) -> bytes | None:
        """The document to write, or None when nothing changed (serialized on the loop's thread)."""
        if self.path is None or not self._dirty:
            return None
        self._dirty = False
        return json.dumps(self.data, ensure_ascii=False, indent=2, sort_keys=True).encode()

    async def flush(self) -> None:
        """Write now if anything changed (the file write runs off the loop)."""
        blob = self.snapshot()
        if blob is not None and self.path is not None:
            await asyncio.to_thread(atomic_write, self.path, blob)

    def start(self) -> None:
        """Flush periodically in the background."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except OSError as exc:
                _LOGGER.warning("cannot write %s: %s", self.path, exc)

    async def close(self) -> None:
        """Stop the flusher and write the last state."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await self.flush()
        except OSError as exc:  # a full disk must not stop the rest of the shutdown (queue, lock)
            _LOGGER.warning("cannot write %s: %s", self.path, exc)
