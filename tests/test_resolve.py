"""Registry resolution of tagged spans and of room-less aliases (skill/resolve.py) over the repo catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from skill.canonicalize import Canonicalizer
from skill.catalog import Catalog, SlotSpec, load_catalog
from skill.resolve import SpanResolver

REPO = Path(__file__).resolve().parents[1]
DEVICE = SlotSpec(source="device", value="ref")
LIGHT = SlotSpec(source="device", value="ref", kinds=("light",))


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(REPO / "catalog")


@pytest.fixture(scope="module")
def canon(catalog: Catalog) -> Canonicalizer:
    return Canonicalizer(catalog)


@pytest.fixture(scope="module")
def resolver(catalog: Catalog, canon: Canonicalizer) -> SpanResolver:
    return SpanResolver(catalog, canon.lemmatizer)


@pytest.mark.parametrize(
    ("text", "spec", "rooms", "ref"),
    [
        # A kind noun and a named room: the room's one device of that kind, in either language and case.
        ("lamp", DEVICE, ["room:bedroom"], "device:light:bedroom_lamp"),
        ("лампу", DEVICE, ["room:bedroom"], "device:light:bedroom_lamp"),
        ("лампочку", DEVICE, ["room:kitchen"], "device:light:kitchen_ceiling"),
        ("bulb", LIGHT, ["room:hallway"], "device:light:hallway"),
        ("кондей", DEVICE, ["room:bedroom"], "device:climate:bedroom_ac"),
        # The whole phrase, word order free, when no alias matched it word for word.
        ("ceiling light kitchen", DEVICE, [], "device:light:kitchen_ceiling"),
    ],
)
def test_tagged_span_gets_the_registry_ref(
    resolver: SpanResolver, text: str, spec: SlotSpec, rooms: list[str], ref: str
) -> None:
    placed = resolver.resolve(text, spec, "device", rooms)
    assert placed is not None and placed.ref == ref and 0 < placed.confidence < 1


def test_ambiguous_or_unknown_spans_stay_unresolved(resolver: SpanResolver) -> None:
    # Three kinds of device in the kitchen and nothing says which: no ref, the candidates are named.
    placed = resolver.resolve("штуку", DEVICE, "device", ["room:kitchen"])
    assert placed is not None and placed.ref is None and len(placed.candidates) > 1
    # A name with no room and no near alias: nothing to place.
    assert resolver.resolve("projector", DEVICE, "device", []) is None
    # A kind the slot does not accept: the bedroom's AC is no light.
    assert resolver.resolve("кондиционер", LIGHT, "device", ["room:bedroom"]) is None
    # The attic has no devices.
    assert resolver.resolve("lamp", DEVICE, "device", ["room:attic"]) is None


def test_place_marks_resolved_and_unresolved_spans(resolver: SpanResolver, catalog: Catalog) -> None:
    intent = catalog.intents["device.turn_on"]
    spans = [
        {"slot": "device", "text": "lamp", "start": 12, "end": 16, "confidence": 0.9},
        {"slot": "song", "text": "imagine", "start": 0, "end": 7, "confidence": 0.9},  # not this intent's
    ]
    canon = Canonicalizer(catalog).canonicalize("turn on the lamp in the bedroom", "en")
    ((placed, candidates),) = resolver.place(intent, spans, canon.entities)
    assert placed.ref == placed.value == "device:light:bedroom_lamp"
    assert placed.kind == "device.light" and placed.source == "tagger" and placed.match_type == "tagged_room"
    assert placed.confidence <= 0.9 and candidates == ()
    # An open slot is never looked up in the registry.
    song = [{"slot": "song", "text": "kitchen light", "start": 5, "end": 18, "confidence": 0.8}]
    ((entity, _),) = resolver.place(catalog.intents["music.play"], song, ())
    assert entity.ref is None and entity.value == "kitchen light" and entity.match_type == "tagged"


@pytest.mark.parametrize(
    ("text", "lang", "ref"),
    [
        # «шторы» alone is the living room's alias; said with the bedroom, it is the bedroom's cover.
        ("открой шторы в спальне", "ru", "device:cover:bedroom_blinds"),
        ("close the blinds in the living room", "en", "device:cover:living_room_curtains"),
        # The alias names its own room: the user said both, nothing is swapped.
        ("открой шторы в гостиной", "ru", "device:cover:living_room_curtains"),
        ("close the living room curtains in the bedroom", "en", "device:cover:living_room_curtains"),
        # Two rooms named: no single room to move to.
        ("close the blinds in the bedroom and the kitchen", "en", "device:cover:bedroom_blinds"),
    ],
)
def test_room_less_alias_follows_the_named_room(
    resolver: SpanResolver, canon: Canonicalizer, text: str, lang: str, ref: str
) -> None:
    out = resolver.reconcile(canon.canonicalize(text, lang))
    devices = [e for e in out.entities if e.placeholder == "device"]
    assert [e.ref for e in devices] == [ref] and devices[0].value == ref


def test_pipeline_reconciles_rooms_first() -> None:
    """The pipeline reconciles rooms before any stage sees the entities (no model needed for that)."""
    from skill.pipeline import Pipeline

    catalog = load_catalog(REPO / "catalog")
    pipe = Pipeline(catalog, Canonicalizer(catalog), regex=None, ranker=None)
    res = pipe.parse("открой шторы в спальне", "ru")
    assert [e["ref"] for e in res.decision.evidence["entities"] if e["placeholder"] == "device"] == [
        "device:cover:bedroom_blinds"
    ]


def test_ambiguous_tagged_span_is_reported_as_an_ambiguity(catalog: Catalog) -> None:
    """Through the pipeline: the tagger's span (from a stand-in stage) that three kitchen devices could
    be is unresolved, with its candidates, and an ambiguity in AdaOS's ``{text, candidates}`` shape."""
    from skill.decision import Decision, Outcome
    from skill.pipeline import Pipeline

    class Tags:
        model_id = "stand-in"

        def decide(self, canonical):  # noqa: ANN001, ANN202 - the ModelStage protocol
            start = canonical.normalized.index("штуку")
            span = {"slot": "device", "text": "штуку", "start": start, "end": start + 5, "confidence": 0.9}
            return Decision(
                intent="device.turn_on",
                confidence=0.99,
                outcome=Outcome.ACCEPT,
                via="neural",
                evidence={"tagged_spans": [span]},
            )

    pipe = Pipeline(catalog, Canonicalizer(catalog), regex=None, ranker=Tags())
    res = pipe.parse("включи штуку на кухне", "ru")
    (span,) = res.decision.evidence["unresolved_entity_spans"]
    assert span["text"] == "штуку" and len(span["candidates"]) > 1
    assert {"text": "штуку", "candidates": span["candidates"]} in res.decision.evidence["ambiguities"]
    assert res.decision.slots["device"] == "штуку" and res.decision.slots["room"] == "room:kitchen"


@pytest.mark.parametrize(
    ("text", "lang", "model"),
    [
        # The model sees which kind of device and which list a placeholder stands for (train = serve):
        # "закрой {device}" is a curtain or a lock, "my {list}" is the shopping or the to-do list.
        ("закрой шторы и входную дверь", "ru", "закрой {device_cover} и {device_lock}"),
        ("add milk to my shopping list", "en", "add milk to my {list_shopping}"),
        ("what is on my to do list", "en", "what is on my {list_todo}"),
        ("добавь хлеб в список покупок", "ru", "добавь хлеб в {list_shopping}"),
        ("turn on the lamp", "en", "turn on the lamp"),
    ],
)
def test_model_text_names_device_kinds_and_lists(
    canon: Canonicalizer, text: str, lang: str, model: str
) -> None:
    from skill.features import model_text

    out = canon.canonicalize(text, lang)
    assert model_text(out) == model
    # Regex rules and evidence keep the plain placeholder.
    assert "{device}" in out.masked or "{list}" in out.masked or out.masked == model
