"""Intent catalog and entity registry: YAML files under ``catalog/``, schema-checked at load."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

OwnerType = Literal["skill", "scenario", "system_action", "interpreter", "builtin", "teacher"]
LOCALES = ("ru", "en")


class CatalogError(ValueError):
    """A catalog file is malformed; the message names the file and the key."""

    def __init__(self, path: Path | str, key: str, message: str) -> None:
        super().__init__(f"{path}: {key}: {message}")
        self.path = str(path)
        self.key = key


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class Owner(_Strict, frozen=True, forbid_unknown_fields=True):
    """Who owns a catalog file (skill, scenario, system action...)."""

    type: OwnerType
    id: str


class SlotRange(_Strict, frozen=True, forbid_unknown_fields=True):
    """Inclusive bounds of a numeric slot value; either may be absent."""

    min: float | None = None
    max: float | None = None

    def admits(self, x: float) -> bool:
        """Whether ``x`` lies within the bounds."""
        return (self.min is None or x >= self.min) and (self.max is None or x <= self.max)


class SlotSpec(_Strict, frozen=True, forbid_unknown_fields=True):
    """A slot an intent may carry.

    ``source`` names the canonicalization placeholder that fills it (``time``, ``device``,
    ``scenario``...); it defaults to the slot name. ``value`` picks what goes into the slot:
    the normalized ``value`` (e.g. "07:30"), the canonical ``ref`` (``device:light:kitchen``), the
    entity ``id`` (the last segment of the ref), or the matched ``text``.
    """

    source: str | None = None
    value: Literal["value", "ref", "id", "text"] = "value"
    required: bool = False
    description: str = ""
    # Registry kinds the slot accepts (``light`` = ``device.light``); a resolved entity of another kind
    # is a kind conflict, and the intent is not accepted for it.
    kinds: tuple[str, ...] = ()
    # An open-class slot (a song, a reminder's text): no registry, filled by the slot tagger.
    open: bool = False
    # Numeric bounds of a value slot (durations in seconds, temperatures in degrees Celsius).
    range: SlotRange | None = None
    # What the words "max" / "min" ("на максимум", "lowest") mean for this slot.
    extremes: dict[Literal["max", "min"], str] = msgspec.field(default_factory=dict)
    # Several values in the order they were said, as a list ("15 percent of 200" -> number: ["15", "200"]);
    # a single-valued slot keeps the first.
    multiple: bool = False


class RegexRule(_Strict, frozen=True, forbid_unknown_fields=True):
    """A deterministic rule matched against the canonicalized (placeholder-masked) text.

    Rules are tried by ``priority`` (higher first), then in catalog order. Named groups become
    slots; placeholders matched by the rule bring their canonical slots along.
    """

    pattern: str
    locale: Literal["ru", "en", "any"] = "any"
    priority: int = 0
    id: str = ""


class GoldenCase(_Strict, frozen=True, forbid_unknown_fields=True):
    """A must-not-break case for promotion and regression tests."""

    text: str
    locale: Literal["ru", "en"] | None = None
    slots: dict[str, str | list[str]] = msgspec.field(default_factory=dict)


class Thresholds(_Strict, frozen=True, forbid_unknown_fields=True):
    """Per-intent stricter gate thresholds (never laxer than the model's)."""

    accept: float | None = None
    margin: float | None = None


class Intent(_Strict, frozen=True, forbid_unknown_fields=True):
    """One intent: what it means, its slots, examples per locale, negatives and rules."""

    intent: str
    description: dict[str, str]
    examples: dict[str, list[str]]
    slots: dict[str, SlotSpec] = msgspec.field(default_factory=dict)
    negatives: dict[str, list[str]] = msgspec.field(default_factory=dict)
    regex: list[RegexRule] = msgspec.field(default_factory=list)
    golden: list[GoldenCase] = msgspec.field(default_factory=list)
    action: str | None = None
    tool: str | None = None
    risky: bool = False
    thresholds: Thresholds | None = None
    prior: float = 1.0
    # The intent that undoes this one ("cancel that" after alarm.set -> alarm.cancel).
    cancel_intent: str | None = None


class IntentFile(_Strict, frozen=True, forbid_unknown_fields=True):
    """One owner's file under ``catalog/intents/``."""

    owner: Owner
    intents: list[Intent]
    out_of_scope: dict[str, list[str]] = msgspec.field(default_factory=dict)
    schema_version: int = 1


class Entity(_Strict, frozen=True, forbid_unknown_fields=True):
    """A named thing users refer to: device, room, scenario, app, modal, webspace, skill."""

    ref: str
    aliases: dict[str, list[str]]
    room: str | None = None
    label: dict[str, str] = msgspec.field(default_factory=dict)


class EntityFile(_Strict, frozen=True, forbid_unknown_fields=True):
    """``catalog/entities/*.yaml``: entities grouped under a kind (``device.light``, ``scenario``...)."""

    kinds: dict[str, list[Entity]]
    schema_version: int = 1


class Span(msgspec.Struct, frozen=True, array_like=True):
    """A marked slot span of an example: character offsets into the stripped text."""

    start: int
    end: int
    slot: str


class Example(msgspec.Struct, frozen=True):
    """A flattened training row (markup stripped; ``spans`` are the marked slots)."""

    text: str
    intent: str
    locale: str
    owner: str
    spans: tuple[Span, ...] = ()


class Catalog(msgspec.Struct, frozen=True):
    """Everything loaded from ``catalog/``: intents by name, entities, masking rules, digest."""

    root: str
    intents: dict[str, Intent]
    owners: dict[str, Owner]
    entities: dict[str, list[Entity]]
    out_of_scope: dict[str, list[str]]
    masking: dict[str, Any]
    digest: str
    # intent -> locale -> spans of each example (same order as ``Intent.examples``, markup stripped).
    spans: dict[str, dict[str, list[tuple[Span, ...]]]] = msgspec.field(default_factory=dict)

    def examples(self, locales: Iterable[str] | None = None) -> Iterator[Example]:
        """Positive examples as flat rows, in catalog order."""
        wanted = set(locales) if locales is not None else None
        for name, intent in self.intents.items():
            marks = self.spans.get(name, {})
            for locale, texts in intent.examples.items():
                if wanted is None or locale in wanted:
                    per = marks.get(locale, [])
                    for i, text in enumerate(texts):
                        yield Example(
                            text, name, locale, self.owners[name].id, per[i] if i < len(per) else ()
                        )

    def markup_counts(self) -> dict[str, int]:
        """How many examples carry markup, and how many spans, per slot (for ``/health``)."""
        out: dict[str, int] = {"examples_marked": 0, "spans": 0}
        for per_locale in self.spans.values():
            for rows in per_locale.values():
                for spans in rows:
                    out["examples_marked"] += bool(spans)
                    out["spans"] += len(spans)
        return out

    def negatives(self, locales: Iterable[str] | None = None) -> Iterator[Example]:
        """Negative rows: per-intent negatives (intent = the one they are *not*) and out-of-scope."""
        wanted = set(locales) if locales is not None else None
        for name, intent in self.intents.items():
            for locale, texts in intent.negatives.items():
                if wanted is None or locale in wanted:
                    for text in texts:
                        yield Example(text, name, locale, self.owners[name].id)
        for locale, texts in self.out_of_scope.items():
            if wanted is None or locale in wanted:
                for text in texts:
                    yield Example(text, "oos", locale, "catalog")


_INTENT_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
_MARK = re.compile(r"\[([^\[\]()]+)\]\(([A-Za-z_][\w]*)\)")


class MarkupError(ValueError):
    """Bad slot markup in one example."""


def parse_markup(text: str) -> tuple[str, tuple[Span, ...]]:
    """``"turn on the [ceiling fan](device)"`` → (``"turn on the ceiling fan"``, spans).

    Rasa's convention: ``[surface](slot)``. Unbalanced or nested brackets are errors.
    """
    if "[" not in text and "]" not in text:
        return text, ()
    out: list[str] = []
    spans: list[Span] = []
    pos = 0
    for m in _MARK.finditer(text):
        between = text[pos : m.start()]
        if "[" in between or "]" in between:
            raise MarkupError(f"unbalanced or nested brackets in {text!r}")
        out.append(between)
        start = sum(len(p) for p in out)
        surface = m.group(1)
        if surface != surface.strip() or not surface.strip():
            raise MarkupError(f"span {surface!r} has leading or trailing spaces in {text!r}")
        out.append(surface)
        spans.append(Span(start, start + len(surface), m.group(2)))
        pos = m.end()
    tail = text[pos:]
    if "[" in tail or "]" in tail:
        raise MarkupError(f"unbalanced or nested brackets in {text!r}")
    out.append(tail)
    return "".join(out), tuple(spans)


def _line_of(raw_text: str, needle: str) -> int | None:
    """1-based line of the first occurrence of ``needle`` in a file's text (YAML loses line numbers)."""
    idx = raw_text.find(needle)
    return raw_text.count("\n", 0, idx) + 1 if idx >= 0 else None


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: Path) -> Any:
    try:
        # libyaml's C loader when PyYAML has it: ~10x faster on a catalog of thousands of examples.
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise CatalogError(path, "$", f"invalid YAML: {exc}") from exc


_PATH_TOKEN = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\[\.\.\.\]")


def _resolve_key(raw: Any, key: str) -> str:
    """Replace msgspec's ``[...]`` (an unnamed mapping key) by the real key(s) found in ``raw``."""
    tokens = [m for m in _PATH_TOKEN.finditer(key[1:])] if key.startswith("$") else []
    paths: list[tuple[str, Any]] = [("$", raw)]
    for tok in tokens:
        nxt: list[tuple[str, Any]] = []
        for prefix, node in paths:
            if tok.group(1) is not None and isinstance(node, dict) and tok.group(1) in node:
                nxt.append((f"{prefix}.{tok.group(1)}", node[tok.group(1)]))
            elif tok.group(2) is not None and isinstance(node, list) and int(tok.group(2)) < len(node):
                nxt.append((f"{prefix}[{tok.group(2)}]", node[int(tok.group(2))]))
            elif tok.group(0) == "[...]" and isinstance(node, dict):
                nxt.extend((f"{prefix}.{k}", v) for k, v in node.items())
        if not nxt:
            return key
        paths = nxt
    return "|".join(p for p, _ in paths) if len(paths) <= 3 else key


def _convert(path: Path, raw: Any, typ: type[Any]) -> Any:
    try:
        return msgspec.convert(raw, typ)
    except msgspec.ValidationError as exc:
        # msgspec names the key path in its message ("... - at `$.intents[0].foo`").
        text = str(exc)
        key = text.rsplit("at `", 1)[-1].rstrip("`") if "at `" in text else "$"
        raise CatalogError(path, _resolve_key(raw, key), text) from exc


def _strip_markup(
    path: Path, raw_text: str, idx: int, intent: Intent
) -> tuple[Intent, dict[str, list[tuple[Span, ...]]]]:
    """Examples without markup, their spans; unknown slot names and bad brackets name file and line."""
    examples: dict[str, list[str]] = {}
    spans: dict[str, list[tuple[Span, ...]]] = {}
    for locale, texts in intent.examples.items():
        for e_idx, text in enumerate(texts):
            key = f"$.intents[{idx}].examples.{locale}[{e_idx}]"
            line = _line_of(raw_text, text)
            where = f"line {line}: " if line else ""
            try:
                plain, marks = parse_markup(text)
            except MarkupError as exc:
                raise CatalogError(path, key, f"{where}{exc}") from exc
            for sp in marks:
                if sp.slot not in intent.slots:
                    raise CatalogError(
                        path, key, f"{where}unknown slot {sp.slot!r} in markup (intent {intent.intent})"
                    )
            examples.setdefault(locale, []).append(plain)
            spans.setdefault(locale, []).append(marks)
    for field_name, per_locale in (("negatives", intent.negatives),):
        for locale, texts in per_locale.items():
            for e_idx, text in enumerate(texts):
                if _MARK.search(text):
                    line = _line_of(raw_text, text)
                    raise CatalogError(
                        path,
                        f"$.intents[{idx}].{field_name}.{locale}[{e_idx}]",
                        f"line {line}: slot markup in a negative" if line else "slot markup in a negative",
                    )
    return msgspec.structs.replace(intent, examples=examples), spans


def _check_kinds(catalog_kinds: set[str], intents: dict[str, Intent], where: dict[str, Path]) -> None:
    """Every ``kinds`` constraint names a registry kind (``light`` = ``device.light``)."""
    for name, intent in intents.items():
        for slot, spec in intent.slots.items():
            for kind in spec.kinds:
                if kind not in catalog_kinds and f"device.{kind}" not in catalog_kinds:
                    raise CatalogError(
                        where[name], f"{name}.slots.{slot}.kinds", f"unknown entity kind {kind!r}"
                    )
        if intent.cancel_intent is not None and intent.cancel_intent not in intents:
            raise CatalogError(
                where[name], f"{name}.cancel_intent", f"unknown intent {intent.cancel_intent!r}"
            )


def _check_intent(path: Path, idx: int, intent: Intent) -> None:
    where = f"$.intents[{idx}]"
    if not _INTENT_NAME.match(intent.intent):
        raise CatalogError(path, f"{where}.intent", f"bad intent name {intent.intent!r}")
    for field_name, per_locale in (("examples", intent.examples), ("negatives", intent.negatives)):
        for locale in per_locale:
            if locale not in LOCALES:
                raise CatalogError(path, f"{where}.{field_name}.{locale}", "unknown locale")
    if not any(intent.examples.values()):
        raise CatalogError(path, f"{where}.examples", f"intent {intent.intent} has no examples")
    for r_idx, rule in enumerate(intent.regex):
        try:
            re.compile(rule.pattern)
        except re.error as exc:
            raise CatalogError(path, f"{where}.regex[{r_idx}].pattern", str(exc)) from exc
    if intent.thresholds and intent.thresholds.accept is not None:
        if not 0.0 < intent.thresholds.accept <= 1.0:
            raise CatalogError(path, f"{where}.thresholds.accept", "must be in (0, 1]")


def _merge_teacher(base: Intent, extra: Intent) -> Intent:
    """A teacher overlay adds examples and negatives to an intent; it never redefines it."""

    def merged(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {k: list(v) for k, v in a.items()}
        for locale, texts in b.items():
            have = out.setdefault(locale, [])
            have.extend(t for t in texts if t not in have)
        return out

    return msgspec.structs.replace(
        base,
        examples=merged(base.examples, extra.examples),
        negatives=merged(base.negatives, extra.negatives),
    )


def load_catalog(root: Path | str, overlays: Iterable[Path | str] = ()) -> Catalog:
    """Load and validate every YAML file of a catalog directory, then teacher overlays.

    Layout: ``intents/*.yaml`` (one file per owner), ``entities/*.yaml``, ``masking.yaml``.
    Unknown keys, bad types, duplicate intents or entity refs raise :class:`CatalogError`.
    Files owned by the teacher (in ``intents/`` or given as ``overlays``) are applied last: their
    examples extend intents defined elsewhere, and intents new to the catalog are added whole.
    """
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(root, "$", "catalog directory not found")
    digest = hashlib.sha256()
    intents: dict[str, Intent] = {}
    owners: dict[str, Owner] = {}
    oos: dict[str, list[str]] = {}
    files = sorted((root / "intents").glob("*.yaml"))
    if not files:
        raise CatalogError(root / "intents", "$", "no intent files")
    spans: dict[str, dict[str, list[tuple[Span, ...]]]] = {}
    where: dict[str, Path] = {}
    parsed_files: list[tuple[Path, IntentFile, str]] = []
    for path in [*files, *(Path(o) for o in overlays if Path(o).is_file())]:
        raw_bytes = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + raw_bytes)
        raw_text = raw_bytes.decode("utf-8", errors="replace")
        parsed_files.append((path, _convert(path, _read_yaml(path), IntentFile), raw_text))
    parsed_files.sort(key=lambda item: item[1].owner.type == "teacher")  # stable: teacher last
    for path, parsed, raw_text in parsed_files:
        teacher = parsed.owner.type == "teacher"
        for idx, declared in enumerate(parsed.intents):
            _check_intent(path, idx, declared)
            if teacher and declared.intent in intents:
                # An overlay extends an intent defined elsewhere: its markup names that intent's slots.
                declared = msgspec.structs.replace(declared, slots=intents[declared.intent].slots)  # noqa: PLW2901
            intent, marks = _strip_markup(path, raw_text, idx, declared)
            if intent.intent in intents:
                if not teacher:
                    raise CatalogError(path, f"$.intents[{idx}].intent", f"duplicate {intent.intent}")
                base = intents[intent.intent]
                merged = _merge_teacher(base, intent)
                have = spans.setdefault(intent.intent, {})
                for locale, texts in merged.examples.items():
                    rows = have.setdefault(locale, [])
                    new = dict(zip(intent.examples.get(locale, []), marks.get(locale, []), strict=True))
                    rows.extend(new.get(t, ()) for t in texts[len(rows) :])
                intents[intent.intent] = merged
                continue
            intents[intent.intent] = intent
            owners[intent.intent] = parsed.owner
            spans[intent.intent] = marks
            where[intent.intent] = path
        for locale, texts in parsed.out_of_scope.items():
            if locale not in LOCALES:
                raise CatalogError(path, f"$.out_of_scope.{locale}", "unknown locale")
            oos.setdefault(locale, []).extend(texts)

    entities: dict[str, list[Entity]] = {}
    seen_refs: set[str] = set()
    for path in sorted((root / "entities").glob("*.yaml")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
        efile: EntityFile = _convert(path, _read_yaml(path), EntityFile)
        for kind, items in efile.kinds.items():
            for e_idx, entity in enumerate(items):
                if entity.ref in seen_refs:
                    raise CatalogError(path, f"$.kinds.{kind}[{e_idx}].ref", "duplicate ref")
                seen_refs.add(entity.ref)
            entities.setdefault(kind, []).extend(items)
    _check_kinds(set(entities), intents, where)

    masking: dict[str, Any] = {}
    masking_path = root / "masking.yaml"
    if masking_path.exists():
        digest.update(b"masking.yaml\0" + masking_path.read_bytes())
        loaded = _read_yaml(masking_path)
        if not isinstance(loaded, dict):
            raise CatalogError(masking_path, "$", "must be a mapping")
        masking = loaded
    return Catalog(
        root=str(root),
        intents=intents,
        owners=owners,
        entities=entities,
        out_of_scope=oos,
        masking=masking,
        digest=digest.hexdigest(),
        spans=spans,
    )
