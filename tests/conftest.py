"""Shared fixtures: a small catalog built in tmp_path, configs and a served app on loopback."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from skill.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent

MINI_INTENTS: dict[str, Any] = {
    "schema_version": 1,
    "owner": {"type": "skill", "id": "mini"},
    "intents": [
        {
            "intent": "alarm.set",
            "description": {"ru": "Поставить будильник", "en": "Set an alarm"},
            "slots": {"time": {"source": "time", "required": True}},
            "examples": {
                "ru": ["поставь будильник на 7:30", "разбуди меня в 6 утра", "заведи будильник на восемь"],
                "en": ["set an alarm for 7:30", "wake me up at 6 am", "alarm at eight please"],
            },
            "regex": [
                {
                    "id": "alarm_ru",
                    "locale": "ru",
                    "priority": 50,
                    "pattern": r"^(?:поставь|заведи) будильник на \{time\}$",
                },
                {
                    "id": "alarm_en",
                    "locale": "en",
                    "priority": 50,
                    "pattern": r"^set an alarm (?:for|at) \{time\}$",
                },
            ],
        },
        {
            "intent": "device.turn_off",
            "description": {"ru": "Выключить устройство", "en": "Turn a device off"},
            "slots": {"device": {"source": "device", "value": "ref", "required": True}},
            "examples": {
                "ru": ["выключи свет на кухне", "выруби телевизор"],
                "en": ["turn off the kitchen light"],
            },
            "regex": [
                {
                    "id": "off_en",
                    "locale": "en",
                    "priority": 50,
                    "pattern": r"^turn off (?:the )?\{device\}$",
                },
                {
                    "id": "off_ru",
                    "locale": "ru",
                    "priority": 50,
                    "pattern": r"^(?:выключи|выруби) \{device\}$",
                },
            ],
        },
        {
            "intent": "desktop.reset_webspace",
            "description": {"ru": "Сбросить рабочий стол", "en": "Reset the desktop"},
            "risky": True,
            "thresholds": {"accept": 0.9},
            "examples": {"ru": ["сбрось рабочий стол"], "en": ["reset the desktop"]},
        },
    ],
}


def write_catalog(root: Path, intents: dict[str, Any] | None = None) -> Path:
    """A catalog folder with the repo's entities and masking rules and the given intents."""
    (root / "intents").mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "catalog" / "entities", root / "entities", dirs_exist_ok=True)
    if (REPO / "catalog" / "masking.yaml").exists():
        shutil.copy(REPO / "catalog" / "masking.yaml", root / "masking.yaml")
    (root / "intents" / "mini.yaml").write_text(
        yaml.safe_dump(intents or MINI_INTENTS, allow_unicode=True), encoding="utf-8"
    )
    return root


@pytest.fixture(autouse=True, scope="session")
def _isolated_platform_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test writes into the home directory: platformdirs (and child processes) use a temp dir.

    Session-scoped so that module-scoped fixtures, which start services early, see it too.
    """
    home = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
            mp.setenv(var, str(home / var.lower()))
        yield


@pytest.fixture
def mini_catalog(tmp_path: Path) -> Path:
    """A small valid catalog in tmp_path."""
    return write_catalog(tmp_path / "catalog")


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Config isolated from the environment: empty model roots unless given."""

    def _make(**overrides: Any) -> Config:
        overrides.setdefault("models_dir", str(tmp_path / "node-models"))
        overrides.setdefault("embedded_models_dir", str(tmp_path / "no-embedded-models"))
        overrides.setdefault("audit_dir", str(tmp_path / "logs"))
        return load_config(env={}, overrides=overrides)

    return _make
