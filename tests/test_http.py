"""End-to-end over real HTTP on loopback: the contract's shape and every bad input's answer."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from skill.app import create_app
from skill.config import Config
from skill.service import ServiceState

RESULT_FIELDS = {"top_intent", "confidence", "alternatives", "slots", "via", "model_id", "evidence"}


@pytest.fixture
async def client(aiohttp_client: Any, mini_catalog: Path, make_config: Callable[..., Config]) -> TestClient:
    state = ServiceState(make_config(catalog_dir=str(mini_catalog)))
    client = await aiohttp_client(create_app(state))
    for _ in range(200):  # the pipeline loads in the background after start
        if state.ready:
            break
        await asyncio.sleep(0.02)
    return client


async def test_parse_regex_hit_has_contract_shape(client: TestClient) -> None:
    resp = await client.post("/parse", json={"text": "Поставь будильник на 7:30"})
    assert resp.status == 200
    body = await resp.json()
    assert body["ok"] is True
    assert RESULT_FIELDS <= set(body) and RESULT_FIELDS <= set(body["result"])
    assert {k: body[k] for k in RESULT_FIELDS} == {k: body["result"][k] for k in RESULT_FIELDS}
    assert body["top_intent"] == "alarm.set"
    assert body["confidence"] == 1.0
    assert body["via"] == "regex"
    assert body["decision"] == "accept"
    assert body["slots"] == {"time": "07:30"}
    assert body["locale"] == "ru"
    assert body["evidence"]["canonicalized_text"] == "поставь будильник на {time}"
    assert [s["stage"] for s in body["stages"]] == ["canonicalize", "regex"]
    assert all(isinstance(s["ms"], float) for s in body["stages"])


async def test_parse_device_ref_slot(client: TestClient) -> None:
    body = await (await client.post("/parse", json={"text": "turn off the kitchen light"})).json()
    assert body["top_intent"] == "device.turn_off"
    assert body["slots"] == {"device": "device:light:kitchen_ceiling"}
    assert body["locale"] == "en"


async def test_no_model_abstains_honestly(client: TestClient) -> None:
    body = await (await client.post("/parse", json={"text": "расскажи что-нибудь интересное"})).json()
    assert body["ok"] is True
    assert body["top_intent"] == "" and body["confidence"] == 0
    assert body["decision"] == "abstain"
    assert body["reason"] == "model_not_loaded"
    assert body["model_id"] is None


async def test_health_without_model(client: TestClient) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["ok"] is True
    assert body["model_loaded"] is False
    assert body["model_id"] is None
    assert body["template_backend_ready"] is True
    assert body["status"] == "degraded"
    assert {"service", "version", "examples_total"} <= set(body)
    assert "no active model pointer" in body["stages"]["neural"]["detail"]


@pytest.mark.parametrize(
    ("payload", "status", "code", "field"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_body", None),
        (b'"just a string"', 400, "invalid_body", None),
        (json.dumps({}).encode(), 400, "text_required", "text"),
        (json.dumps({"text": ""}).encode(), 400, "text_required", "text"),
        (json.dumps({"text": "   \n\t"}).encode(), 400, "text_required", "text"),
        (json.dumps({"text": None}).encode(), 400, "text_required", "text"),
        (json.dumps({"text": 42}).encode(), 400, "invalid_field", "text"),
        (json.dumps({"text": ["a"]}).encode(), 400, "invalid_field", "text"),
        (json.dumps({"text": "hi", "locale": 5}).encode(), 400, "invalid_field", "locale"),
        (json.dumps({"text": "hi", "entities": "x"}).encode(), 400, "invalid_field", "entities"),
        (json.dumps({"text": "x" * 1001}).encode(), 400, "text_too_long", "text"),
        (json.dumps({"text": "hallo", "locale": "de"}).encode(), 400, "unsupported_locale", "locale"),
        (
            json.dumps({"text": "hallo", "request_locale": "fr-FR"}).encode(),
            400,
            "unsupported_locale",
            "request_locale",
        ),
        (b"\xff\xfe{", 400, "invalid_json", None),
    ],
)
async def test_bad_input(
    client: TestClient, payload: bytes, status: int, code: str, field: str | None
) -> None:
    resp = await client.post("/parse", data=payload, headers={"Content-Type": "application/json"})
    assert resp.status == status
    body = await resp.json()
    assert body["ok"] is False
    assert body["error"] == code
    assert body["field"] == field
    assert isinstance(body["message"], str) and body["message"]


async def test_body_too_large(client: TestClient) -> None:
    payload = json.dumps({"text": "hi", "pad": "x" * (70 * 1024)})
    resp = await client.post("/parse", data=payload, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    body = await resp.json()
    assert body["ok"] is False and body["error"] == "body_too_large"


async def test_text_at_limit_is_accepted(client: TestClient) -> None:
    resp = await client.post("/parse", json={"text": "a" * 1000})
    assert resp.status == 200


@pytest.mark.parametrize(
    ("extra", "locale"),
    [
        ({"locale": "ru-RU"}, "ru"),
        ({"locale": "EN_us"}, "en"),
        ({"request_locale": "ru"}, "ru"),
        ({"preferred_locales": ["de", "en"]}, "en"),
        ({"preferred_locales": "de, ru"}, "ru"),
        ({"preferred_locales": ["de"]}, "en"),  # nothing supported: detect from the script
        ({"unknown_field": 1, "webspace_id": "kitchen"}, "en"),  # the wire is lenient
    ],
)
async def test_locale_variants(client: TestClient, extra: dict[str, Any], locale: str) -> None:
    resp = await client.post("/parse", json={"text": "turn off the kitchen light", **extra})
    assert resp.status == 200
    assert (await resp.json())["locale"] == locale


async def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json())["ok"] is False
    resp = await client.get("/parse")
    assert resp.status == 405 and (await resp.json())["ok"] is False


async def test_hub_entities_take_precedence(client: TestClient) -> None:
    entities = {
        "raw_text": "turn off the lamp",
        "normalized_text": "turn off the lamp",
        "resolved_entities": [
            {
                "canonical_ref": "device:light:bedroom_lamp",
                "kind": "device.light",
                "text": "lamp",
                "start": 13,
                "end": 17,
                "confidence": 0.97,
                "match_type": "alias",
            }
        ],
        "unresolved_entity_spans": [],
        "ambiguities": [],
    }
    body = await (
        await client.post("/parse", json={"text": "turn off the lamp", "entities": entities})
    ).json()
    assert body["top_intent"] == "device.turn_off"
    assert body["slots"] == {"device": "device:light:bedroom_lamp"}


async def test_concurrent_requests(client: TestClient) -> None:
    texts = ["поставь будильник на 7:30", "turn off the kitchen light", "что-то непонятное"] * 30
    responses = await asyncio.gather(*(client.post("/parse", json={"text": t}) for t in texts))
    bodies = [await r.json() for r in responses]
    assert all(r.status == 200 for r in responses)
    for text, body in zip(texts, bodies, strict=True):
        expected = {"поставь будильник на 7:30": "alarm.set", "turn off the kitchen light": "device.turn_off"}
        assert body["top_intent"] == expected.get(text, "")


async def test_reindex(client: TestClient) -> None:
    resp = await client.post("/reindex", json={"purge_indexes": True})
    assert resp.status == 200
    body = await resp.json()
    assert body["purged_indexes"] is True
    assert {"before", "after", "health"} <= set(body)
    assert body["after"]["model_loaded"] is False
    resp = await client.post("/reindex", data=b"")
    assert resp.status == 200 and (await resp.json())["purged_indexes"] is False
    resp = await client.post("/reindex", json={"purge_indexes": "yes"})
    assert resp.status == 400 and (await resp.json())["field"] == "purge_indexes"


async def test_not_ready_is_503(
    aiohttp_client: Any,
    mini_catalog: Path,
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = threading.Event()
    state = ServiceState(make_config(catalog_dir=str(mini_catalog)))
    real_load = state.load

    def slow_load(trigger: str = "start") -> Any:
        gate.wait(10)
        return real_load(trigger)

    monkeypatch.setattr(state, "load", slow_load)
    client = await aiohttp_client(create_app(state))
    resp = await client.get("/health")
    assert resp.status == 503 and (await resp.json())["status"] == "loading"
    resp = await client.post("/parse", json={"text": "hi"})
    assert resp.status == 503 and (await resp.json())["error"] == "not_ready"
    gate.set()
    for _ in range(200):
        if state.ready:
            break
        await asyncio.sleep(0.02)
    assert (await client.get("/health")).status == 200


async def test_broken_catalog_keeps_503_with_reason(
    aiohttp_client: Any, tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    bad = tmp_path / "bad"
    (bad / "intents").mkdir(parents=True)
    (bad / "intents" / "x.yaml").write_text("owner: {type: skill, id: x}\nintents: []\nsurprise: 1\n")
    state = ServiceState(make_config(catalog_dir=str(bad)))
    client = await aiohttp_client(create_app(state))
    await asyncio.sleep(0.3)
    resp = await client.get("/health")
    assert resp.status == 503
    body = await resp.json()
    assert "surprise" in body["load_error"] and "x.yaml" in body["load_error"]
