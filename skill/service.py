"""Service state: builds pipelines from config and the active model, swaps them atomically on reload."""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from . import SERVICE_NAME, __version__, memory
from .canonicalize import Canonicalizer
from .catalog import Catalog, load_catalog
from .config import Config
from .gate import GateConfig
from .pipeline import FallbackStage, ModelStage, Pipeline
from .regex_stage import RegexStage
from .registry import resolve_model_dir

_LOGGER = logging.getLogger(__name__)


class StageStatus(msgspec.Struct):
    """Whether a stage is serving, and why not."""

    ready: bool
    detail: str = ""


class ReloadEvent(msgspec.Struct, frozen=True):
    """One attempt to load a model version (kept for /health and metrics)."""

    ts: str
    ok: bool
    model_id: str | None
    error: str | None = None
    trigger: str = "start"


_ROWS_BY_DIGEST: dict[str, list[Any]] = {}  # catalog digest -> its index rows (read-only once built)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def load_ranker(model_dir: Path, threads: int) -> ModelStage:
    """Load and verify a ranker; imported lazily so a regex-only service needs no ML runtime."""
    from .ranker import Ranker  # noqa: PLC0415 - optional heavy dependency

    return Ranker.load(model_dir, threads=threads)


def load_llm(config: Config, catalog: Catalog) -> FallbackStage:
    """Load the llama.cpp fallback for the configured GGUF file."""
    from .llm import LlmStage  # noqa: PLC0415 - optional heavy dependency

    return LlmStage.load(config, catalog)


class ServiceState:
    """Owns the current pipeline; readers take a reference, reloads replace it whole."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pipeline: Pipeline | None = None
        self.stages: dict[str, StageStatus] = {
            "canonicalize": StageStatus(False, "loading"),
            "regex": StageStatus(False, "loading"),
            "neural": StageStatus(False, "loading"),
            "llm": StageStatus(False, "not configured"),
        }
        self.reloads: list[ReloadEvent] = []
        self._rows_cache: tuple[str, list[Any]] | None = None
        self.refusals: list[ReloadEvent] = []
        self.started = time.monotonic()
        self.load_error: str | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """True once a pipeline serves (possibly without a model)."""
        return self.pipeline is not None

    def _gate_config(self, ranker: ModelStage | None) -> GateConfig:
        model = ranker.thresholds if ranker is not None else {}
        cfg = self.config
        return GateConfig(
            accept=cfg.accept_confidence if cfg.accept_confidence is not None else model.get("accept", 0.80),
            reject=cfg.reject_confidence if cfg.reject_confidence is not None else model.get("reject", 0.45),
            margin=cfg.margin if cfg.margin is not None else model.get("margin", 0.10),
        )

    def load(self, trigger: str = "start") -> ReloadEvent:
        """Build a new pipeline and swap it in; on any failure keep the old one serving."""
        with self._lock:
            try:
                event = self._load(trigger)
            except Exception as exc:
                if self.pipeline is None:
                    raise
                event = self._refuse(trigger, f"{type(exc).__name__}: {exc}")
            if self.config.memory_trim:
                # The old pipeline is unreferenced now (requests still using it keep it until they
                # end; the next trim gets those), and at start the loading's temporaries (the
                # catalog's YAML, the embedding batches of its examples) are garbage. Collect
                # cycles, then hand free pages back.
                gc.collect()
                memory.trim()
            return event

    def _refuse(self, trigger: str, error: str) -> ReloadEvent:
        old = self.pipeline
        event = ReloadEvent(_now(), False, old.model_id if old else None, error, trigger)
        _LOGGER.error("reload refused (%s); still serving %s", error, event.model_id)
        self.reloads.append(event)
        self.refusals.append(event)
        del self.reloads[:-20], self.refusals[:-20]
        self.load_error = error
        return event

    def _catalog_rows(self, catalog: Catalog, canonicalizer: Canonicalizer) -> list[Any]:
        """The catalog's examples as index rows (cached per catalog digest: a pointer flip reuses them)."""
        from .ranker import catalog_example_rows  # noqa: PLC0415 - the ML runtime loads with the ranker

        if self._rows_cache is None or self._rows_cache[0] != catalog.digest:
            rows = _ROWS_BY_DIGEST.get(catalog.digest)
            if rows is None:
                # Canonicalizing ~10k catalog texts takes about a second: once per catalog per process
                # (a service rebuilt in the same process, as tests and reloads do, reuses the rows).
                rows = catalog_example_rows(catalog, canonicalizer)
                _ROWS_BY_DIGEST.clear()
                _ROWS_BY_DIGEST[catalog.digest] = rows
            self._rows_cache = (catalog.digest, rows)
        return self._rows_cache[1]

    def _load(self, trigger: str) -> ReloadEvent:
        cfg = self.config
        old = self.pipeline
        model_dir = resolve_model_dir(cfg.model_roots(), cfg.model_id)
        if (
            trigger == "pointer"
            and old is not None
            and model_dir is not None
            and old.model_id == model_dir.name
        ):
            return ReloadEvent(_now(), True, old.model_id, None, trigger)  # nothing changed for us
        if trigger == "pointer" and old is not None and old.regex is not None:
            # A pointer flip changes the model only: keep the catalog and its indexes.
            catalog, canonicalizer, regex = old.catalog, old.canonicalizer, old.regex
        else:
            catalog = load_catalog(cfg.catalog_dir)
            canonicalizer = Canonicalizer(catalog)
            regex = RegexStage(catalog)
        ranker: ModelStage | None = None
        error: str | None = None
        if model_dir is None:
            error = f"model {cfg.model_id!r} not found" if cfg.model_id else "no active model pointer"
        else:
            try:
                ranker = load_ranker(model_dir, cfg.onnx_threads)
                add = getattr(ranker, "add_examples", None)
                if cfg.catalog_examples and add is not None:
                    add(self._catalog_rows(catalog, canonicalizer))
            except Exception as exc:  # noqa: BLE001 - any load failure is reported, never fatal
                ranker = None
                error = f"{type(exc).__name__}: {exc}"
        if ranker is None and old is not None and old.ranker is not None:
            return self._refuse(trigger, error or "model not loaded")
        # The LLM's grammar and prompt are built from the catalog: reuse it only for the same catalog.
        llm = old.llm if old is not None and old.catalog.digest == catalog.digest else None
        if llm is None and cfg.llm_model:
            try:
                llm = load_llm(cfg, catalog)
                self.stages["llm"] = StageStatus(True, getattr(llm, "summary", Path(cfg.llm_model).name))
            except Exception as exc:  # noqa: BLE001 - the LLM stage is optional
                self.stages["llm"] = StageStatus(False, f"disabled: {type(exc).__name__}: {exc}")
                _LOGGER.warning("LLM fallback disabled: %s", exc)
        pipeline = Pipeline(
            catalog,
            canonicalizer,
            regex=regex,
            ranker=ranker,
            llm=llm,
            gate_config=self._gate_config(ranker),
        )
        self.pipeline = pipeline  # the swap: one reference assignment
        self.stages["canonicalize"] = StageStatus(
            True, f"{sum(len(v) for v in catalog.entities.values())} entities"
        )
        self.stages["regex"] = StageStatus(True, f"{len(regex.rules)} rules")
        self.stages["neural"] = StageStatus(ranker is not None, ranker.model_id if ranker else (error or ""))
        self.load_error = error
        event = ReloadEvent(_now(), ranker is not None, pipeline.model_id, error, trigger)
        if old is not None:
            _LOGGER.info("swapped model %s -> %s (%s)", old.model_id, pipeline.model_id, trigger)
        self.reloads.append(event)
        del self.reloads[:-20]
        return event

    def health(self) -> dict[str, Any]:
        """The /health body: the contract's fields plus stage and reload detail."""
        pipe = self.pipeline
        ranker = pipe.ranker if pipe is not None else None
        info: dict[str, Any] = {}
        if ranker is not None and hasattr(ranker, "info"):
            info = ranker.info()
        body: dict[str, Any] = {
            "ok": pipe is not None,
            "status": "loading" if pipe is None else ("ready" if ranker is not None else "degraded"),
            "service": SERVICE_NAME,
            "version": __version__,
            "model_loaded": ranker is not None,
            "model_id": pipe.model_id if pipe is not None else None,
            "template_backend_ready": self.stages["regex"].ready,
            "examples_total": info.get("examples_total", 0),
            "negatives_total": info.get("negatives_total", 0),
            "index_backend": info.get("index_backend"),
            "model": info,
            "stages": {k: msgspec.to_builtins(v) for k, v in self.stages.items()},
            "thresholds": msgspec.to_builtins(pipe.gate_config) if pipe is not None else None,
            "catalog": {
                "intents": len(pipe.catalog.intents) if pipe is not None else 0,
                "digest": pipe.catalog.digest[:12] if pipe is not None else None,
                "markup": pipe.catalog.markup_counts() if pipe is not None else None,
            },
            "last_reload": msgspec.to_builtins(self.reloads[-1]) if self.reloads else None,
            "last_refusal": msgspec.to_builtins(self.refusals[-1]) if self.refusals else None,
            "reloads_total": len([e for e in self.reloads if e.ok]),
            "refusals_total": len(self.refusals),
            "load_error": self.load_error,
            "uptime_s": round(time.monotonic() - self.started, 1),
        }
        return body
