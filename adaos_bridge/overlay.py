"""Teacher feedback: accepted examples go into a teacher-owned catalog overlay and mark a retraining.

The overlay has the catalog's intent-file schema (``skill.catalog.IntentFile``, owner ``{type:
teacher, id: teacher}``), is validated before it replaces the old file (temp file, fsync,
``os.replace``), and a small JSON marker tells ``tools/train`` that there is something new.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import yaml

from skill.catalog import LOCALES, CatalogError, IntentFile
from skill.fsutil import atomic_write

OWNER = {"type": "teacher", "id": "teacher"}
_INTENT_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")  # the catalog's rule


class ExampleSave(msgspec.Struct, frozen=True):
    """``nlp.teacher.example.save {text, intent, target: {type, id}, slots?, request_id?}``."""

    text: str
    intent: str
    target: dict[str, Any] | None = None
    slots: dict[str, Any] | None = None
    request_id: str | None = None
    locale: str | None = None


class InvalidExample(ValueError):
    """The payload is not an example the catalog could hold."""


def parse_example(payload: dict[str, Any]) -> ExampleSave:
    """Validate an example payload; raises :class:`InvalidExample` naming the field."""
    try:
        ex = msgspec.convert(payload, ExampleSave, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidExample(str(exc)) from exc
    text = " ".join(ex.text.split())
    if not text:
        raise InvalidExample("text is empty")
    if not _INTENT_NAME.match(ex.intent):
        raise InvalidExample(f"intent {ex.intent!r} is not a catalog intent name")
    return msgspec.structs.replace(ex, text=text)


def example_locale(ex: ExampleSave) -> str:
    """The example's locale if given and known; otherwise Cyrillic → ru, else en."""
    if ex.locale:
        primary = ex.locale.replace("_", "-").split("-", 1)[0].lower()
        if primary in LOCALES:
            return primary
    cyr = sum(1 for ch in ex.text if "\u0400" <= ch <= "\u04ff")
    lat = sum(1 for ch in ex.text if ch.isascii() and ch.isalpha())
    return "ru" if cyr > 0 and cyr >= lat / 2 else "en"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class Overlay:
    """The overlay file and the retraining marker. Not thread-safe: the bridge calls it serially."""

    def __init__(self, path: Path | str, marker: Path | str) -> None:
        self.path = Path(path)
        self.marker = Path(marker)

    def load(self) -> dict[str, Any]:
        """The overlay as plain data (an empty one if the file does not exist yet)."""
        if not self.path.exists():
            return {"schema_version": 1, "owner": dict(OWNER), "intents": []}
        raw = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        self._validate(raw)
        return dict(raw)

    def _validate(self, raw: Any) -> None:
        try:
            parsed = msgspec.convert(raw, IntentFile)
        except msgspec.ValidationError as exc:
            raise CatalogError(self.path, "$", str(exc)) from exc
        if parsed.owner.type != "teacher":
            raise CatalogError(self.path, "$.owner.type", "the overlay must be owned by the teacher")
        names = [i.intent for i in parsed.intents]
        if len(names) != len(set(names)):
            raise CatalogError(self.path, "$.intents", "duplicate intent")

    def add(self, ex: ExampleSave) -> bool:
        """Append the example (once per intent and text); True if the file changed."""
        data = self.load()
        locale = example_locale(ex)
        entry = next((i for i in data["intents"] if i.get("intent") == ex.intent), None)
        if entry is None:
            entry = {
                "intent": ex.intent,
                "description": {"en": f"Examples accepted by the teacher for {ex.intent}"},
                "examples": {},
            }
            data["intents"].append(entry)
        texts: list[str] = entry["examples"].setdefault(locale, [])
        if any(t.casefold() == ex.text.casefold() for t in texts):
            return False
        texts.append(ex.text)
        self._validate(data)
        blob = yaml.safe_dump(data, allow_unicode=True, sort_keys=False).encode("utf-8")
        atomic_write(self.path, blob)
        self._mark(ex, blob, sum(len(v) for i in data["intents"] for v in i["examples"].values()))
        return True

    def _mark(self, ex: ExampleSave, blob: bytes, total: int) -> None:
        """Create or update the retraining-candidate marker (tools/train deletes it once used)."""
        marker: dict[str, Any] = {}
        if self.marker.exists():
            try:
                marker = json.loads(self.marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                marker = {}
        now = _now()
        intents = sorted({*marker.get("intents", []), ex.intent})
        targets = [t for t in marker.get("targets", []) if isinstance(t, dict)]
        if ex.target and ex.target not in targets:
            targets.append(ex.target)
        marker.update(
            schema_version=1,
            reason="teacher_examples",
            overlay_path=str(self.path),
            overlay_sha256=hashlib.sha256(blob).hexdigest(),
            examples_total=total,
            new_examples=int(marker.get("new_examples", 0)) + 1,
            intents=intents,
            targets=targets,
            first_marked_at=marker.get("first_marked_at", now),
            updated_at=now,
            last_request_id=ex.request_id,
        )
        atomic_write(self.marker, json.dumps(marker, ensure_ascii=False, indent=2).encode("utf-8"))
