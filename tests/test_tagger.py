"""The slot tagger: markup → spans → BIO labels, label-aware augmentation, a tiny train → serve run."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from skill.canonicalize import Canonicalizer
from skill.catalog import load_catalog, parse_markup
from skill.features import FeatureSpec
from skill.tagging import bio_labels, tag_names, token_map
from tests.conftest import REPO
from tools import train as trainer
from tools._augment import augment_tagged, span_pool, swap_spans, tag_spans
from tools._data import rows_from_catalog

PATTERN = re.compile(FeatureSpec().token_pattern)


@pytest.fixture(scope="module")
def canon() -> Canonicalizer:
    return Canonicalizer(load_catalog(REPO / "catalog"))


def _labels(canon: Canonicalizer, marked: str, slots: list[str], locale: str) -> list[tuple[str, str]]:
    text, spans = parse_markup(marked)
    c = canon.canonicalize(text, locale)
    tmap = token_map(c, PATTERN, 32)
    assert tmap is not None
    tags = tag_names(slots)
    ids = bio_labels(c, [(s.start, s.end, s.slot) for s in spans], tags, tmap)
    return list(zip(tmap.tokens, [tags[i] for i in ids], strict=True))


def test_bio_alignment_russian_inflection_and_rooms(canon: Canonicalizer) -> None:
    got = _labels(canon, "включи [настольную лампу](device) в [кабинете](room)", ["device", "room"], "ru")
    assert got == [
        ("включи", "O"),
        ("настольную", "B-device"),
        ("лампу", "I-device"),
        ("в", "O"),
        ("кабинете", "B-room"),
    ]


def test_registry_names_stay_placeholders(canon: Canonicalizer) -> None:
    got = _labels(canon, "выключи [свет на кухне](device) и [торшер](device)", ["device"], "ru")
    assert [lab for _, lab in got] == ["O", "O", "O", "O"]
    assert got[1][0] == "{device_light}"


def test_multi_word_names_and_two_slots(canon: Canonicalizer) -> None:
    got = _labels(canon, "play [bohemian rhapsody](song) by [queen](artist)", ["song", "artist"], "en")
    assert [lab for _, lab in got] == ["O", "B-song", "I-song", "O", "B-artist"]


def test_placeholder_inside_an_open_span_belongs_to_it(canon: Canonicalizer) -> None:
    got = _labels(canon, "remind me to [buy 2 cakes](text)", ["text"], "en")
    assert [lab for _, lab in got] == ["O", "O", "O", "B-text", "I-text", "I-text"]


def test_augmentation_keeps_labels_aligned() -> None:
    rng = random.Random(3)
    words = ["please", "play", "bohemian", "rhapsody", "by", "queen", "now"]
    tags = [0, 0, 1, 2, 0, 3, 0]  # O O B-song I-song O B-artist O
    for _ in range(300):
        w, t = augment_tagged(words, tags, rng, 1.0)
        assert len(w) == len(t)
        for prev, cur in zip([0, *t], t, strict=False):
            assert not (cur % 2 == 0 and cur > 0 and prev not in (cur, cur - 1)), (w, t)


def test_span_swap_replaces_names_within_slot_and_intent() -> None:
    rows = [
        (0, ["play", "bohemian", "rhapsody", "by", "queen"], [0, 1, 2, 0, 3]),
        (0, ["play", "yesterday", "by", "the", "beatles"], [0, 1, 0, 3, 4]),
        (0, ["play", "{number}", "luftballons"], [0, 1, 2]),  # a placeholder span is never pooled
        (1, ["add", "oat", "milk"], [0, 5, 6]),
    ]
    assert tag_spans([0, 1, 2, 0, 3, 4]) == [(1, 3, 1), (4, 6, 3)]
    pool = span_pool(rows)
    assert pool[(0, 1)] == [("bohemian", "rhapsody"), ("yesterday",)]
    assert (1, 5) not in pool  # one item only: nothing to swap with
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        w, t = swap_spans(rows[0][1], rows[0][2], 0, pool, rng, 1.0)
        assert len(w) == len(t) and w[0] == "play" and t[0] == 0
        spans = tag_spans(t)
        assert [s[2] for s in spans] == [1, 3]  # the same slots in the same order, BIO kept
        seen.add(" ".join(w))
    assert "play yesterday by the beatles" in seen and "play bohemian rhapsody by queen" in seen
    assert swap_spans(rows[3][1], rows[3][2], 1, pool, rng, 1.0) == (rows[3][1], rows[3][2])
    assert swap_spans(rows[2][1], rows[2][2], 0, pool, rng, 1.0) == (rows[2][1], rows[2][2])


TAG_INTENTS: dict[str, Any] = {
    "schema_version": 1,
    "owner": {"type": "skill", "id": "tagging"},
    "intents": [
        {
            "intent": "device.turn_on",
            "description": {"en": "Turn a device on"},
            "slots": {
                "device": {"source": "device", "value": "ref", "required": True},
                "room": {"source": "room", "value": "ref"},
            },
            "examples": {
                "en": [
                    "turn on the [ceiling fan](device)",
                    "switch on the [desk lamp](device) in the [study](room)",
                    "turn on the [projector](device)",
                    "please turn on the [soundbar](device)",
                    "turn the [ceiling fan](device) on",
                    "switch on the [projector](device) in the [attic](room)",
                    "turn on the [fairy lights](device) in the [garden](room)",
                    "can you turn on the [desk lamp](device)",
                    "turn on the [kitchen light](device)",
                    "switch on the [heater](device)",
                    "turn on the [soundbar](device) in the [study](room)",
                    "switch the [fairy lights](device) on",
                ],
                "ru": [
                    "включи [настольную лампу](device)",
                    "включи [проектор](device) в [кабинете](room)",
                    "включи [вентилятор](device)",
                    "включи [гирлянду](device) на [балконе](room)",
                    "включи [свет на кухне](device)",
                    "вруби [проектор](device)",
                    "включи [настольную лампу](device) в [кабинете](room)",
                    "включи [вентилятор](device) на [балконе](room)",
                ],
            },
        },
        {
            "intent": "music.play",
            "description": {"en": "Play music"},
            "slots": {"artist": {"open": True}, "song": {"open": True}},
            "examples": {
                "en": [
                    "play [yesterday](song) by [the beatles](artist)",
                    "play something by [queen](artist)",
                    "put on [abba](artist)",
                    "play [imagine](song)",
                    "i want to hear [queen](artist)",
                    "play [hey jude](song) by [the beatles](artist)",
                    "play some music",
                    "put on [imagine](song) by [john lennon](artist)",
                    "play [abba](artist) please",
                    "music please",
                ],
                "ru": [
                    "включи [кино](artist)",
                    "поставь песню [группа крови](song)",
                    "включи музыку",
                    "поставь [земфиру](artist)",
                    "включи [звезда по имени солнце](song) группы [кино](artist)",
                ],
            },
        },
    ],
    "out_of_scope": {
        "en": ["who invented the light bulb", "what is the meaning of life"],
        "ru": ["кто выиграл матч"],
    },
}


@pytest.fixture(scope="module")
def tagged_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tagger")
    root = tmp / "catalog"
    (root / "intents").mkdir(parents=True)
    shutil.copytree(REPO / "catalog" / "entities", root / "entities")
    shutil.copy(REPO / "catalog" / "masking.yaml", root / "masking.yaml")
    (root / "intents" / "t.yaml").write_text(
        yaml.safe_dump(TAG_INTENTS, allow_unicode=True), encoding="utf-8"
    )
    catalog = load_catalog(root)
    train, val = rows_from_catalog(catalog)
    assert any(r.spans for r in train)
    path = trainer.train_model(
        train, val, tmp / "models", catalog=catalog, progress=False, use_oos_train=True
    )
    return root, path


def test_tiny_train_serves_tagged_slots(tagged_model: tuple[Path, Path]) -> None:
    import msgspec

    from skill.canonicalize import Canonicalizer as Canon
    from skill.pipeline import Pipeline
    from skill.ranker import Ranker
    from skill.regex_stage import RegexStage

    root, model = tagged_model
    cfg = msgspec.json.decode((model / "ranker_config.json").read_bytes())
    assert "B-device" in cfg["tags"] and "B-artist" in cfg["tags"]
    assert cfg["tag_slots"]["music.play"] == ["artist", "song"]
    metrics = msgspec.json.decode((model / "metrics.json").read_bytes())
    assert metrics["tagger"]["val_spans"] >= 1
    catalog = load_catalog(root)
    pipe = Pipeline(catalog, Canon(catalog), regex=RegexStage(catalog), ranker=Ranker.load(model))

    res = pipe.parse("turn on the projector in the attic", "en")
    assert res.decision.intent == "device.turn_on"
    assert res.decision.slots == {"device": "projector", "room": "attic"}
    spans = res.decision.evidence["unresolved_entity_spans"]
    assert {s["slot"] for s in spans} == {"device", "room"} and all(0 < s["confidence"] <= 1 for s in spans)
    tagged = [e for e in res.decision.evidence["entities"] if e["source"] == "tagger"]
    assert tagged and all(e["ref"] is None for e in tagged)
    assert not res.missing_slots

    # A registry name keeps its ref: canonicalization wins over the tagger.
    res = pipe.parse("turn on the kitchen light", "en")
    assert res.decision.slots["device"] == "device:light:kitchen_ceiling"
    assert "unresolved_entity_spans" not in res.decision.evidence

    res = pipe.parse("включи проектор в кабинете", "ru")
    assert res.decision.slots.get("device") == "проектор" and res.decision.slots.get("room") == "кабинете"

    res = pipe.parse("play imagine by queen", "en")
    assert res.decision.intent == "music.play"
    assert res.decision.slots.get("artist") == "queen"
