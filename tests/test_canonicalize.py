"""Canonicalization: names (ru inflections, en plurals, typos), ambiguity, hub entities, odd input."""

from __future__ import annotations

import json
import logging
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest

from skill.canonicalize import Canonical, Canonicalizer, detect_locale
from skill.catalog import CatalogError, load_catalog
from skill.values import MaskingRules

REPO = Path(__file__).resolve().parents[1]

INTENTS = """\
schema_version: 1
owner: {type: builtin, id: test}
intents:
  - intent: test.noop
    description: {en: noop}
    examples: {en: [noop]}
"""

ENTITIES = """\
schema_version: 1
kinds:
  room:
    - {ref: "room:kitchen", aliases: {ru: [кухня], en: [kitchen]}}
    - {ref: "room:living_room", aliases: {ru: [гостиная, зал], en: [living room]}}
    - {ref: "room:bedroom", aliases: {ru: [спальня], en: [bedroom]}}
    - {ref: "room:kids_room", aliases: {ru: [детская], en: [kids room, nursery]}}
  device.light:
    - {ref: "device:light:kitchen_ceiling", room: kitchen,
       aliases: {ru: [свет на кухне, кухонный свет], en: [kitchen light, kitchen ceiling light]}}
    - {ref: "device:light:living_room_lamp", room: living_room,
       aliases: {ru: [свет в гостиной, торшер], en: [living room light, floor lamp]}}
    - {ref: "device:light:bedroom_lamp", room: bedroom,
       aliases: {ru: [свет в спальне, ночник, настольная лампа], en: [bedroom light, desk lamp]}}
    - {ref: "device:light:office_lamp", aliases: {ru: [настольная лампа], en: [desk lamp]}}
  device.climate:
    - {ref: "device:climate:bedroom_ac", room: bedroom,
       aliases: {ru: [кондиционер], en: [air conditioner, ac]}}
  device.media:
    - {ref: "device:media:tv", room: living_room, aliases: {ru: [телевизор, тв], en: [tv, television]}}
  device.plug:
    - {ref: "device:plug:coffee_machine", aliases: {ru: [кофемашина, кофеварка], en: [coffee machine]}}
  scenario:
    - {ref: "scenario:morning", aliases: {ru: [утро, утренний сценарий], en: [morning, morning scenario]}}
    - {ref: "scenario:evening", aliases: {ru: [вечерний сценарий], en: [evening scenario]}}
    - {ref: "scenario:movie_night", aliases: {ru: [кино], en: [movie night]}}
  app:
    - {ref: "app:weather", aliases: {ru: [погода, приложение погоды], en: [weather app]}}
    - {ref: "app:telegram", aliases: {ru: [телеграм], en: [telegram]}}
  modal:
    - {ref: "modal:settings", aliases: {ru: [настройки], en: [settings]}}
  webspace:
    - {ref: "webspace:desktop", aliases: {ru: [рабочий стол], en: [desktop]}}
    - {ref: "webspace:kitchen_panel", aliases: {ru: [кухонная панель], en: [kitchen panel]}}
  skill:
    - {ref: "skill:weather_skill", aliases: {ru: [навык погоды], en: [weather skill]}}
"""


def make_catalog(root: Path, entities: str | None = None) -> Path:
    """A catalog in ``root``: a tiny intents file, the repo's masking.yaml, optional entities."""
    (root / "intents").mkdir(parents=True)
    (root / "entities").mkdir()
    (root / "intents" / "test.yaml").write_text(INTENTS, encoding="utf-8")
    if entities is not None:
        (root / "entities" / "test.yaml").write_text(entities, encoding="utf-8")
    shutil.copy(REPO / "catalog" / "masking.yaml", root / "masking.yaml")
    return root


@pytest.fixture(scope="module")
def canon(tmp_path_factory: pytest.TempPathFactory) -> Canonicalizer:
    root = make_catalog(tmp_path_factory.mktemp("canon"), ENTITIES)
    return Canonicalizer(load_catalog(root))


@pytest.fixture(scope="module")
def repo_canon() -> Canonicalizer:
    return Canonicalizer(load_catalog(REPO / "catalog"))


def summary(result: Canonical) -> list[tuple[str, str, str]]:
    return [(e.placeholder, e.value, e.match_type) for e in result.entities]


def check_offsets(result: Canonical) -> None:
    for e in result.entities:
        assert result.normalized[e.start : e.end] == e.text
    assert result.masked.count("{") == len(result.entities)


@pytest.mark.parametrize(
    ("text", "masked", "expected"),
    [
        (
            "turn off the kitchen light",
            "turn off the {device}",
            [("device", "device:light:kitchen_ceiling", "exact")],
        ),
        (
            "Turn off the KITCHEN LIGHTS!",
            "turn off the {device}",
            [("device", "device:light:kitchen_ceiling", "lemma")],
        ),
        ("выключи свет на кухне", "выключи {device}", [("device", "device:light:kitchen_ceiling", "exact")]),
        ("выключи кухонный свет", "выключи {device}", [("device", "device:light:kitchen_ceiling", "exact")]),
        ("включи свет в спальне", "включи {device}", [("device", "device:light:bedroom_lamp", "exact")]),
        ("включи свет в гостиной", "включи {device}", [("device", "device:light:living_room_lamp", "exact")]),
        ("включи телевизор", "включи {device}", [("device", "device:media:tv", "exact")]),
        ("громкость телевизора", "громкость {device}", [("device", "device:media:tv", "lemma")]),
        (
            "подключись к кондиционеру",
            "подключись к {device}",
            [("device", "device:climate:bedroom_ac", "lemma")],
        ),
        (
            "включи кофеварку на кухне",
            "включи {device} на {room}",
            [("device", "device:plug:coffee_machine", "lemma"), ("room", "room:kitchen", "lemma")],
        ),
        ("убери в гостиной", "убери в {room}", [("room", "room:living_room", "lemma")]),
        ("музыка в зале", "музыка в {room}", [("room", "room:living_room", "lemma")]),
        ("включи свет в детской", "включи свет в {room}", [("room", "room:kids_room", "lemma")]),
        # A noun alias does not match its adjective homograph.
        ("расскажи детский анекдот", "расскажи детский анекдот", []),
        ("tidy the living room", "tidy the {room}", [("room", "room:living_room", "exact")]),
        ("включи утренний сценарий", "включи {scenario}", [("scenario", "scenario:morning", "exact")]),
        ("включи сценарий утро", "включи сценарий {scenario}", [("scenario", "scenario:morning", "exact")]),
        ("start the movie night", "start the {scenario}", [("scenario", "scenario:movie_night", "exact")]),
        ("открой настройки", "открой {modal}", [("modal", "modal:settings", "exact")]),
        ("open settings", "open {modal}", [("modal", "modal:settings", "exact")]),
        ("перейди на рабочий стол", "перейди на {webspace}", [("webspace", "webspace:desktop", "exact")]),
        ("что на рабочем столе", "что на {webspace}", [("webspace", "webspace:desktop", "lemma")]),
        ("open the kitchen panel", "open the {webspace}", [("webspace", "webspace:kitchen_panel", "exact")]),
        ("запусти навык погоды", "запусти {skill}", [("skill", "skill:weather_skill", "exact")]),
        ("открой телеграм", "открой {app}", [("app", "app:telegram", "exact")]),
        ("открой погоду", "открой {app}", [("app", "app:weather", "lemma")]),
        # A weak alias ("погода") gives way when anything else is masked.
        ("погода в Москве", "погода в {city}", [("city", "Moscow", "lemma")]),
        (
            "в 7 утра включи утренний сценарий",
            "в {time} включи {scenario}",
            [("time", "07:00", "parsed"), ("scenario", "scenario:morning", "exact")],
        ),
        (
            "включи свет в гостиной и телевизор",
            "включи {device} и {device}",
            [("device", "device:light:living_room_lamp", "exact"), ("device", "device:media:tv", "exact")],
        ),
        (
            "включи тв на 20 минут",
            "включи {device} на {duration}",
            [("device", "device:media:tv", "exact"), ("duration", "PT20M", "parsed")],
        ),
    ],
)
def test_registry(canon: Canonicalizer, text: str, masked: str, expected: list[tuple[str, str, str]]) -> None:
    result = canon.canonicalize(text)
    assert result.masked == masked
    assert summary(result) == expected
    check_offsets(result)


def test_registry_entity_shape(canon: Canonicalizer) -> None:
    (match,) = canon.canonicalize("выключи свет на кухне").entities
    assert match.kind == "device.light"
    assert match.ref == match.value == "device:light:kitchen_ceiling"
    assert (match.source, match.confidence) == ("registry", 1.0)
    lemma = canon.canonicalize("выключи телевизора").entities[0]
    assert 0.0 < lemma.confidence < 1.0


@pytest.mark.parametrize(
    ("text", "masked", "value"),
    [
        ("turn on the televison", "turn on the {device}", "device:media:tv"),
        ("включи кондиционр", "включи {device}", "device:climate:bedroom_ac"),
        ("включи телевизер", "включи {device}", "device:media:tv"),
        ("open telegramm", "open {app}", "app:telegram"),
    ],
)
def test_fuzzy(canon: Canonicalizer, text: str, masked: str, value: str) -> None:
    result = canon.canonicalize(text)
    assert result.masked == masked
    (match,) = result.entities
    assert (match.value, match.match_type) == (value, "fuzzy")
    assert 0.0 < match.confidence < 1.0


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        # everyday words that are also one-word scenario aliases: no cue, no mask
        ("напомни мне вечером позвонить маме", "напомни мне вечером позвонить маме"),
        ("what should i do at work today", "what should i do at work {date}"),
        ("i am away next week", "i am away next week"),
        ("it is a beautiful morning", "it is a beautiful morning"),
        ("во сколько начинается кино", "во сколько начинается кино"),
        # a cue within two words before, or right after
        ("переключи на утро", "переключи на {scenario}"),
        ("запусти вечер", "запусти {scenario}"),
        ("включи режим кино", "включи режим {scenario}"),
        ("start evening", "start {scenario}"),
        ("set the scenario to away", "set the scenario to {scenario}"),
        ("вечер сценарий", "{scenario} сценарий"),
        # multi-word aliases need no cue
        ("доброе утро", "{scenario}"),
        ("movie night please", "{scenario} please"),
    ],
)
def test_everyday_word_aliases_need_a_cue(repo_canon: Canonicalizer, text: str, masked: str) -> None:
    assert repo_canon.canonicalize(text).masked == masked


@pytest.mark.parametrize(
    "text",
    ["kitten light", "turn on the tc", "open the telegraph", "включи телевидение", "включи кондитера"],
)
def test_no_fuzzy_false_positive(canon: Canonicalizer, text: str) -> None:
    assert not [e for e in canon.canonicalize(text).entities if e.match_type == "fuzzy"]


@pytest.mark.parametrize(
    ("text", "masked", "match_type"),
    [
        ("включи настольную лампу", "включи {device}", "lemma"),
        ("turn on the desk lamp", "turn on the {device}", "exact"),
    ],
)
def test_ambiguous_name(canon: Canonicalizer, text: str, masked: str, match_type: str) -> None:
    result = canon.canonicalize(text)
    assert result.masked == masked
    (match,) = result.entities
    assert match.value == "device:light:bedroom_lamp"  # first candidate by sort order
    assert match.match_type == match_type
    assert match.confidence <= 0.5
    (amb,) = result.ambiguities
    assert amb.text == match.text
    assert amb.candidates == ("device:light:bedroom_lamp", "device:light:office_lamp")


@pytest.mark.parametrize(
    ("text", "unresolved"),
    [
        ("включи лампу", ("лампу",)),
        ("включи свет", ("свет",)),
        ("turn on the lamp", ("lamp",)),
        ("включи свет в детской", ("свет",)),
        ("включи сценарий утро", ()),
        ("выключи свет на кухне", ()),
    ],
)
def test_unresolved_kind_nouns(canon: Canonicalizer, text: str, unresolved: tuple[str, ...]) -> None:
    assert canon.canonicalize(text).unresolved == unresolved


def hub(*items: Any, **extra: Any) -> dict[str, Any]:
    return {
        "raw_text": "",
        "normalized_text": "",
        "resolved_entities": list(items),
        "unresolved_entity_spans": [],
        "ambiguities": [],
        **extra,
    }


@pytest.mark.parametrize(
    ("text", "hub_entities", "masked", "expected"),
    [
        # The hub's ref wins over the local registry for the same span.
        (
            "Включи свет на кухне",
            hub(
                {
                    "canonical_ref": "device:light:kitchen_spot",
                    "kind": "device.light",
                    "text": "свет на кухне",
                    "start": 7,
                    "end": 20,
                    "confidence": 0.9,
                    "match_type": "exact",
                }
            ),
            "включи {device}",
            [("device", "device:light:kitchen_spot", "hub")],
        ),
        # A hub span inside a local alias blocks the alias.
        (
            "включи свет на кухне",
            hub({"canonical_ref": "room:kitchen", "kind": "room", "text": "кухне"}),
            "включи свет на {room}",
            [("room", "room:kitchen", "hub")],
        ),
        # Offsets that do not line up: located by text.
        (
            "включи телевизор",
            hub(
                {
                    "canonical_ref": "device:media:tv",
                    "kind": "device.media",
                    "text": "Телевизор",
                    "start": 99,
                    "end": 3,
                }
            ),
            "включи {device}",
            [("device", "device:media:tv", "hub")],
        ),
        # No text: taken from the raw input by offsets.
        (
            "Включи Телевизор!",
            hub({"canonical_ref": "device:media:tv", "kind": "device.media", "start": 7, "end": 16}),
            "включи {device}",
            [("device", "device:media:tv", "hub")],
        ),
        # No kind: derived from the ref.
        (
            "открой кинотеатр",
            hub({"canonical_ref": "scenario:movie_night", "text": "кинотеатр"}),
            "открой {scenario}",
            [("scenario", "scenario:movie_night", "hub")],
        ),
        # Nearest occurrence to the hub's offset.
        (
            "тв и тв",
            hub({"canonical_ref": "device:media:tv2", "kind": "device.media", "text": "тв", "start": 5}),
            "{device} и {device}",
            [("device", "device:media:tv", "exact"), ("device", "device:media:tv2", "hub")],
        ),
        # Hub entities and local values together.
        (
            "включи торшер через 5 минут",
            hub({"canonical_ref": "device:light:x", "kind": "device.light", "text": "торшер"}),
            "включи {device} через {duration}",
            [("device", "device:light:x", "hub"), ("duration", "PT5M", "parsed")],
        ),
    ],
)
def test_hub_precedence(
    canon: Canonicalizer,
    text: str,
    hub_entities: dict[str, Any],
    masked: str,
    expected: list[tuple[str, str, str]],
) -> None:
    result = canon.canonicalize(text, hub_entities=hub_entities)
    assert result.masked == masked
    assert summary(result) == expected
    assert all(e.source == "hub" for e in result.entities if e.match_type == "hub")
    check_offsets(result)


def test_hub_confidence_and_passthrough(canon: Canonicalizer) -> None:
    data = hub(
        {"canonical_ref": "device:media:tv", "kind": "device.media", "text": "телевизор", "confidence": 0.7},
        ambiguities=[{"text": "лампа", "candidates": ["device:light:a", "device:light:b"]}],
        unresolved_entity_spans=[{"text": "лампу", "start": 0, "end": 5}, "штуку"],
    )
    result = canon.canonicalize("включи телевизор", hub_entities=data)
    assert result.entities[0].confidence == 0.7
    assert result.ambiguities[0].candidates == ("device:light:a", "device:light:b")
    assert result.unresolved == ("лампу", "штуку")


BAD_ITEMS: list[Any] = [
    None,
    5,
    "device:media:tv",
    [],
    {},
    {"canonical_ref": 5},
    {"canonical_ref": ""},
    {"canonical_ref": "device:light:x", "text": 7},
    {"canonical_ref": "device:light:x", "text": "нет такого"},
    {"canonical_ref": "device:light:x", "start": "a", "end": None},
    {"canonical_ref": "device:light:x", "start": 5, "end": 500},
    {"canonical_ref": "person:bob", "kind": "person", "text": "включи"},
    {"canonical_ref": "device:light:x", "kind": ["device"], "text": "   "},
]


@pytest.mark.parametrize(
    "hub_entities",
    [
        "garbage",
        42,
        [],
        {},
        {"resolved_entities": None},
        {"resolved_entities": "x"},
        {
            "resolved_entities": BAD_ITEMS,
            "ambiguities": [None, {"text": 1}, {"text": "x", "candidates": 3}],
            "unresolved_entity_spans": 7,
        },
        {
            "resolved_entities": [
                {
                    "canonical_ref": "device:media:tv",
                    "kind": "device.media",
                    "text": "телевизор",
                    "confidence": float("nan"),
                }
            ],
            "ambiguities": "x",
            "unresolved_entity_spans": [None, 3],
        },
    ],
)
def test_malformed_hub_entities_are_ignored(
    canon: Canonicalizer, hub_entities: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        result = canon.canonicalize("включи телевизор на кухне", hub_entities=hub_entities)
    assert not caplog.records
    assert result.masked == "включи {device} на {room}"
    assert all(0.0 <= e.confidence <= 1.0 for e in result.entities)


def test_malformed_item_does_not_drop_good_ones(canon: Canonicalizer) -> None:
    good = {
        "canonical_ref": "device:media:tv9",
        "kind": "device.media",
        "text": "телевизор",
        "confidence": True,
    }
    result = canon.canonicalize("включи телевизор", hub_entities=hub(*BAD_ITEMS, good))
    # The items with a good ref but no usable span (no text, bad offsets, a text not in the input)
    # stay one slot without a span; the rest are dropped.
    assert summary(result) == [
        ("device", "device:media:tv9", "hub"),
        ("device", "device:light:x", "hub_unlocated"),
    ]
    assert result.entities[0].confidence == 1.0
    assert (result.entities[1].start, result.entities[1].end, result.entities[1].text) == (-1, -1, "")


ODD = [
    "",
    " ",
    "\t\n\r",
    "\x00\x01\x02\x07\x1b[31m",
    "😀🔥👍",
    "!!!???...,,,:::",
    "—–-",
    "\u200b\ufeff\u2028",
    "a" * 1000,
    "й" * 1000,
    "1" * 1000,
    "9" * 400 + " hours",
    "7:30:45",
    "99:99",
    "0.0.0.0",
    "1,2,3,4",
    "Включи light на kitchen в 7:30!!!",
    "مرحبا بالعالم",
    "你好世界 7 утра",
    "e\u0301te\u0301 й\u0306",
    "İstanbul'da hava",
    "ΣΊΣΥΦΟΣ",
    "ß ẞ ﬁ",
    "٣:٣٠",
    "² ³ ½",
    "<script>alert(1)</script>",
    "без",
    "пол",
    "half past",
    "quarter to",
    "a an and",
    "с половиной",
    "через",
    "на на на на",
    "в половине",
    "без четверти",
    "may",
    "5 th",
    "and a half hours",
    "one hundred hundred",
    "тысяча тысяч",
]


@pytest.mark.parametrize("text", ODD)
def test_odd_input_never_raises(canon: Canonicalizer, text: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        result = canon.canonicalize(text)
    assert not caplog.records, "the fallback path was taken"
    assert result.text == text
    assert result.locale in ("ru", "en")
    check_offsets(result)
    msgspec.json.encode(result)


def test_random_input_never_raises(canon: Canonicalizer, caplog: pytest.LogCaptureFixture) -> None:
    rnd = random.Random(7)
    words = (
        "в на через без половине восьмого семь 7 7:30 7.30 25 a an and half past to quarter hour "
        "минут часа полчаса полтора мая may th of утра pm свет кухне kitchen light москве 1,000 o "
        "oclock ноль сто hundred тысячи пол четверть будильник"
    ).split()
    chars = [chr(c) for c in [*range(0, 128), *range(0x400, 0x460), 0x1F600, 0x301, 0x663]]
    with caplog.at_level(logging.ERROR):
        for k in range(600):
            if k % 2:
                text = " ".join(rnd.choice(words) for _ in range(rnd.randint(0, 12)))
            else:
                text = "".join(rnd.choice(chars) for _ in range(rnd.randint(0, 40)))
            check_offsets(canon.canonicalize(text))
    assert not caplog.records


def test_thread_safe(tmp_path: Path) -> None:
    fresh = Canonicalizer(load_catalog(make_catalog(tmp_path, ENTITIES)))  # cold caches
    texts = [
        "выключи свет на кухне",
        "поставь будильник на 7:30",
        "погода в Берлине",
        "включи кондиционр",
        "through twenty five minutes",
        "включи настольную лампу",
        "в половине восьмого вечера",
    ] * 20
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(fresh.canonicalize, texts))
    assert parallel == [fresh.canonicalize(t) for t in texts]


@pytest.mark.parametrize(
    ("text", "locale", "expected"),
    [
        ("включи свет", None, "ru"),
        ("turn on the light", None, "en"),
        ("включи light", None, "ru"),
        ("turn on the свет please now", None, "en"),
        ("hello", "ru", "ru"),
        ("hello", "ru-RU", "ru"),
        ("привет", "en_US", "en"),
        ("привет", "xx", "ru"),
        ("", None, "en"),
    ],
)
def test_locale(canon: Canonicalizer, text: str, locale: str | None, expected: str) -> None:
    assert canon.canonicalize(text, locale=locale).locale == expected


def test_detect_locale() -> None:
    assert detect_locale("включи свет") == "ru"
    assert detect_locale("turn it on") == "en"


def test_rules_are_plain_json_and_round_trip(canon: Canonicalizer) -> None:
    rules = canon.rules()
    data = json.loads(json.dumps(rules, ensure_ascii=False))
    assert {"numbers", "time", "dates", "durations", "cities", "matching"} <= set(data)
    assert msgspec.convert(data, MaskingRules) == msgspec.convert(rules, MaskingRules)


def test_unknown_masking_key_is_an_error(tmp_path: Path) -> None:
    root = make_catalog(tmp_path)
    (root / "masking.yaml").write_text("schema_version: 1\ntime: {bogus: 1}\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="masking.yaml"):
        Canonicalizer(load_catalog(root))


def test_per_word_caches_stay_bounded_whatever_the_traffic(repo_canon: Canonicalizer) -> None:
    """A home hears new names and typos for months: the word caches of the canonicalizer (lemmas, known
    words, fuzzy alias matches) and of the featurizer hold a bounded number of words, so a soak where
    every request brings a new word levels off (`tools.load --soak --novel-words`: +58 MB and rising
    with the old bounds, +9.5 MB and flat with these)."""
    from skill.features import _CACHE_LIMIT, Featurizer  # noqa: PLC0415
    from skill.registry import resolve_model_dir  # noqa: PLC0415
    from tools.load import with_novel_word  # noqa: PLC0415

    model = resolve_model_dir([REPO / "models"], None)
    assert model is not None
    feat = Featurizer.load(model / "vocab.json")
    for n in range(20_000):
        text = with_novel_word("включи свет в гостиной" if n % 2 else "turn on the light in the den", n)
        feat.encode_one(model_text_of(repo_canon, text))
    lem = repo_canon.lemmatizer
    assert lem.lemmas.cache_info().currsize <= 16384  # type: ignore[attr-defined]
    assert lem.is_known.cache_info().currsize <= 8192  # type: ignore[attr-defined]
    assert len(feat._cache) <= _CACHE_LIMIT <= 8192


def model_text_of(canon: Canonicalizer, text: str) -> str:
    from skill.features import model_text  # noqa: PLC0415

    return model_text(canon.canonicalize(text, "ru" if "свет" in text else "en"))
