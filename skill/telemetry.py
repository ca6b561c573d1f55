"""Prometheus metrics of one app, in its own registry: latency, decisions, confidence, reloads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from . import __version__
from .audit import DecisionLog, canonicalization_result
from .decision import Outcome
from .pipeline import ParseResult, Pipeline
from .service import ReloadEvent, ServiceState

_LOGGER = logging.getLogger(__name__)

NO_INTENT = "none"  # the label for "no candidate" and for intents the catalog does not know
STAGES = ("canonicalize", "regex", "neural", "llm")
OUTCOMES = tuple(o.value for o in Outcome)
CANONICALIZATION = ("hit", "miss", "ambiguity", "unresolved")
TRIGGERS = ("start", "reindex", "pointer")  # ServiceState.load triggers, reported from zero
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
# Fine where the gates are (the hub's bands end at 0.25, 0.45 and 0.80).
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)


class Telemetry:
    """The metrics of one app; ``observe`` is the only call on the /parse path."""

    def __init__(self, state: ServiceState, decisions: DecisionLog | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        self.request_seconds = Histogram(
            "nlu_parse_request_seconds",
            "Whole /parse handling time (body read to result).",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.stage_seconds = Histogram(
            "nlu_stage_seconds",
            "Time spent in each pipeline stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.decisions = Counter(
            "nlu_decisions",
            "Final decisions by outcome, deciding stage and intent (the top candidate, "
            "also for abstain / reject; 'none' = no candidate).",
            ["outcome", "via", "intent"],
            registry=reg,
        )
        self.confidence = Histogram(
            "nlu_confidence",
            "Calibrated confidence of the top candidate (decisions with a candidate).",
            ["outcome", "via"],
            buckets=CONFIDENCE_BUCKETS,
            registry=reg,
        )
        self.canonicalization = Counter(
            "nlu_canonicalization",
            "Canonicalization per request: hit (entities or values found), miss, "
            "ambiguity (several registry entities fit), unresolved (a span the hub could not resolve).",
            ["result"],
            registry=reg,
        )
        self.llm_fallback = Counter(
            "nlu_llm_fallback",
            "Requests the LLM fallback stage saw, by its outcome.",
            ["outcome"],
            registry=reg,
        )
        # Children looked up once: on the hot path a dict hit is cheaper than labels().
        self._stage = {s: self.stage_seconds.labels(s) for s in STAGES}
        self._canon = {r: self.canonicalization.labels(r) for r in CANONICALIZATION}
        self._decided: dict[tuple[str, str, str], Any] = {}
        self._confident: dict[tuple[str, str], Any] = {}
        for outcome in OUTCOMES:
            self.llm_fallback.labels(outcome)
        self.state_collector = StateCollector(self, state, decisions)
        reg.register(self.state_collector)

    def observe(self, pipeline: Pipeline, result: ParseResult, seconds: float) -> None:
        """Count one /parse decision (a few microseconds; runs on the event loop)."""
        self.request_seconds.observe(seconds)
        for trace in result.stages:
            child = self._stage.get(trace.stage)
            if child is None:
                child = self._stage[trace.stage] = self.stage_seconds.labels(trace.stage)
            child.observe(trace.ms / 1000.0)
            if trace.stage == "llm":
                self.llm_fallback.labels(trace.outcome).inc()
        d = result.decision
        intent = d.intent if d.intent is not None and d.intent in pipeline.catalog.intents else NO_INTENT
        key = (d.outcome.value, d.via, intent)
        counter = self._decided.get(key)
        if counter is None:
            counter = self._decided[key] = self.decisions.labels(*key)
        counter.inc()
        if d.intent is not None:
            ckey = key[:2]
            hist = self._confident.get(ckey)
            if hist is None:
                hist = self._confident[ckey] = self.confidence.labels(*ckey)
            hist.observe(d.confidence)
        self._canon[canonicalization_result(result.canonical)].inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)

    async def handle_metrics(self, _request: web.Request) -> web.Response:
        """``GET /metrics``."""
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def decision_counts(self) -> dict[tuple[str, str, str], float]:
        """(outcome, via, intent) → count, read from the counter (not for the hot path)."""
        counts: dict[tuple[str, str, str], float] = {}
        for sample in _samples(self.decisions.collect(), "nlu_decisions_total"):
            lab = sample.labels
            counts[(lab["outcome"], lab["via"], lab["intent"])] = sample.value
        return counts

    def snapshot(self) -> dict[str, Any]:
        """Plain numbers for the status page."""
        counts = self.decision_counts()
        total = sum(counts.values())
        by_outcome = {o: 0.0 for o in OUTCOMES}
        by_intent: dict[str, dict[str, float]] = {}
        for (outcome, _via, intent), n in counts.items():
            by_outcome[outcome] = by_outcome.get(outcome, 0.0) + n
            row = by_intent.setdefault(intent, {o: 0.0 for o in OUTCOMES})
            row[outcome] = row.get(outcome, 0.0) + n
        canon = {
            s.labels["result"]: s.value
            for s in _samples(self.canonicalization.collect(), "nlu_canonicalization_total")
        }
        latency = {"request": _latency(self.request_seconds.collect(), None)}
        for stage in self._stage:
            latency[stage] = _latency(self.stage_seconds.collect(), stage)
        return {
            "requests": total,
            "by_outcome": by_outcome,
            "fallback_ratio": fallback_ratio(counts),
            "by_intent": dict(sorted(by_intent.items(), key=lambda kv: -sum(kv[1].values()))),
            "confidence": _confidence_bins(self.confidence.collect()),
            "canonicalization": canon,
            "latency_ms": latency,
            "reloads": self.state_collector.reload_counts(),
        }


def fallback_ratio(counts: dict[tuple[str, str, str], float]) -> float | None:
    """Share of decisions the service did not accept, so the hub falls back to its next stage."""
    total = sum(counts.values())
    if not total:
        return None
    return sum(n for (outcome, _, _), n in counts.items() if outcome != Outcome.ACCEPT.value) / total


class StateCollector:
    """Metrics read from the service state at scrape time: model info, reloads, refusals, audit, ratios."""

    def __init__(self, telemetry: Telemetry, state: ServiceState, decisions: DecisionLog | None) -> None:
        self.telemetry = telemetry
        self.state = state
        self.decisions = decisions
        self._lock = threading.Lock()
        self._seen: list[ReloadEvent] = []
        self._reloads: dict[tuple[str, str], int] = {(t, "loaded"): 0 for t in TRIGGERS}
        self._refusals: dict[str, int] = dict.fromkeys(TRIGGERS, 0)

    def _sync_reloads(self) -> None:
        """Count reload events not seen before. ServiceState keeps the last 20 events: a scrape
        interval with more than 20 reloads undercounts, which is far beyond any real rate."""
        with self._lock:
            events = list(self.state.reloads)
            refused = list(self.state.refusals)  # appended right after reloads: read second
            for event in events:
                if any(event is seen for seen in self._seen):
                    continue
                if any(event is r for r in refused):
                    self._refusals[event.trigger] = self._refusals.get(event.trigger, 0) + 1
                else:
                    key = (event.trigger, "loaded" if event.ok else "no_model")
                    self._reloads[key] = self._reloads.get(key, 0) + 1
            self._seen = events  # holding the objects keeps their identities unique

    def reload_counts(self) -> dict[str, Any]:
        """Reloads by trigger and result, refusals by trigger."""
        self._sync_reloads()
        return {
            "reloads": {f"{t}/{r}": n for (t, r), n in sorted(self._reloads.items())},
            "refusals": dict(sorted(self._refusals.items())),
        }

    def collect(self) -> Iterator[Metric]:
        """Called by the registry on every scrape."""
        self._sync_reloads()
        state = self.state
        pipe = state.pipeline
        ranker = pipe.ranker if pipe is not None else None
        info = InfoMetricFamily("nlu_model", "The model and catalog that serve now.")
        info.add_metric(
            [],
            {
                "model_id": (pipe.model_id if pipe is not None else None) or NO_INTENT,
                "service_version": __version__,
                "catalog_digest": pipe.catalog.digest[:12] if pipe is not None else "",
                "status": "loading" if pipe is None else ("ready" if ranker is not None else "degraded"),
            },
        )
        yield info
        yield GaugeMetricFamily(
            "nlu_model_loaded", "1 when a model serves the neural stage.", value=float(ranker is not None)
        )
        reloads = CounterMetricFamily(
            "nlu_model_reloads",
            "Pipeline (re)loads by trigger and result (loaded / no_model).",
            labels=["trigger", "result"],
        )
        for (trigger, result), n in sorted(self._reloads.items()):
            reloads.add_metric([trigger, result], n)
        yield reloads
        refusals = CounterMetricFamily(
            "nlu_model_refusals",
            "Reloads refused (damaged or missing model); the old one kept serving.",
            labels=["trigger"],
        )
        for trigger, n in sorted(self._refusals.items()):
            refusals.add_metric([trigger], n)
        yield refusals
        ratio = fallback_ratio(self.telemetry.decision_counts())
        yield GaugeMetricFamily(
            "nlu_fallback_ratio",
            "Share of decisions not accepted (the hub falls back to its next stage); "
            "NaN before the first request.",
            value=float("nan") if ratio is None else ratio,
        )
        if self.decisions is not None:
            stats = self.decisions.stats()
            audit = CounterMetricFamily(
                "nlu_audit_records",
                "Audit log records by result: written, dropped (queue full), failed (I/O).",
                labels=["result"],
            )
            for result in ("written", "dropped", "failed"):
                audit.add_metric([result], stats[result])
            yield audit


def _samples(families: Iterable[Metric], name: str) -> Iterator[Any]:
    for family in families:
        for sample in family.samples:
            if sample.name == name:
                yield sample


def _latency(families: Iterable[Metric], stage: str | None) -> dict[str, float | None]:
    """Count, mean and interpolated p50 / p95 (ms) from one histogram's buckets."""
    fams = list(families)
    match = (lambda s: True) if stage is None else (lambda s: s.labels.get("stage") == stage)
    buckets = [
        (float(s.labels["le"]), s.value) for s in _samples(fams, _hist_name(fams, "_bucket")) if match(s)
    ]
    count = next((s.value for s in _samples(fams, _hist_name(fams, "_count")) if match(s)), 0.0)
    total = next((s.value for s in _samples(fams, _hist_name(fams, "_sum")) if match(s)), 0.0)
    return {
        "count": count,
        "mean": 1000.0 * total / count if count else None,
        "p50": _quantile(buckets, 0.50),
        "p95": _quantile(buckets, 0.95),
    }


def _hist_name(families: list[Metric], suffix: str) -> str:
    return (families[0].name if families else "") + suffix


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Like PromQL's histogram_quantile: linear inside the bucket, in ms."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lo, below = 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            if le == float("inf"):
                return 1000.0 * lo
            inside = cum - below
            return 1000.0 * (lo + (le - lo) * ((rank - below) / inside if inside else 0.0))
        lo, below = le, cum
    return None


def _confidence_bins(families: Iterable[Metric]) -> list[dict[str, Any]]:
    """Non-cumulative counts per confidence bucket, summed over outcome and via, split by outcome."""
    cum: dict[tuple[float, str], float] = {}
    for sample in _samples(families, "nlu_confidence_bucket"):
        key = (float(sample.labels["le"]), sample.labels["outcome"])
        cum[key] = cum.get(key, 0.0) + sample.value
    bins = []
    lo = 0.0
    for hi in CONFIDENCE_BUCKETS:
        row: dict[str, Any] = {"lo": lo, "hi": hi}
        for outcome in OUTCOMES:
            prev = cum.get((lo, outcome), 0.0) if lo else 0.0
            row[outcome] = cum.get((hi, outcome), 0.0) - prev
        bins.append(row)
        lo = hi
    return bins
