"""Access rules as a table, and over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from skill.app import create_app
from skill.config import Config
from skill.security import authorize, is_loopback
from skill.service import ServiceState


@pytest.mark.parametrize(
    ("path", "remote", "header", "token", "expected"),
    [
        ("/parse", "127.0.0.1", None, None, None),
        ("/parse", "192.168.1.5", None, None, None),  # no token: parsing is open (bind decides)
        ("/reindex", "127.0.0.1", None, None, None),
        ("/reindex", "::1", None, None, None),
        ("/reindex", "::ffff:127.0.0.1", None, None, None),
        ("/reindex", "10.0.0.7", None, None, "forbidden"),
        ("/reindex", None, None, None, "forbidden"),
        ("/reindex", "garbage", None, None, "forbidden"),
        ("/parse", "127.0.0.1", None, "s3cret", "unauthorized"),
        ("/parse", "127.0.0.1", "Bearer wrong", "s3cret", "unauthorized"),
        ("/parse", "127.0.0.1", "Basic s3cret", "s3cret", "unauthorized"),
        ("/parse", "10.0.0.7", "Bearer s3cret", "s3cret", None),
        ("/parse", "10.0.0.7", "bearer  s3cret ", "s3cret", None),
        ("/reindex", "10.0.0.7", "Bearer s3cret", "s3cret", None),
        ("/metrics", "10.0.0.7", None, "s3cret", "unauthorized"),
        ("/health", "10.0.0.7", None, "s3cret", None),  # AdaOS polls health without a token
    ],
)
def test_authorize(
    path: str, remote: str | None, header: str | None, token: str | None, expected: str | None
) -> None:
    assert authorize(path, remote, header, token) == expected


def test_is_loopback() -> None:
    assert is_loopback("127.8.9.10") and not is_loopback("128.0.0.1") and not is_loopback("")


async def test_token_over_http(
    aiohttp_client: Any, mini_catalog: Path, make_config: Callable[..., Config]
) -> None:
    state = ServiceState(make_config(catalog_dir=str(mini_catalog), api_token="s3cret"))
    client = await aiohttp_client(create_app(state))
    while not state.ready:
        await asyncio.sleep(0.02)
    resp = await client.post("/parse", json={"text": "turn off the kitchen light"})
    assert resp.status == 401
    body = await resp.json()
    assert body == {"ok": False, "error": "unauthorized", "message": body["message"], "field": None}
    resp = await client.post(
        "/parse", json={"text": "turn off the kitchen light"}, headers={"Authorization": "Bearer s3cret"}
    )
    assert resp.status == 200
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 401
    assert (await client.post("/reindex", json={})).status == 401


async def test_openapi_document(
    aiohttp_client: Any, mini_catalog: Path, make_config: Callable[..., Config]
) -> None:
    client = await aiohttp_client(create_app(ServiceState(make_config(catalog_dir=str(mini_catalog)))))
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    assert {"/parse", "/health", "/reindex"} <= set(doc["paths"])
    parse = doc["paths"]["/parse"]["post"]
    assert {"200", "400", "413", "503"} <= set(parse["responses"])
    assert "ParseRequest" in doc["components"]["schemas"]
