"""Regex stage: priority order, locale filter, named groups as slots, abstain on no match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from skill.canonicalize import Canonical
from skill.catalog import load_catalog
from skill.decision import Outcome
from skill.regex_stage import RegexStage
from tests.conftest import write_catalog


def _intent(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"intent": name, "description": {"en": name}, "examples": {"en": [name]}, "regex": rules}


CATALOG = {
    "owner": {"type": "skill", "id": "t"},
    "intents": [
        _intent("music.play", [{"id": "generic", "pattern": r"^play (?P<query>.+)$", "priority": 10}]),
        _intent("music.play_radio", [{"id": "radio", "pattern": r"^play (?:the )?radio$", "priority": 50}]),
        _intent(
            "timer.start",
            [
                {"id": "ru", "locale": "ru", "pattern": r"^таймер на \{duration\}$"},
                {"id": "en", "locale": "en", "pattern": r"^timer for \{duration\}$"},
            ],
        ),
        _intent("first.same_priority", [{"id": "first", "pattern": r"^same$", "priority": 5}]),
        _intent("second.same_priority", [{"id": "second", "pattern": r"^same$", "priority": 5}]),
    ],
}


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> RegexStage:
    root = write_catalog(tmp_path_factory.mktemp("re") / "catalog", CATALOG)
    return RegexStage(load_catalog(root))


@pytest.mark.parametrize(
    ("masked", "locale", "intent", "rule", "slots"),
    [
        ("play the radio", "en", "music.play_radio", "radio", {}),  # higher priority wins over file order
        ("play some jazz", "en", "music.play", "generic", {"query": "some jazz"}),
        ("таймер на {duration}", "ru", "timer.start", "ru", {}),
        ("таймер на {duration}", "en", None, None, {}),  # a ru rule never fires for en
        ("timer for {duration}", "en", "timer.start", "en", {}),
        ("same", "en", "first.same_priority", "first", {}),  # equal priority: catalog order
        ("nothing here", "en", None, None, {}),
    ],
)
def test_rules(  # noqa: PLR0917 - one parameter per column of the table above
    stage: RegexStage, masked: str, locale: str, intent: str | None, rule: str | None, slots: dict[str, str]
) -> None:
    d = stage.decide(Canonical(text=masked, normalized=masked, masked=masked, locale=locale))
    assert d.intent == intent
    assert d.via == "regex"
    if intent is None:
        assert d.outcome is Outcome.ABSTAIN and d.reason == "no_rule_matched"
    else:
        assert d.outcome is Outcome.ACCEPT and d.confidence == 1.0
        assert d.evidence["rule"] == rule
        assert d.slots == slots


def test_bad_pattern_names_file_and_key(tmp_path: Path) -> None:
    bad = {"owner": {"type": "skill", "id": "t"}, "intents": [_intent("a.b", [{"pattern": "(unclosed"}])]}
    root = write_catalog(tmp_path / "c", bad)
    with pytest.raises(ValueError, match=r"mini\.yaml: \$\.intents\[0\]\.regex\[0\]\.pattern"):
        load_catalog(root)
