"""Catalog schema: strict keys with file/key in errors, and the shipped catalog's coverage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from skill.catalog import CatalogError, load_catalog
from tests.conftest import MINI_INTENTS, REPO, write_catalog

REQUIRED_INTENTS = {
    "desktop.switch_scenario",
    "desktop.open_modal",
    "desktop.toggle_app_install",
    "desktop.reload_webspace",
    "desktop.reset_webspace",
    "voice.capability.activate",
    "voice.timer.start",
    "voice.time.now",
    "desktop.open_marketplace",
    "desktop.open_weather",
    "notebook.create_note",
    "alarm.set",
    "alarm.cancel",
    "voice.timer.cancel",
    "music.play",
    "music.stop",
    "music.volume",
    "device.turn_on",
    "device.turn_off",
    "light.set_brightness",
    "reminder.create",
    "news.get",
    "joke.tell",
    "calculator.compute",
    "system.help",
}


def _with(change: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {**MINI_INTENTS, "intents": [dict(i) for i in MINI_INTENTS["intents"]]}
    data["intents"][0].update(change)
    return data


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"surprise": 1}, "$.intents[0]"),
        ({"examples": {"de": ["hallo"]}}, "$.intents[0].examples.de"),
        ({"examples": {"ru": []}}, "$.intents[0].examples"),
        ({"intent": "NoDots"}, "$.intents[0].intent"),
        ({"slots": {"time": {"source": "time", "value": "weird"}}}, "$.intents[0].slots.time.value"),
        ({"intent": "device.turn_off"}, "$.intents[1].intent"),  # duplicate
        ({"thresholds": {"accept": 1.5}}, "$.intents[0].thresholds.accept"),
    ],
)
def test_schema_errors_name_file_and_key(tmp_path: Path, change: dict[str, Any], key: str) -> None:
    root = write_catalog(tmp_path / "c", _with(change))
    with pytest.raises(CatalogError) as info:
        load_catalog(root)
    assert info.value.path.endswith("mini.yaml")
    assert info.value.key.startswith(key)


def test_invalid_yaml(tmp_path: Path) -> None:
    root = write_catalog(tmp_path / "c")
    (root / "intents" / "broken.yaml").write_text("intents: [\n")
    with pytest.raises(CatalogError, match="broken.yaml"):
        load_catalog(root)


def test_entity_duplicate_ref(tmp_path: Path) -> None:
    root = write_catalog(tmp_path / "c")
    (root / "entities" / "zz_dup.yaml").write_text(
        'kinds: {room: [{ref: "room:kitchen", aliases: {en: [cook room]}}]}\n'
    )
    with pytest.raises(CatalogError, match=r"zz_dup.yaml: \$\.kinds\.room\[0\]\.ref"):
        load_catalog(root)


def test_adding_an_intent_needs_no_code(tmp_path: Path) -> None:
    root = write_catalog(tmp_path / "c")
    (root / "intents" / "extra.yaml").write_text(
        "owner: {type: skill, id: extra}\n"
        "intents:\n  - intent: coffee.make\n    description: {en: Make coffee}\n"
        "    examples: {en: [make me a coffee]}\n"
    )
    catalog = load_catalog(root)
    assert "coffee.make" in catalog.intents
    assert catalog.owners["coffee.make"].id == "extra"


@pytest.fixture(scope="module")
def shipped() -> Any:
    return load_catalog(REPO / "catalog")


def test_shipped_catalog_covers_required_intents(shipped: Any) -> None:
    assert REQUIRED_INTENTS <= set(shipped.intents)


def test_shipped_catalog_has_enough_examples(shipped: Any) -> None:
    for name, intent in shipped.intents.items():
        for locale in ("ru", "en"):
            texts = intent.examples.get(locale, [])
            assert len(set(texts)) >= 30, f"{name} has {len(set(texts))} distinct {locale} examples"
            assert intent.negatives.get(locale), f"{name} has no {locale} negatives"
            assert intent.description.get(locale), f"{name} has no {locale} description"


def test_shipped_examples_do_not_cross_intents(shipped: Any) -> None:
    seen: dict[str, str] = {}
    for ex in shipped.examples():
        key = " ".join(ex.text.lower().replace("ё", "е").split())
        other = seen.setdefault(key, ex.intent)
        assert other == ex.intent, f"{ex.text!r} is an example of both {other} and {ex.intent}"


def test_teacher_overlay_extends_existing_intents(tmp_path: Path) -> None:
    root = write_catalog(tmp_path / "c")
    overlay = tmp_path / "state" / "teacher.yaml"
    overlay.parent.mkdir()
    overlay.write_text(
        "owner: {type: teacher, id: teacher}\n"
        "intents:\n"
        "  - intent: alarm.set\n    description: {ru: x}\n"
        "    examples: {ru: [будильник на семь утра пожалуйста, поставь будильник на 7:30]}\n"
        "  - intent: coffee.make\n    description: {en: Make coffee}\n    examples: {en: [brew a coffee]}\n"
    )
    base = load_catalog(root)
    merged = load_catalog(root, overlays=[overlay])
    assert merged.intents["alarm.set"].examples["ru"] == [
        *base.intents["alarm.set"].examples["ru"],
        "будильник на семь утра пожалуйста",
    ]  # the duplicate is not added twice
    assert merged.intents["alarm.set"].description == base.intents["alarm.set"].description
    assert merged.owners["alarm.set"].id == "mini"
    assert merged.owners["coffee.make"].type == "teacher"
    assert merged.digest != base.digest
    # The same file inside intents/ behaves the same; a non-teacher duplicate is still an error.
    (root / "intents" / "a_teacher.yaml").write_text(overlay.read_text())
    assert "coffee.make" in load_catalog(root).intents
    (root / "intents" / "a_teacher.yaml").write_text(overlay.read_text().replace("teacher, id", "skill, id"))
    with pytest.raises(CatalogError, match="duplicate alarm.set"):
        load_catalog(root)


def test_catalog_keeps_the_probe_held_out() -> None:
    """No catalog text equals, or is a light edit of, a row of the independent probe set."""
    probe = REPO.parent / "shared" / "bench" / "home_probe.jsonl"
    if not probe.is_file():
        pytest.skip(f"{probe} not here")
    import json  # noqa: PLC0415

    from tools.probe import catalog_overlap, catalog_texts_near  # noqa: PLC0415

    rows = [json.loads(line) for line in probe.read_text(encoding="utf-8").splitlines() if line.strip()]
    catalog = load_catalog(REPO / "catalog")
    # The message names our own lines to delete or reword, never the held-out rows themselves
    # (only their count reaches the assertion, so pytest's introspection cannot print them either).
    near = len(catalog_overlap(catalog, rows))
    assert near == 0, f"catalog texts too close to {near} probe rows: {catalog_texts_near(catalog, rows)}"


def test_catalog_keeps_the_dev_set_held_out() -> None:
    """bench/home_dev.jsonl is our own development set (written apart from the catalog, never trained
    on): no catalog text equals or lightly edits one of its rows, and none of its rows is a light edit
    of a row of the independent probe (the probe is compared by count only, never shown)."""
    import json  # noqa: PLC0415

    from tools.probe import catalog_overlap, catalog_texts_near  # noqa: PLC0415

    dev = [
        json.loads(line)
        for line in (REPO / "bench" / "home_dev.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    catalog = load_catalog(REPO / "catalog")
    assert {r["intent"] for r in dev} - {"oos"} <= set(catalog.intents)
    assert {r["lang"] for r in dev} == {"ru", "en"} and len(dev) > 1000
    # Like the probe's guard: our own lines are named, the dev rows only counted (a writer who runs this
    # test must not be shown the rows the catalog is judged on).
    near = len(catalog_overlap(catalog, dev))
    assert near == 0, f"catalog texts too close to {near} dev rows: {catalog_texts_near(catalog, dev)}"
    probe = REPO.parent / "shared" / "bench" / "home_probe.jsonl"
    if probe.is_file():
        from rapidfuzz import fuzz, process  # noqa: PLC0415

        from tools.probe import _norm  # noqa: PLC0415

        held = sorted(
            {
                _norm(json.loads(line)["text"])
                for line in probe.read_text(encoding="utf-8").splitlines()
                if line.strip()
            }
        )
        close = [
            r["text"]
            for r in dev
            if process.extractOne(_norm(r["text"]), held, scorer=fuzz.ratio, score_cutoff=92)
        ]
        assert not close, f"dev rows too close to probe rows (delete them): {close}"


def test_overlap_guard_names_the_catalog_side() -> None:
    """The guard finds a light edit and reports it by our own catalog text."""
    from tools.probe import catalog_overlap, catalog_texts_near  # noqa: PLC0415

    catalog = load_catalog(REPO / "catalog")
    ours = next(iter(catalog.examples())).text
    edited = [{"text": ours + "!"}, {"text": "совершенно посторонняя фраза про пингвинов и орбиту"}]
    assert catalog_overlap(catalog, edited) == [ours + "!"]
    assert ours in catalog_texts_near(catalog, edited)
