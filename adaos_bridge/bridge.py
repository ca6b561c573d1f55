"""The bridge: request → service → gate → (teacher queue first) → events → statistics.

The stage order for one request lives in :meth:`Bridge.handle`; everything it calls is a module
of its own (intake, client, gates, misses, events, stats).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from typing import Any

import msgspec

from . import events as ev
from .bus import Bus, BusEvent
from .bus_nats import JetStreamFeed
from .client import CallFailed, CircuitBreaker, ServiceClient, ServiceReply
from .config import BridgeConfig
from .delivery import Deliverer, HttpTeacherSink, JetStreamTeacherSink, TeacherSink
from .gates import Thresholds, Verdict, judge, judge_failure
from .intake import Deduper, IntentRequest, parse_body, parse_request
from .misses import Redactor, idempotency_key, miss_record, registry_names
from .overlay import InvalidExample, Overlay, parse_example
from .queue import SqliteQueue
from .stats import UsageStats

_LOGGER = logging.getLogger(__name__)


def make_sink(config: BridgeConfig) -> TeacherSink | None:
    """JetStream when a stream and NATS are configured, else HTTP when a URL is, else none."""
    if config.teacher_stream and config.nats_url:
        return JetStreamTeacherSink(config.nats_url, config.teacher_stream, config.teacher_subject)
    if config.teacher_url:
        return HttpTeacherSink(config.teacher_url, config.teacher_token)
    return None


def split_reply(req: IntentRequest, reply: ServiceReply) -> list[tuple[IntentRequest, ServiceReply]]:
    """One (request, answer) per segment of a multi-request answer; empty when there was no split."""
    segments = reply.raw.get("segments")
    if not isinstance(segments, list) or len(segments) < 2:
        return []
    out = []
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict) or not isinstance(seg.get("text"), str):
            return []  # a malformed list: handle the utterance as one request
        index = seg.get("index", i)
        raw = {**seg, "model_id": reply.model_id, "locale": reply.locale, "request_id": req.request_id}
        raw.update(segment_index=index, segments_total=len(segments))
        fields = {k: seg[k] for k in ("top_intent", "confidence", "alternatives", "slots", "via") if k in seg}
        try:
            part = msgspec.convert(
                {**fields, "decision": seg.get("decision"), "reason": seg.get("reason")},
                ServiceReply,
                strict=False,
            )
        except msgspec.ValidationError:
            return []
        part = msgspec.structs.replace(
            part, model_id=reply.model_id, locale=reply.locale, request_id=req.request_id, raw=raw
        )
        payload = {**req.payload, "text": seg["text"]}
        part_req = msgspec.structs.replace(
            req, text=seg["text"], payload=payload, segment_index=int(index), segments_total=len(segments)
        )
        out.append((part_req, part))
    return out


class Bridge:
    """Owns the client, the queue, the overlay and the statistics; the bus is given."""

    def __init__(self, config: BridgeConfig, bus: Bus, *, sink: TeacherSink | None = None) -> None:
        self.config = config
        self.bus = bus
        self.thresholds = Thresholds(config.accept_confidence, config.reject_confidence)
        self.client = ServiceClient(
            config.service_url,
            timeout_s=config.timeout_s,
            retries=config.retries,
            retry_base_s=config.retry_base_s,
            max_concurrency=config.max_concurrency,
            breaker=CircuitBreaker(config.breaker_failures, config.breaker_reset_s),
        )
        self.dedup = Deduper(config.dedup_window_s)
        self.queue = SqliteQueue(config.queue_db(), max_items=config.queue_max, sync=config.queue_sync)
        self.sink = sink if sink is not None else make_sink(config)
        self.deliverer = (
            Deliverer(
                self.queue,
                self.sink,
                batch=config.delivery_batch,
                backoff_s=config.delivery_backoff_s,
                backoff_max_s=config.delivery_backoff_max_s,
            )
            if self.sink is not None
            else None
        )
        names = registry_names(config.catalog_dir) if config.redact_names and config.catalog_dir else []
        self.redactor = Redactor(digits=config.redact_digits, names=config.redact_names, registry=names)
        self.overlay = Overlay(config.resolved_overlay(), config.resolved_marker())
        self.stats = UsageStats(config.resolved_stats(), flush_s=config.stats_flush_s)
        self._overlay_lock = asyncio.Lock()
        self._housekeeping: asyncio.Task[None] | None = None
        self.feed: JetStreamFeed | None = None
        if config.examples_stream and config.nats_url:
            where = hashlib.sha256(config.state_dir.encode()).hexdigest()[:8]
            self.feed = JetStreamFeed(
                config.nats_url,
                config.examples_stream,
                ev.EXAMPLE_SAVE,
                durable=config.instance_id or f"adaos-bridge-{socket.gethostname()}-{where}",
            )

    async def start(self) -> None:
        """Open the queue (misses of a previous run are delivered first), connect, subscribe."""
        await self.queue.open()
        await self.client.start()
        if self.deliverer is not None:
            self.deliverer.start()
        await self.bus.subscribe(ev.DETECT_NEURAL, self.on_request)
        if self.config.standalone:
            await self.bus.subscribe(ev.DETECT_REQUEST, self.on_request)
        if self.feed is not None:  # the stream keeps examples for us while we are away
            await self.feed.start(self.on_example)
        else:
            await self.bus.subscribe(ev.EXAMPLE_SAVE, self.on_example, shared=False)
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
        _LOGGER.info(
            "bridge ready: service=%s accept>=%.2f reject<%.2f timeout=%gs fallback=%s teacher=%s pending=%d",
            self.config.service_url,
            self.thresholds.accept,
            self.thresholds.reject,
            self.config.timeout_s,
            "rasa" if self.config.rasa_fallback else "not_obtained",
            type(self.sink).__name__ if self.sink else "none",
            self.queue.pending,
        )

    async def close(self) -> None:
        """Stop delivering (undelivered misses stay queued), write statistics, close."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            try:
                await self._housekeeping
            except asyncio.CancelledError:
                pass
        if self.feed is not None:
            await self.feed.close()
        if self.deliverer is not None:
            await self.deliverer.stop()
        self.stats.set_queue(await self.queue.stats())
        await self.stats.close()
        await self.client.close()
        await self.queue.close()

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_flush_s)
            try:
                self.stats.set_queue(await self.queue.stats())
                await self.stats.flush()
            except Exception:  # noqa: BLE001 - statistics must never stop the bridge
                _LOGGER.warning("statistics update failed", exc_info=True)

    async def on_request(self, event: BusEvent) -> None:
        """A ``nlp.intent.detect.neural`` (or, standalone, ``.request``) event."""
        req = parse_request(event.payload, event.type)
        if req is None:
            _LOGGER.debug("ignoring %s without text", event.type)
            return
        if self.dedup.seen(req.request_id) or not await self._claim(req.request_id):
            _LOGGER.debug("dropping duplicate request %s", req.request_id)
            self.stats.bump_bridge("duplicates_dropped")
            return
        await self.handle(req)

    async def _claim(self, request_id: str) -> bool:
        """Instances sharing a queue group also share the dedup window (NATS: a JetStream KV bucket)."""
        claim = getattr(self.bus, "claim", None)
        return True if claim is None else bool(await claim(request_id))

    async def handle(self, req: IntentRequest) -> Verdict:
        """One request, in order: ask, gate, queue a teachable miss, emit, count.

        An utterance the service split into several requests is handled as that many requests, in
        order: each segment is gated on its own, an accepted one emits its ``nlp.intent.detected``
        (shared ``request_id``, its ``segment_index``), one that is not goes down the fallback path
        alone. The first segment's verdict is returned.
        """
        started = time.perf_counter()
        opens = self.client.breaker.opens
        reply: ServiceReply | None = None
        service_ms: float | None = None
        try:
            reply = await self.client.parse(parse_body(req))
            service_ms = (time.perf_counter() - started) * 1000.0
            verdict = judge(reply, self.thresholds)
        except CallFailed as exc:
            _LOGGER.debug("request %s: service call failed: %s", req.request_id, exc)
            verdict = judge_failure(exc)
        if self.client.breaker.opens > opens:
            self.stats.bump_bridge("breaker_opens", self.client.breaker.opens - opens)
        parts = split_reply(req, reply) if reply is not None else []
        if parts:
            self.stats.bump_bridge("segmented_requests")
            verdicts = [judge(part_reply, self.thresholds) for _, part_reply in parts]
            for (part_req, part_reply), part_verdict in zip(parts, verdicts, strict=True):
                await self._finish(part_req, part_reply, part_verdict, started, service_ms)
            return verdicts[0]
        await self._finish(req, reply, verdict, started, service_ms)
        return verdict

    async def _finish(
        self,
        req: IntentRequest,
        reply: ServiceReply | None,
        verdict: Verdict,
        started: float,
        service_ms: float | None,
    ) -> None:
        """Queue a teachable miss (before any event for it), emit, count."""
        if verdict.teachable and reply is not None:
            await self._queue_miss(req, reply, verdict)
        fallback = await self._emit(req, reply, verdict)
        self.stats.record(
            req,
            verdict,
            reply,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            service_ms=service_ms,
            fallback_to_rasa=fallback,
        )

    async def _queue_miss(self, req: IntentRequest, reply: ServiceReply, verdict: Verdict) -> None:
        try:
            await self.queue.put(
                idempotency_key(req.request_id, req.text), miss_record(req, reply, verdict, self.redactor)
            )
        except Exception:  # noqa: BLE001 - the user's request must still get its fallback
            _LOGGER.exception("could not queue miss %s for the teacher", req.request_id)
            self.stats.bump_bridge("queue_errors")

    async def _emit(self, req: IntentRequest, reply: ServiceReply | None, verdict: Verdict) -> bool:
        """Publish the outcome's events; True if the request went on to Rasa."""
        if verdict.accepted and reply is not None:
            await self._publish(ev.TRACE, ev.trace(req, verdict, reply))
            await self._publish(ev.DETECTED, ev.detected(req, reply, verdict))
            return False
        await self._publish(ev.TRACE, ev.trace(req, verdict, reply))
        if self.config.rasa_fallback:
            await self._publish(ev.DETECT_RASA, ev.rasa_fallback(req, verdict))
            return True
        await self._publish(
            ev.TRACE, ev.trace(req, verdict, None, stage="rasa", status="skipped", reason="runtime_disabled")
        )
        await self._publish(ev.NOT_OBTAINED, ev.not_obtained(req, verdict))
        return False

    async def _publish(self, type_: str, payload: dict[str, Any]) -> None:
        meta = dict(payload.get("_meta") or {})
        meta["event"] = type_
        try:
            await self.bus.publish(type_, {**payload, "_meta": meta})
        except Exception:  # noqa: BLE001 - a bus hiccup must not lose the rest of the events
            _LOGGER.exception("could not publish %s", type_)

    async def on_example(self, event: BusEvent) -> None:
        """``nlp.teacher.example.save``: append to the overlay, mark a retraining candidate."""
        try:
            example = parse_example(event.payload)
        except InvalidExample as exc:
            _LOGGER.warning("ignoring a teacher example: %s", exc)
            self.stats.feedback("invalid")
            return
        async with self._overlay_lock:
            try:
                changed = await asyncio.to_thread(self.overlay.add, example)
            except Exception:  # noqa: BLE001 - a broken overlay file is reported, not fatal
                _LOGGER.exception("could not write the teacher overlay %s", self.overlay.path)
                self.stats.feedback("invalid")
                return
        self.stats.feedback("saved" if changed else "repeated")
        if changed:
            _LOGGER.info("teacher example for %s saved to %s", example.intent, self.overlay.path)
