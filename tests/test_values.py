"""Value placeholders: times, dates, durations, numbers and cities in digits and words (ru + en)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from skill.canonicalize import Canonical, Canonicalizer
from skill.catalog import load_catalog
from skill.values import digits_value, tokenize

REPO = Path(__file__).resolve().parents[1]

INTENTS = """\
schema_version: 1
owner: {type: builtin, id: test}
intents:
  - intent: test.noop
    description: {en: noop}
    examples: {en: [noop]}
"""


def make_catalog(root: Path, entities: str | None = None, masking: bool = True) -> Path:
    """A catalog in ``root``: a tiny intents file, the repo's masking.yaml, optional entities."""
    (root / "intents").mkdir(parents=True)
    (root / "entities").mkdir()
    (root / "intents" / "test.yaml").write_text(INTENTS, encoding="utf-8")
    if entities is not None:
        (root / "entities" / "test.yaml").write_text(entities, encoding="utf-8")
    if masking:
        shutil.copy(REPO / "catalog" / "masking.yaml", root / "masking.yaml")
    return root


@pytest.fixture(scope="module")
def canon(tmp_path_factory: pytest.TempPathFactory) -> Canonicalizer:
    return Canonicalizer(load_catalog(make_catalog(tmp_path_factory.mktemp("values"))))


def only(result: Canonical, placeholder: str) -> tuple[str, str]:
    """(surface text, value) of the single entity with ``placeholder``."""
    found = [e for e in result.entities if e.placeholder == placeholder]
    assert len(found) == 1, (result.masked, result.entities)
    return found[0].text, found[0].value


@pytest.mark.parametrize(
    ("text", "masked", "value"),
    [
        ("Поставь будильник на 7:30", "поставь будильник на {time}", "07:30"),
        ("в 7.30", "в {time}", "07:30"),
        ("в семь тридцать", "в {time}", "07:30"),
        ("в 7 утра", "в {time}", "07:00"),
        ("в 6 вечера", "в {time}", "18:00"),
        ("в 11 ночи", "в {time}", "23:00"),
        ("в 2 дня", "в {time}", "14:00"),
        ("в 7 часов вечера", "в {time}", "19:00"),
        ("в половине восьмого", "в {time}", "07:30"),
        ("полвосьмого", "{time}", "07:30"),
        ("четверть восьмого", "{time}", "07:15"),
        ("десять минут восьмого", "{time}", "07:10"),
        ("без четверти восемь", "{time}", "07:45"),
        ("без пяти восемь", "{time}", "07:55"),
        ("в полдень", "в {time}", "12:00"),
        ("семь ноль пять", "{time}", "07:05"),
        ("seven thirty", "{time}", "07:30"),
        ("at 7 am", "at {time}", "07:00"),
        ("at 7am", "at {time}", "07:00"),
        ("6 pm", "{time}", "18:00"),
        ("7:30 p.m.", "{time}", "19:30"),
        ("half past six", "{time}", "06:30"),
        ("a quarter past six", "{time}", "06:15"),
        ("quarter to eight", "{time}", "07:45"),
        ("ten past six", "{time}", "06:10"),
        ("seven o'clock in the evening", "{time}", "19:00"),
        ("noon", "{time}", "12:00"),
        ("midnight", "{time}", "00:00"),
        ("24:00", "{time}", "00:00"),
    ],
)
def test_times(canon: Canonicalizer, text: str, masked: str, value: str) -> None:
    result = canon.canonicalize(text)
    assert result.masked == masked
    assert only(result, "time")[1] == value


@pytest.mark.parametrize(
    ("text", "masked", "value"),
    [
        ("10 минут", "{duration}", "PT10M"),
        ("через пять минут", "через {duration}", "PT5M"),
        ("поставь таймер на 10 минут", "поставь таймер на {duration}", "PT10M"),
        ("на двадцать пять минут", "на {duration}", "PT25M"),
        ("полчаса", "{duration}", "PT30M"),
        ("через час", "через {duration}", "PT1H"),
        ("на минуту", "на {duration}", "PT1M"),
        ("полтора часа", "{duration}", "PT1H30M"),
        ("полторы минуты", "{duration}", "PT1M30S"),
        ("два с половиной часа", "{duration}", "PT2H30M"),
        ("1,5 часа", "{duration}", "PT1H30M"),
        ("через 2 часа и 15 минут", "через {duration}", "PT2H15M"),
        ("через 2 дня", "через {duration}", "P2D"),
        ("на 2 часа", "на {duration}", "PT2H"),
        ("for an hour", "for {duration}", "PT1H"),
        ("in an hour and a half", "in {duration}", "PT1H30M"),
        ("half an hour", "{duration}", "PT30M"),
        ("for ten minutes", "for {duration}", "PT10M"),
        ("2 hours 15 minutes", "{duration}", "PT2H15M"),
        ("2 hours and 15 minutes", "{duration}", "PT2H15M"),
        ("90 seconds", "{duration}", "PT90S"),
        ("3 weeks", "{duration}", "P3W"),
        # Abbreviations, diminutives and "a couple", as people type and say them.
        ("таймер на 5 мин", "таймер на {duration}", "PT5M"),
        ("на 10 сек", "на {duration}", "PT10S"),
        ("на 3 ч", "на {duration}", "PT3H"),
        ("на минутку", "на {duration}", "PT1M"),
        ("на часик", "на {duration}", "PT1H"),
        ("15 минуточек", "{duration}", "PT15M"),
        ("через пару минут", "через {duration}", "PT2M"),
        ("for 2 hrs", "for {duration}", "PT2H"),
        ("in a couple of minutes", "in {duration}", "PT2M"),
        # A misspelt unit after "на / через / for / in" and a number: one edit, transpositions once.
        ("таймер на 5 минтут", "таймер на {duration}", "PT5M"),
        ("на 10 сеукнд", "на {duration}", "PT10S"),
        ("set a timer for 5 minuts", "set a timer for {duration}", "PT5M"),
        ("in 10 mimutes", "in {duration}", "PT10M"),
    ],
)
def test_durations(canon: Canonicalizer, text: str, masked: str, value: str) -> None:
    result = canon.canonicalize(text)
    assert result.masked == masked
    assert only(result, "duration")[1] == value


@pytest.mark.parametrize(
    ("text", "masked", "value"),
    [
        ("сегодня", "{date}", "+0d"),
        ("завтра", "{date}", "+1d"),
        ("послезавтра", "{date}", "+2d"),
        ("tomorrow", "{date}", "+1d"),
        ("the day after tomorrow", "the {date}", "+2d"),
        ("в понедельник", "в {date}", "mon"),
        ("во вторник", "во {date}", "tue"),
        ("в субботу", "в {date}", "sat"),
        ("on monday", "on {date}", "mon"),
        ("5 мая", "{date}", "05-05"),
        ("5-го мая", "{date}", "05-05"),
        ("двадцать пятого декабря", "{date}", "12-25"),
        ("may 5th", "{date}", "05-05"),
        ("the 5th of may", "the {date}", "05-05"),
        ("march twenty first", "{date}", "03-21"),
        ("завтра утром", "{date}", "+1d"),
        ("tomorrow morning", "{date}", "+1d"),
    ],
)
def test_dates(canon: Canonicalizer, text: str, masked: str, value: str) -> None:
    result = canon.canonicalize(text)
    assert result.masked == masked
    assert only(result, "date")[1] == value


@pytest.mark.parametrize(
    ("text", "masked", "values"),
    [
        ("громкость на 50", "громкость на {number}", ["50"]),
        ("громкость на пятьдесят", "громкость на {number}", ["50"]),
        ("громкость на пятьдесят процентов", "громкость на {number} процентов", ["50"]),
        ("двадцать пять", "{number}", ["25"]),
        ("сто", "{number}", ["100"]),
        ("сто двадцать три", "{number}", ["123"]),
        ("две тысячи двадцать шесть", "{number}", ["2026"]),
        ("fifty", "{number}", ["50"]),
        ("twenty five", "{number}", ["25"]),
        ("a hundred", "{number}", ["100"]),
        ("one hundred and five", "{number}", ["105"]),
        ("set volume to 7.5", "set volume to {number}", ["7.5"]),
        ("яркость 2,5", "яркость {number}", ["2.5"]),
        ("007", "{number}", ["7"]),
        ("1,000", "{number}", ["1000"]),
        ("будильник номер 30", "будильник номер {number}", ["30"]),
        ("turn on the one in the hall", "turn on the one in the hall", []),
        ("twenty to eight", "{number} to {number}", ["20", "8"]),
    ],
)
def test_numbers(canon: Canonicalizer, text: str, masked: str, values: list[str]) -> None:
    result = canon.canonicalize(text)
    assert result.masked == masked
    assert [e.value for e in result.entities if e.placeholder == "number"] == values


@pytest.mark.parametrize(
    ("text", "masked", "placeholder", "value"),
    [
        # A bare number is a time only with a clock cue; otherwise it is a {number}.
        ("будильник на 7", "будильник на {time}", "time", "07:00"),
        ("разбуди меня в семь", "разбуди меня в {time}", "time", "07:00"),
        ("set an alarm for 6", "set an alarm for {time}", "time", "06:00"),
        ("громкость на 7", "громкость на {number}", "number", "7"),
        ("в 7", "в {number}", "number", "7"),
        # "N часов" is a clock time after a time preposition or with a clock word, else a duration.
        ("в 7 часов", "в {time}", "time", "07:00"),
        ("будильник на 7 часов", "будильник на {time}", "time", "07:00"),
        ("таймер на 7 часов", "таймер на {duration}", "duration", "PT7H"),
        # "дня" is a day part only after a time preposition.
        ("через 2 дня", "через {duration}", "duration", "P2D"),
        # "7.30" needs a cue to be a time.
        ("яркость 7.30", "яркость {number}", "number", "7.3"),
        ("7.30 утра", "{time}", "time", "07:30"),
        # Reminders are clock words too, but only right after a clock preposition.
        ("напомни позвонить маме в три", "напомни позвонить маме в {time}", "time", "03:00"),
        ("напомни через 2 часа", "напомни через {duration}", "duration", "PT2H"),
        ("напомни через 2 дня", "напомни через {duration}", "duration", "P2D"),
        ("напомни купить 3 яблока", "напомни купить {number} яблока", "number", "3"),
        ("remind me at three", "remind me at {time}", "time", "03:00"),
        ("remind me in 2 hours", "remind me in {duration}", "duration", "PT2H"),
        ("поставь будильник на 12 дня", "поставь будильник на {time}", "time", "12:00"),
        ("alarm for ten to six", "alarm for {time}", "time", "05:50"),
    ],
)
def test_ambiguous_numbers(
    canon: Canonicalizer, text: str, masked: str, placeholder: str, value: str
) -> None:
    result = canon.canonicalize(text)
    assert result.masked == masked
    assert only(result, placeholder)[1] == value


def test_clock_guess_has_lower_confidence(canon: Canonicalizer) -> None:
    assert canon.canonicalize("будильник на 7").entities[0].confidence < 1.0
    assert canon.canonicalize("будильник на 7:30").entities[0].confidence == 1.0


@pytest.mark.parametrize(
    ("text", "masked", "value"),
    [
        ("погода в Москве", "погода в {city}", "Moscow"),
        ("погода в Санкт-Петербурге", "погода в {city}", "Saint Petersburg"),
        ("в питере", "в {city}", "Saint Petersburg"),
        ("в Берлине", "в {city}", "Berlin"),
        ("в нижнем новгороде", "в {city}", "Nizhny Novgorod"),
        ("в ростове-на-дону", "в {city}", "Rostov-on-Don"),
        ("в нью-йорке", "в {city}", "New York"),
        ("weather in Berlin", "weather in {city}", "Berlin"),
        ("weather in new york", "weather in {city}", "New York"),
        ("weather in Londn", "weather in {city}", "London"),
    ],
)
def test_cities(canon: Canonicalizer, text: str, masked: str, value: str) -> None:
    result = canon.canonicalize(text)
    assert result.masked == masked
    assert only(result, "city")[1] == value
    assert result.entities[0].source == "value"


def test_several_values_in_one_utterance(canon: Canonicalizer) -> None:
    result = canon.canonicalize("Завтра в 8 утра погода в Москве и таймер на 5 минут")
    assert result.masked == "{date} в {time} погода в {city} и таймер на {duration}"
    assert [e.value for e in result.entities] == ["+1d", "08:00", "Moscow", "PT5M"]


def test_value_entity_shape(canon: Canonicalizer) -> None:
    result = canon.canonicalize("Поставь будильник на 7:30")
    (match,) = result.entities
    assert (match.placeholder, match.kind, match.text, match.value) == ("time", "time", "7:30", "07:30")
    assert (match.source, match.match_type, match.ref) == ("value", "parsed", None)
    assert result.normalized[match.start : match.end] == "7:30"


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Ёлка, ЁЖ!", ["елка", "еж"]),
        ("в 7:30.", ["в", "7:30"]),
        ("7.30 и 2,5", ["7.30", "и", "2,5"]),
        ("a.m. p.m.", ["a", "m", "p", "m"]),
        ("o'clock don't", ["oclock", "dont"]),
        ("санкт-петербург", ["санкт", "петербург"]),
        ("7am 5th mp3", ["7", "am", "5", "th", "mp3"]),
        ("  много   пробелов\t\n", ["много", "пробелов"]),
        ("эмодзи 😀 тут", ["эмодзи", "тут"]),
        ("x:y 1:  :2", ["x", "y", "1", "2"]),
        ("", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


@pytest.mark.parametrize(
    ("token", "value"),
    [
        ("50", "50"),
        ("007", "7"),
        ("2,5", "2.5"),
        ("7.50", "7.5"),
        ("1,000", "1000"),
        ("0", "0"),
        ("7:30", None),
        ("abc", None),
    ],
)
def test_digits_value(token: str, value: str | None) -> None:
    assert digits_value(token) == value


def test_without_masking_yaml_digits_still_work(tmp_path: Path) -> None:
    canon = Canonicalizer(load_catalog(make_catalog(tmp_path, masking=False)))
    result = canon.canonicalize("будильник на 7:30 громкость 50 пять минут")
    assert result.masked == "будильник на {time} громкость {number} пять минут"


@pytest.mark.parametrize(
    "text",
    [
        "на 5 минуса",  # a real word, not a misspelt unit
        "add 5 mints to the list",  # no duration preposition, and two edits away
        "5 minuts",  # a misspelt unit needs "for / in / на / через" before the number
    ],
)
def test_misspelt_units_need_context(canon: Canonicalizer, text: str) -> None:
    assert "{duration}" not in canon.canonicalize(text).masked


@pytest.mark.parametrize(
    "text",
    [
        "Включи свет на кухне, 7:30.",  # the 1:1 path
        "Ёлка: поставь 1/2 часа, 30°",
        "turn on Kate's lamp",  # an apostrophe is dropped: offsets still point into the raw text
        "İstanbul radio please",  # "İ" lower-cases to two characters
    ],
)
def test_token_offsets_point_into_the_raw_text(text: str) -> None:
    from skill.values import token_offsets, tokenize  # noqa: PLC0415

    offs = token_offsets(text)
    assert [t for t, _, _ in offs] == tokenize(text)
    for token, start, end in offs:
        raw = text[start:end].lower().replace("ё", "е").replace("'", "")
        assert raw.startswith(token[0]) or raw[0] == "i"  # "İ".lower() is "i̇"
        assert 0 <= start < end <= len(text)
    last = offs[-1]
    assert text[last[1] : last[2]].lower().replace("ё", "е") == last[0]
