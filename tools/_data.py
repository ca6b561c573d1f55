"""Training rows from the catalog or bench / hub-export JSONL, and their checks after canonicalization."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import TypeVar

import msgspec

from skill.catalog import Catalog, MarkupError, parse_markup

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")

OOS = "oos"
SPLITS = ("train", "val", "test")
VAL_EVERY = 5  # catalog split: every 5th example of an (intent, locale) list goes to val...
VAL_MIN = 4  # ...when the list has at least this many examples
_RASA_MARKUP = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_BAD_NAME = re.compile(r"\s")


class DataError(ValueError):
    """Training data is unusable; the message says which rows and why."""


class Row(msgspec.Struct, frozen=True):
    """One training row; intent ``"oos"`` marks an out-of-scope utterance."""

    text: str
    intent: str
    locale: str = ""
    split: str = "train"
    # Slot spans (start, end, slot) over ``text``; None: the row carries no span labels at all.
    spans: tuple[tuple[int, int, str], ...] | None = None


class DataReport(msgspec.Struct):
    """What validation found and dropped (stored in metrics.json)."""

    train_rows: int = 0
    val_rows: int = 0
    oos_train: int = 0
    oos_val: int = 0
    duplicates_dropped: int = 0
    conflicts: list[str] = msgspec.field(default_factory=list)
    oos_conflicts: int = 0
    intents_not_in_catalog: int = 0


def _split_list(items: list[_T]) -> list[tuple[_T, str]]:
    if len(items) < VAL_MIN:
        return [(t, "train") for t in items]
    return [(t, "val" if i % VAL_EVERY == VAL_EVERY - 1 else "train") for i, t in enumerate(items)]


def rows_from_catalog(catalog: Catalog) -> tuple[list[Row], list[Row]]:
    """Deterministic (train, val) split of the catalog examples; negatives and out_of_scope become ``oos``."""
    train: list[Row] = []
    val: list[Row] = []
    for name, intent in catalog.intents.items():
        marks = catalog.spans.get(name, {})
        for locale, texts in intent.examples.items():
            per = marks.get(locale) or [()] * len(texts)
            pairs = [
                (t, tuple((sp.start, sp.end, sp.slot) for sp in m)) for t, m in zip(texts, per, strict=True)
            ]
            for (text, spans), split in _split_list(pairs):
                (val if split == "val" else train).append(Row(text, name, locale, split, spans))
    # Negatives are split per list, like the examples (each intent's list per locale, the out-of-scope
    # list per locale): a line appended to one list moves no other row between train and val, so two
    # catalog versions can be compared on the val rows both hold out. (One list per locale, as before,
    # moved every later intent's negatives when one was added.)
    negatives: dict[tuple[str, str], list[str]] = defaultdict(list)
    for ex in catalog.negatives():
        negatives[(ex.intent, ex.locale)].append(ex.text)
    for (_, locale), texts in negatives.items():
        for text, split in _split_list(texts):
            (val if split == "val" else train).append(Row(text, OOS, locale, split))
    return train, val


def carve_val(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """Split train rows like the catalog: every 5th row of each (intent, locale) group becomes val."""
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        groups[(row.intent, row.locale)].append(row)
    train: list[Row] = []
    val: list[Row] = []
    for key in sorted(groups):
        texts = [r.text for r in groups[key]]
        for text, split in _split_list(texts):
            (val if split == "val" else train).append(Row(text, key[0], key[1], split))
    return train, val


def _field(obj: dict[str, object], key: str, where: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string")
    return value.strip()


def rows_from_jsonl(path: Path | str) -> list[Row]:
    """Rows of a bench file ``{text, intent, lang, split}`` or a hub export ``{intent, text, split, ...}``."""
    path = Path(path)
    rows: list[Row] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON: {exc.msg}") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        if obj.get("schema_version", 1) != 1:
            raise DataError(f"{where}: unsupported schema_version {obj.get('schema_version')!r}")
        raw_text = _field(obj, "text", where)
        spans: tuple[tuple[int, int, str], ...] | None = None
        try:
            text, marked = parse_markup(raw_text)
        except MarkupError:
            text, marked = _RASA_MARKUP.sub(r"\1", raw_text), ()
        if marked:
            spans = tuple((m.start, m.end, m.slot) for m in marked)
        if isinstance(obj.get("spans"), list):
            spans = _spans(obj["spans"], text, where)
        intent = _field(obj, "intent", where)
        if _BAD_NAME.search(intent):
            raise DataError(f"{where}: bad intent name {intent!r}")
        split = obj.get("split") or "train"
        if split not in SPLITS:
            raise DataError(f"{where}: split must be one of {SPLITS}, not {split!r}")
        locale = _field(obj, "lang", where, False) or _field(obj, "locale", where, False)
        rows.append(Row(text=text, intent=intent, locale=locale, split=str(split), spans=spans))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _spans(raw: list[object], text: str, where: str) -> tuple[tuple[int, int, str], ...]:
    """Bench ``spans: [{start, end, slot, value?}]``, checked against the text."""
    out = []
    for sp in raw:
        if not isinstance(sp, dict):
            raise DataError(f"{where}: a span must be an object")
        start, end, slot = sp.get("start"), sp.get("end"), sp.get("slot")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)):
            raise DataError(f"{where}: span offsets {start!r}..{end!r} do not fit the text")
        if not isinstance(slot, str) or not slot:
            raise DataError(f"{where}: a span needs a slot name")
        out.append((start, end, slot))
    return tuple(sorted(out))


class Prepared(msgspec.Struct):
    """Canonicalized, checked training data."""

    intents: list[str]
    train_texts: list[str]
    train_labels: list[int]  # -1 = oos
    train_locales: list[str]
    val_texts: list[str]
    val_labels: list[int]
    report: DataReport


def prepare(
    train: list[tuple[Row, str]], val: list[tuple[Row, str]], catalog: Catalog, use_oos_train: bool
) -> Prepared:
    """Check (row, masked) pairs: names, empty classes, unknown val intents; drop duplicates, conflicts."""
    report = DataReport()
    for row, masked in train + val:
        if not masked.strip():
            raise DataError(f"row {row.text!r} ({row.intent}) is empty after canonicalization")
        if not row.intent or _BAD_NAME.search(row.intent):
            raise DataError(f"bad intent name {row.intent!r} (text {row.text!r})")
    by_text: dict[str, set[str]] = defaultdict(set)
    for row, masked in train:
        by_text[masked].add(row.intent)
    conflicts = {t for t, names in by_text.items() if len(names - {OOS}) > 1}
    if conflicts:
        report.conflicts = sorted(f"{t!r}: {sorted(by_text[t])}" for t in conflicts)
        _LOGGER.warning(
            "%d texts appear under several intents; dropped: %s", len(conflicts), report.conflicts[:10]
        )
    intents = sorted({row.intent for row, _ in train if row.intent != OOS and row.intent})
    seen: set[tuple[str, str]] = set()
    texts: list[str] = []
    labels: list[int] = []
    locales: list[str] = []
    index = {name: i for i, name in enumerate(intents)}
    for row, masked in train:
        if masked in conflicts:
            continue
        if row.intent == OOS and (by_text[masked] - {OOS}):
            report.oos_conflicts += 1
            continue
        if (masked, row.intent) in seen:
            report.duplicates_dropped += 1
            continue
        seen.add((masked, row.intent))
        if row.intent == OOS:
            report.oos_train += 1
            if not use_oos_train:
                continue
        texts.append(masked)
        labels.append(index.get(row.intent, -1))
        locales.append(row.locale)
    counts: dict[int, int] = defaultdict(int)
    for label in labels:
        counts[label] += 1
    empty = [name for name in intents if counts[index[name]] == 0]
    if empty:
        raise DataError(f"intents with no training rows left (all duplicates or conflicts): {empty}")
    if len(intents) < 2:
        raise DataError(f"need at least two intents with training rows, got {intents}")
    unknown = sorted({row.intent for row, _ in val if row.intent != OOS and row.intent not in index})
    if unknown:
        raise DataError(f"validation rows name intents that have no training rows: {unknown[:20]}")
    if not val:
        raise DataError("no validation rows: blend weights and calibration are fitted on val")
    missing = sorted(set(catalog.intents) - set(intents))
    outside = [name for name in intents if name not in catalog.intents]
    report.intents_not_in_catalog = len(outside)
    if missing and not outside:
        _LOGGER.warning("catalog intents absent from the training data: %s", missing[:20])
    report.train_rows = len(texts)
    report.val_rows = len(val)
    report.oos_val = sum(1 for row, _ in val if row.intent == OOS)
    return Prepared(
        intents=intents,
        train_texts=texts,
        train_labels=labels,
        train_locales=locales,
        val_texts=[m for _, m in val],
        val_labels=[index.get(row.intent, -1) for row, _ in val],
        report=report,
    )


def data_digest(rows: list[Row]) -> str:
    """sha256 over the rows in a canonical order (what the model was trained and fitted on)."""
    h = hashlib.sha256()
    for row in sorted(rows, key=lambda r: (r.split, r.intent, r.locale, r.text)):
        h.update(msgspec.json.encode(row) + b"\n")
    return h.hexdigest()
