"""``python -m skill``: parse arguments, configure logging, load the model, serve until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from . import memory
from .app import create_app
from .config import ConfigError, load_config
from .security import is_loopback
from .service import ServiceState

_LOGGER = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; each overrides the config file and the environment."""
    parser = argparse.ArgumentParser(prog="python -m skill", description=__doc__)
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 18091)")
    parser.add_argument("--config", help="YAML/JSON config file")
    parser.add_argument("--models-dir", help="the node's model artifact root")
    parser.add_argument("--catalog-dir", help="catalog directory")
    parser.add_argument("--model-id", help="pin a model version")
    parser.add_argument("--llm-model", help="GGUF file for the local LLM fallback")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING...")
    return parser.parse_args(argv)


async def serve(state: ServiceState) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight requests and exit."""
    cfg = state.config
    if not cfg.api_token and not is_loopback(cfg.host if cfg.host != "localhost" else "127.0.0.1"):
        _LOGGER.warning(
            "bound to %s without NLU_API_TOKEN: /parse and /metrics are open to the network "
            "(/reindex stays loopback-only)",
            cfg.host,
        )
    app = create_app(state)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, state.config.host, state.config.port, shutdown_timeout=10.0)
    await site.start()
    _LOGGER.info("listening on http://%s:%s", state.config.host, state.config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _LOGGER.info("stopping: draining in-flight requests")
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    try:
        config = load_config(
            file=args.config,
            overrides={
                "host": args.host,
                "port": args.port,
                "models_dir": args.models_dir,
                "catalog_dir": args.catalog_dir,
                "model_id": args.model_id,
                "llm_model": args.llm_model,
                "log_level": args.log_level,
            },
        )
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    memory.limit_arenas(config.malloc_arena_max)  # before any worker thread exists
    try:
        asyncio.run(serve(ServiceState(config)))
    except OSError as exc:
        _LOGGER.error("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
