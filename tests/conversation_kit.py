"""A small catalog and registry of our own, and a scripted ranker, for the conversation tests.

The catalog is written into tmp_path (intents, entities, the repo's masking rules), so the tests do
not depend on what the repo catalog says today. The scripted ranker is a real pipeline stage with a
fixed table (masked text → candidates): the tests choose exact confidences, so close calls, small
margins and abstentions happen where the test wants them, and the gates of the real pipeline decide.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from skill.canonicalize import Canonical, Canonicalizer
from skill.catalog import load_catalog
from skill.config import Config
from skill.decision import Candidate, Decision, Outcome
from skill.gate import GateConfig
from skill.pipeline import Pipeline
from skill.regex_stage import RegexStage
from skill.service import ServiceState

REPO = Path(__file__).resolve().parent.parent


def _rule(rid: str, locale: str, pattern: str) -> dict[str, Any]:
    return {"id": rid, "locale": locale, "priority": 50, "pattern": pattern}


INTENTS: dict[str, Any] = {
    "schema_version": 1,
    "owner": {"type": "skill", "id": "conv"},
    "intents": [
        {
            "intent": "alarm.set",
            "description": {"ru": "Будильник", "en": "Set an alarm"},
            "slots": {"time": {"source": "time", "required": True}},
            "cancel_intent": "alarm.cancel",
            "examples": {"ru": ["поставь будильник на 7:30"], "en": ["set an alarm for 7:30"]},
            "regex": [
                _rule("alarm_ru", "ru", r"^(?:поставь|заведи) будильник на \{time\}$"),
                _rule("alarm_en", "en", r"^set an alarm for \{time\}$"),
            ],
        },
        {
            "intent": "alarm.cancel",
            "description": {"ru": "Отменить будильник", "en": "Cancel an alarm"},
            "slots": {"time": {"source": "time"}},
            "examples": {
                "ru": ["отмени будильник", "удали будильник на 7:30"],
                "en": ["cancel the alarm", "cancel the alarm for 7:30"],
            },
            "regex": [
                _rule("alarm_cancel_ru", "ru", r"^(?:отмени|удали) будильник(?: на \{time\})?$"),
                _rule("alarm_cancel_en", "en", r"^cancel the alarm(?: for \{time\})?$"),
            ],
        },
        {
            "intent": "voice.timer.start",
            "description": {"ru": "Таймер", "en": "Start a timer"},
            # At most a day: "а на 30 часов?" completes to a request the gate does not accept.
            "slots": {
                "duration": {"source": "duration", "required": True, "range": {"min": 1, "max": 86400}}
            },
            "examples": {"ru": ["поставь таймер на 10 минут"], "en": ["set a timer for 10 minutes"]},
            "regex": [
                _rule("timer_ru", "ru", r"^поставь таймер на \{duration\}$"),
                _rule("timer_en", "en", r"^set a timer for \{duration\}$"),
            ],
        },
        {
            "intent": "voice.timer.cancel",  # no declaration: found by the <domain>.cancel convention
            "description": {"ru": "Отменить таймер", "en": "Cancel the timer"},
            "slots": {"duration": {"source": "duration"}},
            "examples": {
                "ru": ["отмени таймер", "отмени таймер на 10 минут"],
                "en": ["cancel the timer", "cancel the timer for 10 minutes"],
            },
            "regex": [
                _rule("timer_cancel_ru", "ru", r"^отмени таймер(?: на \{duration\})?$"),
                _rule("timer_cancel_en", "en", r"^cancel the timer(?: for \{duration\})?$"),
            ],
        },
        {
            "intent": "device.turn_on",
            "description": {"ru": "Включить", "en": "Turn on"},
            "slots": {"device": {"source": "device", "value": "ref", "required": True}},
            "cancel_intent": "device.turn_off",
            "examples": {"ru": ["включи свет на кухне"], "en": ["turn on the kitchen light"]},
            "regex": [
                _rule("on_ru", "ru", r"^включи \{device\}$"),
                _rule("on_en", "en", r"^turn on the \{device\}$"),
            ],
        },
        {
            "intent": "device.turn_off",
            "description": {"ru": "Выключить", "en": "Turn off"},
            "slots": {"device": {"source": "device", "value": "ref", "required": True}},
            "examples": {"ru": ["выключи свет на кухне"], "en": ["turn off the kitchen light"]},
            "regex": [
                _rule("off_ru", "ru", r"^выключи \{device\}$"),
                _rule("off_en", "en", r"^turn off the \{device\}$"),
            ],
        },
        {
            "intent": "music.play",
            "description": {"ru": "Музыка", "en": "Play music"},
            "examples": {"ru": ["включи музыку"], "en": ["play some music"]},
            "regex": [
                _rule("music_ru", "ru", r"^включи музыку$"),
                _rule("music_en", "en", r"^play some music$"),
            ],
        },
        {
            "intent": "light.dim",  # its rules are not anchored at the end: they match a prefix
            "description": {"ru": "Приглушить свет", "en": "Dim a light"},
            "slots": {"device": {"source": "device", "value": "ref", "required": True}},
            "examples": {"ru": ["приглуши свет на кухне"], "en": ["dim the kitchen light"]},
            "regex": [
                _rule("dim_ru", "ru", r"^приглуши \{device\}"),
                _rule("dim_en", "en", r"^dim the \{device\}"),
            ],
        },
        {
            "intent": "weather.get",
            "description": {"ru": "Погода", "en": "Weather"},
            "examples": {"ru": ["какая погода"], "en": ["what is the weather"]},
        },
    ],
}

ENTITIES: dict[str, Any] = {
    "schema_version": 1,
    "kinds": {
        "room": [
            {"ref": "room:kitchen", "aliases": {"ru": ["кухня"], "en": ["kitchen"]}},
            {"ref": "room:bedroom", "aliases": {"ru": ["спальня"], "en": ["bedroom"]}},
            {"ref": "room:living_room", "aliases": {"ru": ["гостиная"], "en": ["living room"]}},
        ],
        "device.light": [
            {
                "ref": "device:light:kitchen_ceiling",
                "room": "kitchen",
                "aliases": {"ru": ["свет на кухне", "кухонный свет"], "en": ["kitchen light"]},
            },
            {
                "ref": "device:light:bedroom_lamp",
                "room": "bedroom",
                "aliases": {"ru": ["свет в спальне", "ночник"], "en": ["bedroom light", "bedside lamp"]},
            },
            {
                "ref": "device:light:living_floor_lamp",
                "room": "living_room",
                "aliases": {"ru": ["торшер"], "en": ["floor lamp"]},
            },
            {
                "ref": "device:light:living_chandelier",
                "room": "living_room",
                "aliases": {"ru": ["люстра"], "en": ["chandelier"]},
            },
        ],
        "device.plug": [
            {"ref": "device:plug:kettle", "room": "kitchen", "aliases": {"ru": ["чайник"], "en": ["kettle"]}},
        ],
    },
}

# Masked text → (intent, confidence) candidates of the scripted ranker; anything else is out of scope.
SCRIPT: dict[str, list[tuple[str, float]]] = {
    # Close between two domains: «поставь на семь» — an alarm or a timer?
    "поставь на {time}": [("alarm.set", 0.46), ("voice.timer.start", 0.40)],
    "set it for {time}": [("alarm.set", 0.46), ("voice.timer.start", 0.40)],
    # Close inside one domain: set or cancel?
    "что то с будильником на {time}": [("alarm.set", 0.45), ("alarm.cancel", 0.42)],
    # Replies to the questions above.
    "будильник": [("alarm.cancel", 0.50), ("alarm.set", 0.44)],
    "the alarm": [("alarm.cancel", 0.50), ("alarm.set", 0.44)],
    "отменить": [("voice.timer.cancel", 0.60), ("alarm.cancel", 0.20)],
    # A request-like utterance the service is not sure of (abstains at 0.6).
    "узнай погоду на даче": [("weather.get", 0.60)],
    "check the weather at the cottage": [("weather.get", 0.60)],
    # The same two requests as one utterance: the ranker is less sure of the whole.
    "выключи {device} и узнай погоду на даче": [("device.turn_off", 0.50), ("weather.get", 0.30)],
    "turn off the {device} and check the weather at the cottage": [
        ("device.turn_off", 0.50),
        ("weather.get", 0.30),
    ],
    # A bare room means something on its own too; after a request it is that request's ellipsis.
    "в {room}": [("weather.get", 0.90)],
    # A single request with "and" inside, confidently one intent: never split.
    "play simon and garfunkel": [("music.play", 0.95)],
    # Two requests the ranker wrongly takes as one confident intent (0.9): the split (1.0, 1.0) wins.
    "выключи {device} и поставь будильник на {time}": [("alarm.set", 0.90)],
}


class ScriptedRanker:
    """A neural-stage stand-in: proposals from :data:`SCRIPT`, gated by the real pipeline."""

    model_id = "scripted-test-ranker"

    def __init__(self, script: dict[str, list[tuple[str, float]]] | None = None) -> None:
        self.script = SCRIPT if script is None else script
        self.calls: list[str] = []

    @property
    def thresholds(self) -> dict[str, float]:
        return {"accept": 0.80, "reject": 0.45, "margin": 0.10}

    def decide(self, canonical: Canonical) -> Decision:
        self.calls.append(canonical.masked)
        cands = self.script.get(canonical.masked)
        if not cands:
            return Decision(None, 0.05, Outcome.REJECT, "neural", reason="out_of_scope")
        (top, conf), rest = cands[0], cands[1:]
        return Decision(
            top,
            conf,
            Outcome.ACCEPT,
            "neural",
            alternatives=tuple(Candidate(i, c) for i, c in rest),
            evidence={"scripted": True},
        )


def write_conv_catalog(root: Path) -> Path:
    """Our intents and registry, and the repo's masking rules (time, duration, number words)."""
    (root / "intents").mkdir(parents=True, exist_ok=True)
    (root / "entities").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "catalog" / "masking.yaml", root / "masking.yaml")
    (root / "intents" / "conv.yaml").write_text(yaml.safe_dump(INTENTS, allow_unicode=True), encoding="utf-8")
    (root / "entities" / "home.yaml").write_text(
        yaml.safe_dump(ENTITIES, allow_unicode=True), encoding="utf-8"
    )
    return root


def scripted_pipeline(catalog_dir: Path, ranker: ScriptedRanker | None = None) -> Pipeline:
    """The real pipeline over our catalog, the scripted ranker as its neural stage."""
    catalog = load_catalog(catalog_dir)
    ranker = ranker or ScriptedRanker()
    return Pipeline(
        catalog,
        Canonicalizer(catalog),
        regex=RegexStage(catalog),
        ranker=ranker,
        gate_config=GateConfig(**ranker.thresholds),
    )


def scripted_state(config: Config, ranker: ScriptedRanker | None = None) -> ServiceState:
    """A service state that serves the scripted pipeline (already loaded: the app does not reload it)."""
    state = ServiceState(config)
    state.pipeline = scripted_pipeline(Path(config.catalog_dir), ranker)
    return state
