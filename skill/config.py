"""One frozen config, built once at start-up from defaults, an optional file, the environment and flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import platformdirs
import yaml

from . import SERVICE_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 18091


class ConfigError(ValueError):
    """A config file or variable is wrong; the message names the source and key."""


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every setting of the service; thresholds left as None come from the active model."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    catalog_dir: str = str(REPO_ROOT / "catalog")
    models_dir: str = ""  # the node's artifact root; "" = derived from ADAOS_* or platform dirs
    embedded_models_dir: str = str(REPO_ROOT / "models")
    model_id: str | None = None  # pins a version; wins over the pointer
    accept_confidence: float | None = None
    reject_confidence: float | None = None
    margin: float | None = None
    max_body_bytes: int = 64 * 1024
    max_text_chars: int = 1000
    onnx_threads: int = 1
    workers: int = 4
    llm_model: str | None = None
    llm_budget_ms: int = 1500
    llm_queue: int = 4
    llm_threads: int = 1  # more threads than free cores makes llama.cpp far slower, not faster
    watch_pointer: bool = True
    log_level: str = "INFO"
    api_token: str | None = (
        None  # when set, /parse, /reindex and /metrics need "Authorization: Bearer <token>"
    )
    audit_enabled: bool = True  # the decision audit log (JSON lines, rotated by size)
    audit_dir: str = ""  # "" = derived from ADAOS_LOGS_DIR or the platform log dir
    audit_text: Literal["text", "hash", "none"] = "text"  # what the log keeps of the input (privacy)
    audit_max_bytes: int = 10 * 1024 * 1024
    audit_backups: int = 5
    audit_queue: int = 10_000  # records waiting for the writer thread; beyond it they are dropped
    recent_decisions: int = 50  # kept in memory for the status page
    malloc_arena_max: int = 2  # glibc malloc arenas, set at start (0 = glibc's default, 8 per core)
    memory_trim: bool = True  # give freed heap back to the OS after each model swap (glibc)
    catalog_examples: bool = True  # add catalog examples the model's kNN index lacks (no retraining)
    session_ttl_s: float = 90.0  # how long a conversation's frames (and their text) are kept; 0 = no context
    session_max: int = 10_000  # conversation scopes kept at most (least recently used dropped first)
    session_frames: int = 4  # accepted frames kept per scope
    segment_max_cuts: int = 4  # split points tried per utterance (2^n splits, memoized parts)

    def model_roots(self) -> list[Path]:
        """Where model versions are looked up, in order: the node's root, then the embedded one."""
        roots = [Path(self.models_dir)] if self.models_dir else []
        embedded = Path(self.embedded_models_dir)
        if embedded not in roots:
            roots.append(embedded)
        return roots


# Environment variables AdaOS (or an operator) sets, mapped to config fields.
_ENV: dict[str, str] = {
    "ADAOS_SERVICE_HOST": "host",
    "ADAOS_SERVICE_PORT": "port",
    "ADAOS_NEURAL_ARTIFACT_ROOT": "models_dir",
    "ADAOS_NLU_NEURAL_MODEL_ID": "model_id",
    "ADAOS_NLU_NEURAL_ACCEPT_CONFIDENCE": "accept_confidence",
    "ADAOS_NLU_NEURAL_REJECT_CONFIDENCE": "reject_confidence",
    "NLU_CATALOG_DIR": "catalog_dir",
    "NLU_LLM_MODEL": "llm_model",
    "NLU_ONNX_THREADS": "onnx_threads",
    "NLU_API_TOKEN": "api_token",
    "ADAOS_LOGS_DIR": "audit_dir",
    "NLU_AUDIT_ENABLED": "audit_enabled",
    "NLU_AUDIT_TEXT": "audit_text",
    "NLU_MALLOC_ARENA_MAX": "malloc_arena_max",
    "NLU_MEMORY_TRIM": "memory_trim",
    "NLU_CATALOG_EXAMPLES": "catalog_examples",
    "NLU_SESSION_TTL_S": "session_ttl_s",
}


def default_models_dir(env: Mapping[str, str]) -> str:
    """AdaOS's artifact root when run by AdaOS, the platform data dir otherwise."""
    if env.get("ADAOS_STATE_DIR"):
        return str(Path(env["ADAOS_STATE_DIR"]) / "nlu" / "neural")
    return str(Path(platformdirs.user_data_dir(SERVICE_NAME)) / "models")


def default_logs_dir() -> str:
    """The platform log dir, used when AdaOS gives no ``ADAOS_LOGS_DIR``."""
    return platformdirs.user_log_dir(SERVICE_NAME)


def _from_file(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config must be a mapping")
    unknown = sorted(set(raw) - set(Config.__struct_fields__))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}")
    return raw


def load_config(
    *,
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults ← file ← environment ← command-line overrides (None values are ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if file:
        values.update(_from_file(Path(file)))
    for var, field in _ENV.items():
        if env.get(var, "") != "":
            values[field] = env[var]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if not values.get("models_dir"):
        values["models_dir"] = default_models_dir(env)
    if not values.get("audit_dir"):
        values["audit_dir"] = default_logs_dir()
    try:
        cfg = msgspec.convert(values, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}") from exc
    for name in ("accept_confidence", "reject_confidence", "margin"):
        val = getattr(cfg, name)
        if val is not None and not 0.0 <= val <= 1.0:
            raise ConfigError(f"{name} must be within [0, 1], got {val}")
    if cfg.audit_max_bytes < 1024 or cfg.audit_backups < 1 or cfg.audit_queue < 1:
        raise ConfigError("audit_max_bytes must be >= 1024, audit_backups and audit_queue >= 1")
    if cfg.session_ttl_s < 0 or cfg.session_max < 1 or cfg.session_frames < 1 or cfg.segment_max_cuts < 0:
        raise ConfigError(
            "session_ttl_s must be >= 0, session_max and session_frames >= 1, segment_max_cuts >= 0"
        )
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"port out of range: {cfg.port}")
    return cfg
