"""Entity payloads in the shapes AdaOS's hub sends them, through a real /parse on loopback.

AdaOS's bridge (``neural_service_bridge.parse_text``) posts ``entities`` (its resolver's
``{normalized_text, resolved_entities, ambiguities, unresolved_entity_spans}``) and copies
``normalized_text`` to the top-level ``canonicalized_text``. Its own tests send resolved entities
with a ``canonical_ref`` and nothing else, and a normalized text that carries ``{device}``.
The catalog here is written by the test (not the repo's), so registry edits elsewhere cannot move it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from skill.app import create_app
from skill.canonicalize import Canonicalizer
from skill.catalog import load_catalog
from skill.config import Config
from skill.service import ServiceState

INTENTS: dict[str, Any] = {
    "schema_version": 1,
    "owner": {"type": "skill", "id": "home"},
    "intents": [
        {
            "intent": "device.turn_off",
            "description": {"ru": "Выключить устройство", "en": "Turn a device off"},
            "slots": {"device": {"source": "device", "value": "ref", "required": True}},
            "examples": {"ru": ["выключи телевизор"], "en": ["turn off the tv", "turn it off"]},
            "regex": [
                {
                    "id": "off_en",
                    "locale": "en",
                    "priority": 50,
                    "pattern": r"^turn off (?:the )?\{device\}$",
                },
                {
                    "id": "off_ru",
                    "locale": "ru",
                    "priority": 50,
                    "pattern": r"^(?:выключи|выруби) \{device\}$",
                },
                {"id": "off_it", "locale": "en", "priority": 40, "pattern": r"^turn it off$"},
            ],
        },
    ],
}

ENTITIES: dict[str, Any] = {
    "schema_version": 1,
    "kinds": {
        "device.light": [
            {
                "ref": "device:light:desk_lamp",
                "aliases": {"ru": ["лампа", "настольная лампа"], "en": ["lamp"]},
            },
            {"ref": "device:light:floor_lamp", "aliases": {"ru": ["лампа", "торшер"], "en": ["lamp"]}},
        ],
        "device.media": [{"ref": "device:media:tv", "aliases": {"ru": ["телевизор"], "en": ["tv"]}}],
        "room": [{"ref": "room:kitchen", "aliases": {"ru": ["кухня"], "en": ["kitchen"]}}],
    },
}


def write_home_catalog(root: Path) -> Path:
    (root / "intents").mkdir(parents=True)
    (root / "entities").mkdir()
    (root / "intents" / "home.yaml").write_text(yaml.safe_dump(INTENTS, allow_unicode=True), encoding="utf-8")
    (root / "entities" / "home.yaml").write_text(
        yaml.safe_dump(ENTITIES, allow_unicode=True), encoding="utf-8"
    )
    return root


def resolver(*items: dict[str, Any], normalized_text: str = "", **extra: Any) -> dict[str, Any]:
    """AdaOS's entity-resolver result."""
    return {
        "raw_text": "",
        "normalized_text": normalized_text,
        "resolved_entities": list(items),
        "unresolved_entity_spans": [],
        "ambiguities": [],
        **extra,
    }


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path, make_config: Callable[..., Config]) -> TestClient:
    catalog = write_home_catalog(tmp_path / "catalog")
    state = ServiceState(make_config(catalog_dir=str(catalog)))
    client = await aiohttp_client(create_app(state))
    for _ in range(500):
        if state.ready:
            break
        await asyncio.sleep(0.02)
    assert state.ready
    return client


async def parse(client: TestClient, **body: Any) -> dict[str, Any]:
    resp = await client.post("/parse", json=body)
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    assert data["result"]["evidence"] == data["evidence"]
    return data


def entities_of(body: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    return [(e["placeholder"], e["ref"], e["match_type"]) for e in body["evidence"]["entities"]]


async def test_spanless_ref_is_located_by_its_registry_aliases(client: TestClient) -> None:
    # "лампу" is two lamps in the registry; the hub resolved it, with no span: its ref decides.
    alone = await parse(client, text="выключи лампу")
    assert alone["evidence"]["ambiguities"][0]["candidates"] == [
        "device:light:desk_lamp",
        "device:light:floor_lamp",
    ]
    body = await parse(
        client,
        text="выключи лампу",
        entities=resolver({"canonical_ref": "device:light:floor_lamp"}),
    )
    assert body["top_intent"] == "device.turn_off" and body["decision"] == "accept"
    assert body["slots"] == {"device": "device:light:floor_lamp"}
    assert body["evidence"]["canonicalized_text"] == "выключи {device}"
    assert entities_of(body) == [("device", "device:light:floor_lamp", "hub_alias")]
    (ent,) = body["evidence"]["entities"]
    assert (ent["text"], ent["source"]) == ("лампу", "hub")
    assert "ambiguities" not in body["evidence"]  # the hub settled it


async def test_adaos_shape_ref_unknown_here_is_placed_by_the_hubs_canonicalized_text(
    client: TestClient,
) -> None:
    """AdaOS's own test payload: a ref our registry does not know, its placeholder in the hub's text."""
    entities = resolver({"canonical_ref": "device:member:node-1"}, normalized_text="turn off the {device}")
    body = await parse(
        client, text="Turn off the Kitchen", canonicalized_text="turn off the {device}", entities=entities
    )
    assert body["top_intent"] == "device.turn_off" and body["decision"] == "accept"
    assert body["slots"] == {"device": "device:member:node-1"}  # not our room:kitchen
    assert body["evidence"]["canonicalized_text"] == "turn off the {device}"
    assert entities_of(body) == [("device", "device:member:node-1", "hub_text")]
    assert body["evidence"]["entities"][0]["text"] == "kitchen"


async def test_spanless_ref_nowhere_in_the_text_stays_a_slot_without_masking(client: TestClient) -> None:
    body = await parse(
        client,
        text="turn it off",
        entities=resolver(
            {"canonical_ref": "device:climate:heater", "kind": "device.climate", "confidence": 0.8}
        ),
    )
    assert body["top_intent"] == "device.turn_off"
    assert body["slots"] == {"device": "device:climate:heater"}
    assert body["evidence"]["canonicalized_text"] == "turn it off"  # nothing masked
    (ent,) = body["evidence"]["entities"]
    assert ent["match_type"] == "hub_unlocated" and ent["source"] == "hub"
    assert (ent["start"], ent["end"], ent["text"], ent["confidence"]) == (-1, -1, "", 0.8)


async def test_a_located_entity_fills_the_slot_before_an_unlocated_one(client: TestClient) -> None:
    body = await parse(
        client, text="выключи телевизор", entities=resolver({"canonical_ref": "device:climate:heater"})
    )
    assert body["slots"] == {"device": "device:media:tv"}
    assert entities_of(body) == [
        ("device", "device:media:tv", "exact"),
        ("device", "device:climate:heater", "hub_unlocated"),
    ]


async def test_ambiguity_candidates_come_back_as_the_objects_the_hub_sent(client: TestClient) -> None:
    candidates = [
        {"canonical_ref": "device:light:desk_lamp", "display_label": "Desk lamp", "confidence": 0.5},
        {"canonical_ref": "device:light:floor_lamp", "display_label": "Floor lamp", "confidence": 0.5},
        "device:light:spare",
    ]
    body = await parse(
        client,
        text="turn off the light",
        entities=resolver(ambiguities=[{"text": "light", "candidates": candidates}]),
    )
    (amb,) = body["evidence"]["ambiguities"]
    assert amb == {"text": "light", "candidates": candidates}


@pytest.mark.parametrize(
    ("top", "normalized", "used"),
    [
        # AdaOS today: both are the lower-cased text; nothing to take from them.
        ("turn off the garage heater", "turn off the garage heater", False),
        # The request's canonicalized_text carries placeholders: it is the hub's text.
        ("turn off the {device}", "turn off the garage heater", True),
        # It carries none, the resolver's normalized_text does: that one counts.
        ("turn off the garage heater", "turn off the {device}", True),
        # A placeholder the service does not know voids the hub's text.
        ("turn off the {person}", "turn off the {device}", False),
        # A text that does not line up with the words is not used.
        ("switch off the {device}", "", False),
    ],
)
async def test_canonicalized_text_precedence(
    client: TestClient, top: str, normalized: str, used: bool
) -> None:
    body = await parse(
        client,
        text="turn off the garage heater",
        canonicalized_text=top,
        entities=resolver({"canonical_ref": "device:climate:garage_heater"}, normalized_text=normalized),
    )
    if used:
        assert body["top_intent"] == "device.turn_off" and body["decision"] == "accept"
        assert body["slots"] == {"device": "device:climate:garage_heater"}
        assert body["evidence"]["canonicalized_text"] == "turn off the {device}"
        assert entities_of(body) == [("device", "device:climate:garage_heater", "hub_text")]
        assert body["evidence"]["entities"][0]["text"] == "garage heater"
    else:
        assert body["evidence"]["canonicalized_text"] == "turn off the garage heater"
        assert entities_of(body) == [("device", "device:climate:garage_heater", "hub_unlocated")]


async def test_hub_text_placeholder_without_an_entity_masks_only_where_the_service_finds_nothing(
    client: TestClient,
) -> None:
    body = await parse(client, text="turn off the garage heater", canonicalized_text="turn off the {device}")
    assert body["evidence"]["canonicalized_text"] == "turn off the {device}"
    assert entities_of(body) == [("device", None, "hub_text")]
    # Where the service has its own match, it stands: "tv" is the registry's device:media:tv.
    body = await parse(client, text="turn off the tv", canonicalized_text="turn off the {device}")
    assert entities_of(body) == [("device", "device:media:tv", "exact")]
    assert body["slots"] == {"device": "device:media:tv"}


def test_hub_text_alignment_is_bounded(tmp_path: Path) -> None:
    """A hostile payload (long text, many placeholders) costs no more than a plain request."""
    canon = Canonicalizer(load_catalog(write_home_catalog(tmp_path / "catalog")))
    words = " ".join(["a"] * 120)
    hub = {"canonicalized_text": " ".join(["{device}"] * 8) + " b", "resolved_entities": []}
    result = canon.canonicalize(words, "en", hub)
    assert result.masked == words  # no alignment exists, and finding that out is quick
    hub = {"canonicalized_text": " ".join(["{device}"] * 9), "resolved_entities": []}
    assert canon.canonicalize(" ".join(["a"] * 9), "en", hub).masked == " ".join(["a"] * 9)
    hub = {"canonicalized_text": "{device} " + " ".join(["a"] * 8), "resolved_entities": []}
    assert canon.canonicalize(" ".join(["a"] * 9), "en", hub).masked == "{device} " + " ".join(["a"] * 8)
