"""Value spans: {time} {date} {duration} {number} in digits and words (ru + en), tables from masking.yaml."""

# Ambiguous numbers, kept simple on purpose. A *clock cue* is a clock word earlier in the utterance
# ("будильник", "напомни", "alarm", ...) with the number right after a clock preposition (в, на, к, at,
# for, ...); a *time preposition* is в / к / at / by right before the number.
#
# * "7:30" is always a time; "7.30", "7 30", "N часов" and "ten to six" are times after a time
#   preposition or with a clock cue ("в 7 часов", "будильник на 7 часов"); otherwise "N часов" is a
#   duration ("таймер на 2 часа", "напомни через 2 часа").
# * A bare number is a time with a day part after it ("7 утра", "6 pm"; "дня" also needs a cue, since
#   "через 2 дня" is a duration) or with a clock cue ("будильник на 7", lower confidence); otherwise it
#   is a ``{number}`` ("громкость на 7", "в 7").
# * Normalization splits a number glued to a word ("7am" → "7 am", "5th" → "5 th"); "mp3" stays.

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import msgspec
from rapidfuzz.distance import OSA

_LOGGER = logging.getLogger(__name__)

Lemmas = tuple[str, ...]  # surface form, most likely lemma, then other lemmas
_V = TypeVar("_V")
DurationUnit = Literal["S", "M", "H", "D", "W"]  # ISO 8601 duration designators


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


def _d() -> Any:
    return msgspec.field(default_factory=dict)


def _l() -> Any:
    return msgspec.field(default_factory=list)


class Matching(_Strict, frozen=True):
    """Registry matching knobs (masking.yaml ``matching``)."""

    lemma_min_score: float = 0.05
    lemma_confidence: float = 0.95
    fuzzy_min_len: int = 5
    fuzzy_cutoff: float = 86.0
    fuzzy_max_confidence: float = 0.9
    ambiguity_penalty: float = 0.5
    clock_guess_confidence: float = 0.8
    weak_aliases: list[str] = _l()
    cued_aliases: list[str] = _l()
    cue_words: list[str] = _l()


class NumberWords(_Strict, frozen=True):
    """Number words by class; Russian keys are lemmas."""

    units: dict[str, int] = _d()
    teens: dict[str, int] = _d()
    tens: dict[str, int] = _d()
    hundreds: dict[str, int] = _d()
    multipliers: dict[str, int] = _d()
    fractions: dict[str, float] = _d()
    articles: list[str] = _l()
    connectors: list[str] = _l()
    zero_prefix: list[str] = _l()
    not_alone: list[str] = _l()
    # "на максимум", "max", "lowest": a {number} whose value is "max" / "min" (the slot maps it).
    extremes: dict[Literal["max", "min"], list[str]] = _d()
    level_words: dict[str, float] = _d()


class TimeWords(_Strict, frozen=True):
    """Clock-time vocabulary."""

    fixed: dict[str, str] = _d()
    dayparts: dict[str, Literal["am", "pm", "day", "night"]] = _d()
    weak_dayparts: list[str] = _l()
    oclock: list[str] = _l()
    hour_words: list[str] = _l()
    minute_words: list[str] = _l()
    prepositions: list[str] = _l()
    clock_context: list[str] = _l()
    clock_prepositions: list[str] = _l()
    half: list[str] = _l()
    quarter: list[str] = _l()
    before_hour: list[str] = _l()
    half_prefix: list[str] = _l()
    past: list[str] = _l()
    to: list[str] = _l()


class DateWords(_Strict, frozen=True):
    """Date vocabulary."""

    relative: dict[str, str] = _d()
    weekdays: dict[str, str] = _d()
    months: dict[str, int] = _d()
    ordinals: dict[str, int] = _d()
    ordinal_suffixes: list[str] = _l()
    of: list[str] = _l()


class DurationWords(_Strict, frozen=True):
    """Duration vocabulary; units map to ISO 8601 designators."""

    units: dict[str, DurationUnit] = _d()
    fixed: dict[str, str] = _d()
    bare_after: list[str] = _l()
    connectors: list[str] = _l()
    and_a_half: list[str] = _l()


class TemperatureWords(_Strict, frozen=True):
    """{temperature}: a number with a degree word after it, or after a temperature word and a preposition."""

    degree_words: list[str] = _l()
    context: list[str] = _l()
    prepositions: list[str] = _l()
    fahrenheit: list[str] = _l()
    celsius: list[str] = _l()


class LexiconWords(_Strict, frozen=True):
    """A closed class of words with canonical names ({color}, {genre}): ``names`` maps each canonical
    English name to its words (Russian single words as lemmas, so any inflection matches; phrases as
    said). The words are everyday words too, so they count only when a ``cues`` word is in the
    utterance (a light word for a colour, a music or play word for a genre)."""

    names: dict[str, list[str]] = _d()
    cues: list[str] = _l()


class City(_Strict, frozen=True):
    """A gazetteer city: canonical English name and aliases per locale."""

    name: str
    aliases: dict[str, list[str]]


class MaskingRules(_Strict, frozen=True):
    """Schema of ``catalog/masking.yaml`` (every section optional)."""

    schema_version: int = 1
    matching: Matching = msgspec.field(default_factory=Matching)
    numbers: NumberWords = msgspec.field(default_factory=NumberWords)
    time: TimeWords = msgspec.field(default_factory=TimeWords)
    dates: DateWords = msgspec.field(default_factory=DateWords)
    durations: DurationWords = msgspec.field(default_factory=DurationWords)
    kind_nouns: dict[str, list[str]] = _d()
    # Registry kind → nouns that name only that kind ("lamp" is a light): the tagger's span resolver
    # narrows a room's devices with them.
    kind_words: dict[str, list[str]] = _d()
    cities: list[City] = _l()
    temperature: TemperatureWords = msgspec.field(default_factory=TemperatureWords)
    colors: LexiconWords = msgspec.field(default_factory=LexiconWords)
    genres: LexiconWords = msgspec.field(default_factory=LexiconWords)


_APOSTROPHES = re.compile(r"['’ʼ`´]")
_LOOSE_SEP = re.compile(r"(?<![0-9])[:.,]|[:.,](?![0-9])")
_TOKEN = re.compile(r"[0-9]+(?:[:.,/][0-9]+)*|[^\W_]+|°")  # "7am" → "7 am", "mp3" stays, "1/2", "30°"
_FUZZY_UNIT_MIN, _FUZZY_UNIT_SIM = 5, 0.8
_FRACTION = re.compile(r"([0-9]{1,3})/([0-9]{1,3})")
_NUM = re.compile(r"[0-9]+(?:[.,][0-9]+)?")
_THOUSANDS = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+")
_HHMM = re.compile(r"([0-9]{1,2}):([0-9]{2})")
_HDOTMM = re.compile(r"([0-9]{1,2})\.([0-9]{2})")
_MM = re.compile(r"[0-9]{2}")
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([SMHDW])")
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_RANK = {"unit": 1, "teen": 1, "ten": 2, "hundreds": 3}


def tokenize(text: str) -> list[str]:
    """Normalized tokens: lower case, ё→е, punctuation dropped except ``:.,`` between digits."""
    s = unicodedata.normalize("NFC", text).lower().replace("ё", "е")
    return _TOKEN.findall(_LOOSE_SEP.sub(" ", _APOSTROPHES.sub("", s)))


def token_offsets(text: str) -> list[tuple[str, int, int]]:
    """:func:`tokenize`'s tokens with their [start, end) offsets into ``text`` (NFC-normalized)."""
    src = unicodedata.normalize("NFC", text)
    low = src.lower()
    if len(low) == len(src) and not _APOSTROPHES.search(src):
        # Every character lower-cases to one (ё→е too) and none is dropped: offsets map 1:1.
        s = _LOOSE_SEP.sub(" ", low.replace("ё", "е"))
        return [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(s)]
    chars: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(src):
        if _APOSTROPHES.match(ch):
            continue
        for c in ch.lower().replace("ё", "е"):
            chars.append(c)
            where.append(i)
    s = _LOOSE_SEP.sub(" ", "".join(chars))
    return [(m.group(), where[m.start()], where[m.end() - 1] + 1) for m in _TOKEN.finditer(s)]


def digits_value(token: str) -> str | None:
    """Canonical decimal string of a digit token ("007" → "7", "2,5" → "2.5", "1,000" → "1000")."""
    if _THOUSANDS.fullmatch(token):
        token = token.replace(",", "")
    if not _NUM.fullmatch(token):
        return None
    whole, _, frac = token.replace(",", ".").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:.3f}".rstrip("0").rstrip(".")


def _key(text: str) -> tuple[str, ...]:
    return tuple(tokenize(text))


def _words(items: Iterable[str]) -> frozenset[str]:
    return frozenset(" ".join(_key(w)) for w in items)


def _phrases(table: Mapping[str, _V]) -> dict[str, list[tuple[tuple[str, ...], _V]]]:
    out: dict[str, list[tuple[tuple[str, ...], _V]]] = {}
    for text, value in table.items():
        if key := _key(text):
            out.setdefault(key[0], []).append((key, value))
    for group in out.values():
        group.sort(key=lambda kv: -len(kv[0]))
    return out


def _table(table: Mapping[str, _V]) -> dict[str, _V]:
    return {" ".join(_key(k)): v for k, v in table.items()}


def phrase_at(
    table: Mapping[str, list[tuple[tuple[str, ...], _V]]], words: Sequence[str], i: int
) -> tuple[_V, int] | None:
    """The longest phrase of ``table`` starting at token ``i``: (value, end)."""
    for key, value in table.get(words[i], ()):
        end = i + len(key)
        if tuple(words[i:end]) == key:
            return value, end
    return None


def _lexicon_at(
    table: Mapping[str, list[tuple[tuple[str, ...], str]]], c: _Ctx, i: int, placeholder: str
) -> ValueSpan | None:
    """A lexicon word or phrase at token ``i`` ("red", «тёплый белый», «джаза»): the longest phrase as
    said, else a one-word entry by the token's lemma. The caller checked the lexicon's cue."""
    hit = phrase_at(table, c.words, i)
    if hit is None:
        lemma = c.lems[i][1] if len(c.lems[i]) > 1 else c.lems[i][0]
        name = next((v for key, v in table.get(lemma, ()) if len(key) == 1), None)
        if name is not None:
            hit = (name, i + 1)
    return None if hit is None else ValueSpan(i, hit[1], placeholder, hit[0])


def _lex(table: Mapping[str, _V], lem: Lemmas) -> _V | None:
    """Look a token up by surface form, then by its most likely lemma."""
    hit = table.get(lem[0])
    if hit is None and len(lem) > 1:
        hit = table.get(lem[1])
    return hit


def _has(words: frozenset[str], lem: Lemmas) -> bool:
    return lem[0] in words or (len(lem) > 1 and lem[1] in words)


class ValueSpan(NamedTuple):
    """A parsed value over tokens ``start:end``."""

    start: int
    end: int
    placeholder: str
    value: str
    confidence: float = 1.0
    kind: str = ""  # "temperature.fahrenheit": a finer kind than the placeholder, when said


class _Num(NamedTuple):
    value: float
    end: int
    text: str
    spelled: bool  # words, not digits


class _Ctx(NamedTuple):
    words: Sequence[str]
    lems: Sequence[Lemmas]
    clock_at: int  # index of the first clock-context word (len(words) if none)


_Hit = tuple[int, str, float]  # end, value, confidence
_Clock = tuple[int, int, int, int]  # end, hour, minute, cue (0 none, 1 soft, 2 bare number)


class ValueParser:
    """Finds time, date, duration and number spans in tokens; built once, read-only afterwards."""

    def __init__(
        self,
        rules: MaskingRules,
        lemmatize: Callable[[str], Lemmas],
        is_known: Callable[[str], bool] | None = None,
    ) -> None:
        self._lemmatize = lemmatize
        self._is_known = is_known or (lambda _w: False)
        self._guess_conf = rules.matching.clock_guess_confidence
        n, t, d, u = rules.numbers, rules.time, rules.dates, rules.durations
        self._numwords: dict[str, tuple[str, int]] = {}
        for cls, table in (
            ("unit", n.units),
            ("teen", n.teens),
            ("ten", n.tens),
            ("hundreds", n.hundreds),
            ("mult", n.multipliers),
        ):
            self._numwords.update({k: (cls, v) for k, v in _table(table).items()})
        self._fractions = _table(n.fractions)
        self._articles, self._num_and = _words(n.articles), _words(n.connectors)
        self._zero, self._not_alone = _words(n.zero_prefix), _words(n.not_alone)
        self._time_fixed, self._dayparts = _phrases(t.fixed), _phrases(t.dayparts)
        self._weak_dayparts, self._oclock = _words(t.weak_dayparts), _phrases(dict.fromkeys(t.oclock, 0))
        self._hour_w, self._minute_w = _words(t.hour_words), _words(t.minute_words)
        self._time_preps, self._clock_ctx = _words(t.prepositions), _words(t.clock_context)
        self._clock_preps = _words(t.clock_prepositions)
        self._half, self._quarter, self._without = _words(t.half), _words(t.quarter), _words(t.before_hour)
        self._half_prefix = tuple(_words(t.half_prefix))
        self._past, self._to = _words(t.past), _words(t.to)
        self._relative, self._weekdays = _phrases(d.relative), _table(d.weekdays)
        self._months, self._ordinals = _table(d.months), _table(d.ordinals)
        self._ord_suffix, self._of = _words(d.ordinal_suffixes), _words(d.of)
        self._units, self._dur_fixed = _table(u.units), _phrases(u.fixed)
        # Unit words long enough to recognise misspelt (and their Russian stems: «минут», «секунд»).
        self._unit_forms: dict[str, DurationUnit] = {}
        for word, unit in self._units.items():
            if len(word) >= _FUZZY_UNIT_MIN and word.isalpha():
                self._unit_forms.setdefault(word, unit)
                if word[-1] in "аяыиеоу" and len(word) > _FUZZY_UNIT_MIN:
                    self._unit_forms.setdefault(word[:-1], unit)
        self._fuzzy_unit = functools.lru_cache(maxsize=4096)(self._fuzzy_unit_uncached)
        self._bare_after, self._dur_and = _words(u.bare_after), _words(u.connectors)
        self._and_half = _phrases(dict.fromkeys(u.and_a_half, 0.5))
        self._extremes = {w: k for k, words in n.extremes.items() for w in _words(words)}
        self._level_words = _table(n.level_words)
        tw, cw = rules.temperature, rules.colors
        self._degrees, self._temp_ctx = _words(tw.degree_words), _words(tw.context)
        self._temp_preps, self._fahrenheit, self._celsius = (
            _words(tw.prepositions),
            _words(tw.fahrenheit),
            _words(tw.celsius),
        )
        self._lexicons = tuple(
            (
                placeholder,
                _phrases({w: name for name, words in lw.names.items() for w in words}),
                _words(lw.cues),
            )
            for placeholder, lw in (("color", cw), ("genre", rules.genres))
        )
        self._triggers = frozenset().union(
            self._numwords,
            self._fractions,
            self._articles,
            self._time_fixed,
            self._half,
            self._quarter,
            self._without,
            self._relative,
            self._weekdays,
            self._months,
            self._ordinals,
            self._units,
            self._dur_fixed,
            self._half_prefix,
            *(table for _, table, _ in self._lexicons),
        )

    def find(self, words: Sequence[str], lems: Sequence[Lemmas]) -> list[ValueSpan]:
        """Time, date and duration candidates at every position; they may overlap."""
        ctx = self._ctx(words, lems)
        out: list[ValueSpan] = []
        parsers = (("time", self._time_at), ("date", self._date_at), ("duration", self._duration_at))
        temp_ctx = any(_has(self._temp_ctx, lem) for lem in lems)
        cued = [(ph, table) for ph, table, cues in self._lexicons if any(_has(cues, lem) for lem in lems)]
        for i, lem in enumerate(lems):
            word = words[i]
            if not (word[:1].isdigit() or _has(self._triggers, lem) or word.startswith(self._half_prefix)):
                continue
            for placeholder, parse in parsers:
                if hit := parse(ctx, i):
                    out.append(ValueSpan(i, hit[0], placeholder, hit[1], hit[2]))
            if temp := self._temperature_at(ctx, i, temp_ctx):
                out.append(temp)
            for placeholder, table in cued:
                if word_hit := _lexicon_at(table, ctx, i, placeholder):
                    out.append(word_hit)
        return out

    def _temperature_at(self, c: _Ctx, i: int, context: bool) -> ValueSpan | None:
        """ "21 degrees", «двадцать один градус», "30°", "thermostat to 21" (number words only)."""
        words, n = c.words, len(c.words)
        num = self._number_at(c, i, n)
        if num is None or num.value > 1000:
            return None
        j = num.end
        degree = j < n and (_has(self._degrees, c.lems[j]) or words[j] == "°")
        prev = c.lems[i - 1] if i > 0 else ("",)
        # "thermostat to 21", "термостат 22", «градусов двадцать»: a temperature word or its preposition
        after_cue = i > 0 and (words[i - 1] in self._temp_preps or _has(self._temp_ctx, prev))
        if not degree and not (context and after_cue):
            return None
        kind = "temperature"
        for k in range(j, min(n, j + 3)):
            if _has(self._fahrenheit, c.lems[k]):
                kind = "temperature.fahrenheit"
            elif _has(self._celsius, c.lems[k]):
                kind = "temperature.celsius"
        return ValueSpan(i, j, "temperature", num.text, 1.0 if degree else 0.9, kind)

    def extreme(self, lem: Lemmas) -> str | None:
        """ "max" / "min" for an extreme word ("максимум", "lowest"), else None."""
        return self._extremes.get(lem[0]) or (self._extremes.get(lem[1]) if len(lem) > 1 else None)

    def numbers(self, words: Sequence[str], lems: Sequence[Lemmas], free: Sequence[bool]) -> list[ValueSpan]:
        """Bare ``{number}`` spans over the free tokens, left to right."""
        ctx, out, i, n = self._ctx(words, lems), [], 0, len(words)
        while i < n:
            stop = i
            while stop < n and free[stop]:
                stop += 1
            num = self._number_at(ctx, i, stop) if stop > i else None
            if num is None and stop > i and (ext := self.extreme(lems[i])):
                out.append(ValueSpan(i, i + 1, "number", ext, 0.95))
                i += 1
                continue
            if num is None and stop > i and (share := _lex(self._level_words, lems[i])) is not None:
                out.append(ValueSpan(i, i + 1, "number", _fmt(share), 0.9))  # "наполовину" → 50
                i += 1
                continue
            if num is None or (num.end == i + 1 and words[i] in self._not_alone):
                i += 1
                continue
            out.append(ValueSpan(i, num.end, "number", num.text))
            i = num.end
        return out

    def _ctx(self, words: Sequence[str], lems: Sequence[Lemmas]) -> _Ctx:
        clock_at = next((k for k, lem in enumerate(lems) if _has(self._clock_ctx, lem)), len(words))
        return _Ctx(words, lems, clock_at)

    # -- numbers

    def _number_at(self, c: _Ctx, i: int, stop: int) -> _Num | None:
        word = c.words[i]
        if word[:1].isdigit() and (fr := _FRACTION.fullmatch(word)):
            a, b = int(fr[1]), int(fr[2])  # "1/2 an hour", "3/4"
            return _Num(a / b, i + 1, _fmt(a / b), False) if 0 < b and a < b else None
        if word[:1].isdigit():
            text = digits_value(word)
            if not text:
                return None
            value = float(text) if len(text) <= 15 else 1e15  # huge numbers fall out of every range
            return _Num(value, i + 1, text, False)
        frac = _lex(self._fractions, c.lems[i])
        if frac is not None:
            return _Num(frac, i + 1, _fmt(frac), True)
        return self._spelled(c, i, stop)

    def _spelled(self, c: _Ctx, i: int, stop: int) -> _Num | None:
        total = group = 0
        last_rank, last_cls, top_mult, j, used = 9, "", 10**9, i, False
        while j < stop:
            hit = _lex(self._numwords, c.lems[j])
            if hit is None:
                nxt = _lex(self._numwords, c.lems[j + 1]) if j + 1 < stop else None
                word = c.words[j]
                if not used and word in self._articles and nxt is not None and nxt[0] == "mult":
                    group, last_rank, last_cls = 1, 1, "unit"
                elif used and word in self._num_and and nxt and nxt[0] != "mult" and last_rank >= 3:
                    pass  # "one hundred and five"
                else:
                    break
                j += 1
                continue
            cls, value = hit
            if cls == "mult":
                if value >= top_mult or (value == 100 and last_rank == 3):
                    break
                if value == 100:  # English "five hundred": stays inside the group
                    group, last_rank = (group or 1) * 100, 3
                else:
                    total, group, last_rank, top_mult = total + (group or 1) * value, 0, 9, value
            else:
                rank = _RANK[cls]
                if rank >= last_rank or (cls == "teen" and last_cls == "ten"):
                    break
                group, last_rank = group + value, rank
            last_cls, used, j = cls, True, j + 1
        if not used:
            return None
        value = total + group
        return _Num(float(value), j, str(value), True)

    # -- time

    def _time_at(self, c: _Ctx, i: int) -> _Hit | None:
        core = self._clock(c, i)
        if core is None:
            return None
        end, hour, minute, cue = core
        prev = c.words[i - 1] if i > 0 else ""
        strong = prev in self._time_preps  # "в 7 часов", "at 7.30"
        context = c.clock_at < i and prev in self._clock_preps  # "будильник на 7"
        if end < len(c.words) and (dp := phrase_at(self._dayparts, c.words, end)):
            if c.words[end] not in self._weak_dayparts or strong or context:
                hour, end, cue = _apply_daypart(hour, dp[0]), dp[1], 0
        if (cue == 1 and not (strong or context)) or (cue == 2 and not context):
            return None
        conf = self._guess_conf if cue == 2 else 1.0
        if hour == 24 and minute == 0:
            hour = 0
        if 0 <= hour <= 23 and 0 <= minute <= 59:
            return end, f"{hour:02d}:{minute:02d}", conf
        return None

    def _clock(self, c: _Ctx, i: int) -> _Clock | None:
        words, lems, n = c.words, c.lems, len(c.words)
        word = words[i]
        if fixed := phrase_at(self._time_fixed, words, i):
            return fixed[1], int(fixed[0][:2]), int(fixed[0][3:5]), 0
        if m := _HHMM.fullmatch(word):
            return i + 1, int(m[1]), int(m[2]), 0
        for prefix in self._half_prefix:  # "полвосьмого", "пол восьмого"
            if word.startswith(prefix):
                rest = word[len(prefix) :]
                if rest and (hour := self._ordinal_hour(self._lemmatize(rest))):
                    return i + 1, hour - 1, 30, 0
                if not rest and i + 1 < n and (hour := self._ordinal_hour(lems[i + 1])):
                    return i + 2, hour - 1, 30, 0
        if word in self._articles and i + 1 < n and _has(self._quarter, lems[i + 1]):
            return self._clock(c, i + 1)  # "a quarter past six"
        if _has(self._half, lems[i]) or _has(self._quarter, lems[i]):
            mins = 30 if _has(self._half, lems[i]) else 15
            if i + 1 < n and (hour := self._ordinal_hour(lems[i + 1])):  # "половина восьмого"
                return i + 2, hour - 1, mins, 0
            if i + 1 < n and words[i + 1] in self._past and (hh := self._hour_at(c, i + 2)):
                return hh[1], hh[0], mins, 0
            if mins == 15 and i + 1 < n and words[i + 1] in self._to and (hh := self._hour_at(c, i + 2)):
                return hh[1], (hh[0] - 1) % 24, 45, 0
            return None
        if word in self._without and i + 1 < n:  # "без четверти восемь", "без пяти восемь"
            return self._without_at(c, i + 1)
        num = self._number_at(c, i, n)
        if num is None:
            return None
        if num.value != int(num.value):
            m = _HDOTMM.fullmatch(word)
            return (i + 1, int(m[1]), int(m[2]), 1) if m else None
        value, j = int(num.value), num.end
        minute_word = j < n and _has(self._minute_w, lems[j])
        if minute_word and j + 1 < n and 0 < value < 60 and (hour := self._ordinal_hour(lems[j + 1])):
            return j + 2, hour - 1, value, 0  # "десять минут восьмого"
        k = j + 1 if minute_word else j
        if k < n and 0 < value < 60 and words[k] in self._past and (hh := self._hour_at(c, k + 1)):
            return hh[1], hh[0], value, 0
        if k < n and 0 < value < 60 and words[k] in self._to and (hh := self._hour_at(c, k + 1)):
            return hh[1], (hh[0] - 1) % 24, 60 - value, 0 if minute_word else 1  # "ten to six" needs a cue
        if value > 24:
            return None
        if num.spelled and (mm := self._minutes_at(c, j)):
            return mm[1], value, mm[0], 0  # "семь тридцать", "seven oh five"
        if not num.spelled and j < n and _MM.fullmatch(words[j]):
            return j + 1, value, int(words[j]), 1
        if j < n and (oc := phrase_at(self._oclock, words, j)):
            return oc[1], value, 0, 0
        if j < n and _has(self._hour_w, lems[j]):
            end, minute = j + 1, 0
            mn = self._number_at(c, end, n) if end < n else None
            if mn and mn.end < n and _has(self._minute_w, lems[mn.end]) and 0 <= mn.value < 60:
                end, minute = mn.end + 1, int(mn.value)
            return end, value, minute, 1
        return j, value, 0, 2

    def _without_at(self, c: _Ctx, j: int) -> _Clock | None:
        n = len(c.words)
        if _has(self._quarter, c.lems[j]):
            mins, j = 15, j + 1
        else:
            num = self._number_at(c, j, n)
            if num is None or not 0 < num.value < 60 or num.value != int(num.value):
                return None
            mins, j = int(num.value), num.end
            if j < n and _has(self._minute_w, c.lems[j]):
                j += 1
        if j < n and _has(self._hour_w, c.lems[j]):
            return j + 1, 0, 60 - mins, 0  # "без пяти час"
        hh = self._hour_at(c, j)
        return (hh[1], (hh[0] - 1) % 24, 60 - mins, 0) if hh else None

    def _hour_at(self, c: _Ctx, j: int) -> tuple[int, int] | None:
        if j >= len(c.words):
            return None
        num = self._number_at(c, j, len(c.words))
        if num is None or num.value != int(num.value) or not 0 <= num.value <= 24:
            return None
        return int(num.value), num.end

    def _minutes_at(self, c: _Ctx, j: int) -> tuple[int, int] | None:
        n = len(c.words)
        if j + 1 < n and c.words[j] in self._zero:
            unit = _lex(self._numwords, c.lems[j + 1])
            return (unit[1], j + 2) if unit and unit[0] == "unit" else None
        num = self._spelled(c, j, n) if j < n else None
        if num and 10 <= num.value < 60:
            return int(num.value), num.end
        return None

    def _ordinal_hour(self, lem: Lemmas) -> int | None:
        value = _lex(self._ordinals, lem)
        return value if value is not None and 1 <= value <= 12 else None

    # -- dates

    def _date_at(self, c: _Ctx, i: int) -> _Hit | None:
        words, lems, n = c.words, c.lems, len(c.words)
        if rel := phrase_at(self._relative, words, i):
            return rel[1], rel[0], 1.0
        if (weekday := _lex(self._weekdays, lems[i])) is not None:
            return i + 1, weekday, 1.0
        if day := self._day_at(c, i):
            j = day[1] + 1 if day[1] + 1 < n and words[day[1]] in self._of else day[1]
            month = _lex(self._months, lems[j]) if j < n else None
            return _month_day(month, day[0], j + 1)
        month = _lex(self._months, lems[i])
        if month is not None and i + 1 < n and (day := self._day_at(c, i + 1)):
            return _month_day(month, day[0], day[1])
        return None

    def _day_at(self, c: _Ctx, i: int) -> tuple[int, int] | None:
        words, lems, n = c.words, c.lems, len(c.words)
        if (value := _lex(self._ordinals, lems[i])) is not None:
            return value, i + 1
        if i + 1 < n and (ten := _lex(self._numwords, lems[i])) and ten[0] == "ten":
            unit = _lex(self._ordinals, lems[i + 1])
            if unit is not None and unit < 10:
                return ten[1] + unit, i + 2
        num = self._number_at(c, i, n)
        if num is None or num.value != int(num.value) or not 1 <= num.value <= 31:
            return None
        suffix = not num.spelled and num.end < n and words[num.end] in self._ord_suffix  # "5th", "5-го"
        return int(num.value), num.end + 1 if suffix else num.end

    # -- durations

    def _duration_at(self, c: _Ctx, i: int) -> _Hit | None:
        words, n = c.words, len(c.words)
        bare_ok = i > 0 and words[i - 1] in self._bare_after
        parts: dict[str, float] = {}
        j, end = i, -1
        while j < n:
            part = self._duration_part(c, j, bare_ok and end < 0)
            if part is None:
                break
            parts[part[0]] = parts.get(part[0], 0.0) + part[1]
            j = end = part[2]
            if j + 1 < n and words[j] in self._dur_and and self._duration_part(c, j + 1, False):
                j += 1
        if end < 0:
            return None
        iso = _iso(parts)
        return (end, iso, 1.0) if iso else None

    def _fuzzy_unit_uncached(self, word: str) -> DurationUnit | None:
        """The duration unit a misspelt word stands for: one edit (transpositions count once) in a word
        of five letters or more; only asked after "на / через / for / in" and a number."""
        if len(word) < _FUZZY_UNIT_MIN or not word.isalpha() or (not word.isascii() and self._is_known(word)):
            return None  # a real Russian word («минуса») is not a misspelt unit
        forms = {word, word[:-1]} if word.endswith("s") and word.isascii() else {word}
        best = 0.0
        unit: DurationUnit | None = None
        for form in forms:
            for cand, u in self._unit_forms.items():
                sim = OSA.normalized_similarity(form, cand)
                if sim > best:
                    best, unit = sim, u
        return unit if best >= _FUZZY_UNIT_SIM else None

    def _duration_part(self, c: _Ctx, j: int, bare_ok: bool) -> tuple[str, float, int] | None:
        words, lems, n = c.words, c.lems, len(c.words)
        if fixed := phrase_at(self._dur_fixed, words, j):
            m = _PART.fullmatch(fixed[0])
            return (m[2], float(m[1]), fixed[1]) if m else None
        if words[j] in self._articles and j + 1 < n and _lex(self._units, lems[j + 1]) is not None:
            amount, k = 1.0, j + 1
        else:
            num = self._number_at(c, j, n)
            if num is None:
                unit = _lex(self._units, lems[j]) if bare_ok else None
                return (unit, 1.0, j + 1) if unit else None
            amount, k = num.value, num.end
            if amount < 1 and k + 1 < n and words[k] in self._articles:
                k += 1  # "1/2 an hour"
        half = phrase_at(self._and_half, words, k) if k < n else None
        if half is None and k + 1 < n and words[k] in self._dur_and:
            at = k + 2 if k + 2 < n and words[k + 1] in self._articles else k + 1
            frac = self._number_at(c, at, n) if at < n and _FRACTION.fullmatch(words[at]) else None
            if frac is not None:  # "1 and a 1/2 hours"
                amount, k = amount + frac.value, frac.end
        if half:
            amount, k = amount + 0.5, half[1]
        unit = _lex(self._units, lems[k]) if k < n else None
        if unit is None and bare_ok and k < n:
            unit = self._fuzzy_unit(words[k])  # "на 5 минтут", "in 10 minuts": a typo in the unit
        if unit is None:
            return None
        k += 1
        if not half and k < n and (half := phrase_at(self._and_half, words, k)):
            amount, k = amount + 0.5, half[1]
        return unit, amount, k


def _apply_daypart(hour: int, part: str) -> int:
    if hour > 12:
        return hour
    if part == "am" or (part == "night" and hour == 12):
        return 0 if hour == 12 else hour
    if part == "pm" or (part == "day" and 1 <= hour <= 7) or (part == "night" and hour >= 8):
        return hour + 12 if hour < 12 else hour
    return hour


def _month_day(month: int | None, day: int, end: int) -> _Hit | None:
    if month is None or not 1 <= month <= 12 or day > _DAYS_IN_MONTH[month - 1]:
        return None
    return end, f"{month:02d}-{day:02d}", 1.0


def _iso(parts: Mapping[str, float]) -> str | None:
    """ISO 8601 duration; fractions carry into the next smaller unit ("1.5 часа" → "PT1H30M")."""
    amount = {u: parts.get(u, 0.0) for u in "WDHMS"}
    if any(v > 1e6 for v in amount.values()):
        return None
    for unit, (smaller, factor) in (("W", ("D", 7)), ("D", ("H", 24)), ("H", ("M", 60)), ("M", ("S", 60))):
        whole = int(amount[unit])
        if amount[unit] - whole > 1e-9:
            amount[smaller] += (amount[unit] - whole) * factor
            amount[unit] = whole
    if amount["W"] and not any(amount[u] for u in "DHMS"):
        return f"P{_fmt(amount['W'])}W"
    days = amount["W"] * 7 + amount["D"]
    clock = "".join(f"{_fmt(amount[u])}{u}" for u in "HMS" if amount[u])
    if not days and not clock:
        return "PT0S"
    return "P" + (f"{_fmt(days)}D" if days else "") + (f"T{clock}" if clock else "")
