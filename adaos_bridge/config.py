"""The bridge's one frozen config: defaults ← environment (the hub's ADAOS_NLU_* variables) ← flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import platformdirs

SERVICE_NAME = "adaos-neural-nlu"


class ConfigError(ValueError):
    """A setting is wrong; the message names the variable or flag."""


class BridgeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every setting of the bridge. Thresholds and the timeout default to the hub's own values."""

    service_url: str = "http://127.0.0.1:18091"
    timeout_s: float = 6.0  # whole call budget: queueing for a slot, retries and the answer
    accept_confidence: float = 0.80
    reject_confidence: float = 0.45
    rasa_fallback: bool = True  # False: misses go straight to nlp.intent.not_obtained
    standalone: bool = False  # also take nlp.intent.detect.request (no hub pipeline in front)
    source: str = "nlu.neural"
    max_concurrency: int = 2
    retries: int = 2  # extra attempts, connection errors only
    retry_base_s: float = 0.05
    breaker_failures: int = 5
    breaker_reset_s: float = 5.0
    dedup_window_s: float = 60.0
    state_dir: str = ""  # "" → $ADAOS_STATE_DIR/nlu/bridge or the platform data dir
    queue_max: int = 10_000
    queue_sync: Literal["full", "normal"] = "full"
    teacher_url: str | None = None
    teacher_token: str | None = None
    teacher_stream: str | None = None  # JetStream stream (with nats_url) instead of HTTP
    teacher_subject: str = "nlu.teacher.miss"
    examples_stream: str | None = None  # JetStream stream holding nlp.teacher.example.save (with nats_url)
    instance_id: str = ""  # names this bridge's durable consumer; "" → host name + state dir
    delivery_batch: int = 32
    delivery_backoff_s: float = 0.5
    delivery_backoff_max_s: float = 60.0
    redact_digits: bool = False
    redact_names: bool = False
    catalog_dir: str | None = None  # registry names to redact (catalog/entities/*.yaml)
    overlay_path: str = ""  # "" → <state_dir>/teacher_catalog/intents/teacher.yaml
    marker_path: str = ""  # "" → <state_dir>/retrain_candidate.json
    stats_path: str = ""  # "" → <state_dir>/neural_usage.json
    stats_flush_s: float = 1.0
    nats_url: str | None = None
    nats_queue_group: str = "adaos-nlu-neural"
    hub_url: str | None = None  # --bus http: the hub's base URL
    hub_token: str | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 18093
    log_level: str = "INFO"

    def state_path(self) -> Path:
        """The folder for the queue, statistics, overlay and marker."""
        return Path(self.state_dir)

    def resolved_overlay(self) -> Path:
        """Where teacher-accepted examples are written."""
        return (
            Path(self.overlay_path)
            if self.overlay_path
            else (self.state_path() / "teacher_catalog" / "intents" / "teacher.yaml")
        )

    def resolved_marker(self) -> Path:
        """The retraining-candidate marker."""
        return Path(self.marker_path) if self.marker_path else self.state_path() / "retrain_candidate.json"

    def resolved_stats(self) -> Path:
        """The usage statistics file."""
        return Path(self.stats_path) if self.stats_path else self.state_path() / "neural_usage.json"

    def queue_db(self) -> Path:
        """The SQLite file of the teacher queue."""
        return self.state_path() / "teacher_queue.sqlite3"


# Variables the hub already uses (same names, same defaults) and the bridge's own (NLU_BRIDGE_*).
_ENV: dict[str, str] = {
    "ADAOS_NLU_NEURAL_TIMEOUT_S": "timeout_s",
    "ADAOS_NLU_NEURAL_MIN_CONFIDENCE": "accept_confidence",  # the hub's older name
    "ADAOS_NLU_NEURAL_ACCEPT_CONFIDENCE": "accept_confidence",
    "ADAOS_NLU_NEURAL_REJECT_CONFIDENCE": "reject_confidence",
    "ADAOS_NLU_RASA": "rasa_fallback",
    "NLU_BRIDGE_SERVICE_URL": "service_url",
    "NLU_BRIDGE_STATE_DIR": "state_dir",
    "NLU_BRIDGE_TEACHER_URL": "teacher_url",
    "NLU_BRIDGE_TEACHER_TOKEN": "teacher_token",
    "NLU_BRIDGE_TEACHER_STREAM": "teacher_stream",
    "NLU_BRIDGE_EXAMPLES_STREAM": "examples_stream",
    "NLU_BRIDGE_NATS_URL": "nats_url",
    "NLU_BRIDGE_HUB_URL": "hub_url",
    "ADAOS_TOKEN": "hub_token",
    "NLU_BRIDGE_HUB_TOKEN": "hub_token",
    "NLU_BRIDGE_OVERLAY_PATH": "overlay_path",
    "NLU_CATALOG_DIR": "catalog_dir",
}
_FALSE = {"0", "false", "no", "off"}


def default_state_dir(env: Mapping[str, str]) -> str:
    """AdaOS's state dir when run by AdaOS, the platform data dir otherwise."""
    if env.get("ADAOS_STATE_DIR"):
        return str(Path(env["ADAOS_STATE_DIR"]) / "nlu" / "bridge")
    return str(Path(platformdirs.user_data_dir(SERVICE_NAME)) / "bridge")


def load_bridge_config(
    *, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> BridgeConfig:
    """Defaults ← environment ← overrides (None values are ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for var, field in _ENV.items():
        raw = env.get(var, "")
        if raw == "":
            continue
        values[field] = raw.strip().lower() not in _FALSE if field == "rasa_fallback" else raw
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if not values.get("state_dir"):
        values["state_dir"] = default_state_dir(env)
    try:
        cfg = msgspec.convert(values, BridgeConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}") from exc
    for name in ("accept_confidence", "reject_confidence"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"{name} must be within [0, 1], got {getattr(cfg, name)}")
    if cfg.reject_confidence > cfg.accept_confidence:
        raise ConfigError("reject_confidence must not exceed accept_confidence")
    if cfg.timeout_s <= 0 or cfg.max_concurrency < 1 or cfg.queue_max < 1:
        raise ConfigError("timeout_s, max_concurrency and queue_max must be positive")
    return cfg
