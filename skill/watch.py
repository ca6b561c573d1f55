"""Hot reload: watch the model roots for pointer changes and swap the pipeline in the background."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from pathlib import Path

import watchfiles

from .registry import POINTER_NAME
from .service import ServiceState

_LOGGER = logging.getLogger(__name__)


def _is_pointer(_: watchfiles.Change, path: str) -> bool:
    return Path(path).name == POINTER_NAME


async def watch_pointer(state: ServiceState, executor: Executor, stop: asyncio.Event) -> None:
    """Reload whenever an ``active.json`` under a model root is replaced (``os.replace`` = add/modify)."""
    roots = []
    for root in state.config.model_roots():
        try:
            root.mkdir(parents=True, exist_ok=True)
            roots.append(root)
        except OSError as exc:
            _LOGGER.warning("cannot watch %s: %s", root, exc)
    if not roots:
        return
    loop = asyncio.get_running_loop()
    _LOGGER.info("watching %s for model pointer changes", ", ".join(map(str, roots)))
    async for _changes in watchfiles.awatch(
        *roots, watch_filter=_is_pointer, stop_event=stop, recursive=False, debounce=200, step=20
    ):
        event = await loop.run_in_executor(executor, state.load, "pointer")
        if event.ok:
            _LOGGER.info("pointer change: serving %s", event.model_id)
        else:
            _LOGGER.error("pointer change refused: %s (serving %s)", event.error, event.model_id)
