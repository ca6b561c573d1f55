"""/metrics over real HTTP: a clean exposition, bounded labels, reloads and refusals, the hot-path cost."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from skill.app import create_app
from skill.audit import DecisionLog
from skill.config import Config
from skill.contracts import wire_result
from skill.decision import Candidate, Decision, Outcome
from skill.service import ServiceState
from skill.telemetry import Telemetry, _quantile
from tests.conftest import MINI_INTENTS, write_catalog

# A rule over plain words, so the test does not depend on what canonicalization masks.
TIME_INTENT: dict[str, Any] = {
    "intent": "voice.time.now",
    "description": {"ru": "Сколько времени", "en": "What time is it"},
    "examples": {"ru": ["сколько времени"], "en": ["what time is it"]},
    "regex": [
        {"id": "time_en", "locale": "en", "priority": 60, "pattern": r"^what time is it$"},
        {"id": "time_ru", "locale": "ru", "priority": 60, "pattern": r"^сколько времени$"},
    ],
}


def obs_catalog(root: Path) -> Path:
    """The mini catalog plus one intent with a placeholder-free rule."""
    intents = copy.deepcopy(MINI_INTENTS)
    intents["intents"].append(TIME_INTENT)
    return write_catalog(root, intents)


async def start(aiohttp_client: Any, config: Config) -> tuple[TestClient, ServiceState]:
    """A served app on loopback, once the pipeline is loaded."""
    state = ServiceState(config)
    client = await aiohttp_client(create_app(state))
    for _ in range(250):
        if state.ready:
            break
        await asyncio.sleep(0.02)
    assert state.ready
    return client, state


@pytest.fixture
def config(tmp_path: Path, make_config: Callable[..., Config]) -> Config:
    return make_config(catalog_dir=str(obs_catalog(tmp_path / "catalog")), audit_dir=str(tmp_path / "logs"))


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    hits = [
        s.value
        for s in fams[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(hits) == 1, (sample, labels, fams[family].samples)
    return float(hits[0])


async def scrape(client: TestClient) -> dict[str, Any]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return families(await resp.text())


async def test_exposition_parses_and_counts(aiohttp_client: Any, config: Config) -> None:
    client, _ = await start(aiohttp_client, config)
    for text in ("what time is it", "сколько времени", "what time is it", "tell me a story"):
        assert (await client.post("/parse", json={"text": text})).status == 200
    assert (await client.post("/parse", json={"text": ""})).status == 400  # bad input is not a decision
    fams = await scrape(client)
    assert fams["nlu_parse_request_seconds"].type == "histogram"
    assert value(fams, "nlu_parse_request_seconds", "nlu_parse_request_seconds_count") == 4
    for stage in ("canonicalize", "regex"):
        assert value(fams, "nlu_stage_seconds", "nlu_stage_seconds_count", stage=stage) == 4
    dec = "nlu_decisions_total"
    assert value(fams, "nlu_decisions", dec, outcome="accept", via="regex", intent="voice.time.now") == 3
    assert value(fams, "nlu_decisions", dec, outcome="abstain", via="neural", intent="none") == 1
    assert value(fams, "nlu_confidence", "nlu_confidence_count", outcome="accept", via="regex") == 3
    assert (
        value(fams, "nlu_confidence", "nlu_confidence_bucket", outcome="accept", via="regex", le="0.99") == 0
    )
    assert value(fams, "nlu_fallback_ratio", "nlu_fallback_ratio") == pytest.approx(0.25)
    canon = {
        s.labels["result"]: s.value for s in fams["nlu_canonicalization"].samples if s.name.endswith("_total")
    }
    assert set(canon) == {"hit", "miss", "ambiguity", "unresolved"} and sum(canon.values()) == 4
    info = fams["nlu_model_info"].samples[0]
    assert info.name == "nlu_model_info"
    assert info.labels["model_id"] == "none" and info.labels["service_version"]
    assert info.labels["status"] == "degraded"
    assert value(fams, "nlu_model_loaded", "nlu_model_loaded") == 0
    assert (
        value(fams, "nlu_model_reloads", "nlu_model_reloads_total", trigger="start", result="no_model") == 1
    )
    assert value(fams, "nlu_model_refusals", "nlu_model_refusals_total", trigger="reindex") == 0
    assert "nlu_audit_records" in fams


async def test_reloads_and_refusals(aiohttp_client: Any, config: Config) -> None:
    client, state = await start(aiohttp_client, config)
    assert (await client.post("/reindex")).status == 200
    mini = Path(config.catalog_dir) / "intents" / "mini.yaml"
    good = mini.read_text(encoding="utf-8")
    mini.write_text(good + "\nsurprise: 1\n", encoding="utf-8")  # a broken catalog: the old pipeline stays
    body = await (await client.post("/reindex")).json()
    assert body["ok"] is False and "surprise" in body["error"]
    fams = await scrape(client)
    assert (
        value(fams, "nlu_model_reloads", "nlu_model_reloads_total", trigger="reindex", result="no_model") == 1
    )
    assert value(fams, "nlu_model_refusals", "nlu_model_refusals_total", trigger="reindex") == 1
    mini.write_text(good, encoding="utf-8")
    await client.post("/reindex")
    fams = await scrape(client)  # counted once each, however often scraped
    assert (
        value(fams, "nlu_model_reloads", "nlu_model_reloads_total", trigger="reindex", result="no_model") == 2
    )
    assert value(fams, "nlu_model_refusals", "nlu_model_refusals_total", trigger="reindex") == 1
    assert state.health()["refusals_total"] == 1


async def test_each_app_has_its_own_registry(aiohttp_client: Any, config: Config) -> None:
    one, _ = await start(aiohttp_client, config)
    two, _ = await start(aiohttp_client, config)
    await one.post("/parse", json={"text": "what time is it"})
    fams_one, fams_two = await scrape(one), await scrape(two)
    assert value(fams_one, "nlu_parse_request_seconds", "nlu_parse_request_seconds_count") == 1
    assert value(fams_two, "nlu_parse_request_seconds", "nlu_parse_request_seconds_count") == 0


def _result(state: ServiceState, text: str, intent: str | None, outcome: Outcome) -> Any:
    assert state.pipeline is not None
    res = state.pipeline.parse(text, "en")
    decision = Decision(intent, 0.6 if intent else 0.0, outcome, "neural", (Candidate("alarm.set", 0.2),))
    return msgspec.structs.replace(res, decision=decision)


def test_intent_label_stays_bounded(config: Config) -> None:
    state = ServiceState(config)
    state.load()
    assert state.pipeline is not None
    telemetry = Telemetry(state)
    for i in range(50):  # a model that invents intents must not invent series
        telemetry.observe(state.pipeline, _result(state, f"text {i}", f"made.up.{i}", Outcome.ABSTAIN), 0.001)
    telemetry.observe(state.pipeline, _result(state, "x", "alarm.set", Outcome.ACCEPT), 0.001)
    counts = telemetry.decision_counts()
    assert counts == {("abstain", "neural", "none"): 50, ("accept", "neural", "alarm.set"): 1}
    snap = telemetry.snapshot()
    assert snap["requests"] == 51 and snap["fallback_ratio"] == pytest.approx(50 / 51)
    conf = {(b["lo"], b["hi"]): b["abstain"] for b in snap["confidence"] if b["abstain"]}
    assert conf == {(0.5, 0.6): 50}


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        ([], 0.5, None),
        ([(0.001, 0.0), (0.002, 0.0), (float("inf"), 0.0)], 0.5, None),
        ([(0.001, 10.0), (0.002, 10.0), (float("inf"), 10.0)], 0.5, 0.5),
        ([(0.001, 0.0), (0.002, 10.0), (float("inf"), 10.0)], 0.5, 1.5),
        ([(0.001, 0.0), (0.002, 0.0), (float("inf"), 4.0)], 0.95, 2.0),  # beyond the last bound
    ],
)
def test_quantile_from_buckets(buckets: list[tuple[float, float]], q: float, expected: float | None) -> None:
    got = _quantile(buckets, q)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_hot_path_overhead(config: Config, tmp_path: Path) -> None:
    """What metrics + audit add to one /parse on the event loop (the file write is on another thread)."""
    state = ServiceState(config)
    state.load()
    pipe = state.pipeline
    assert pipe is not None
    telemetry, decisions = Telemetry(state, None), DecisionLog(config)
    assert decisions.writer is not None
    decisions.writer.start()
    result = pipe.parse("what time is it", "en")
    wire = msgspec.to_builtins(wire_result(result, pipe.gate_config.accept, "r"))
    n = 2000
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(n):
            telemetry.observe(pipe, result, 0.001)
            decisions.add(result, wire, "r", 0.001)
        best = min(best, (time.perf_counter() - started) / n)
        time.sleep(0.05)  # let the writer drain between rounds
    parse_started = time.perf_counter()
    for _ in range(200):
        pipe.parse("what time is it", "en")
    parse_us = (time.perf_counter() - parse_started) / 200 * 1e6
    decisions.writer.close()
    print(f"\nmetrics + audit per /parse: {best * 1e6:.1f} us (regex-only pipeline.parse: {parse_us:.1f} us)")
    assert best < 1e-3  # generous: a shared 2-core machine; typically ~30 us
    assert decisions.writer.written + decisions.writer.dropped == 3 * n
