"""``python -m adaos_bridge``: the bridge as its own process, on NATS or on a hub's HTTP ingress.

    python -m adaos_bridge --bus nats --nats-url nats://127.0.0.1:4222 --service-url http://127.0.0.1:18091
    python -m adaos_bridge --bus http --hub-url http://hub:8777 --hub-token T --listen 127.0.0.1:18093

Inside a hub process use :func:`adaos_bridge.runtime.start_in_hub` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from .config import BridgeConfig, ConfigError, load_bridge_config
from .runtime import make_bus, run_until_stopped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; each overrides the environment."""
    p = argparse.ArgumentParser(
        prog="python -m adaos_bridge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bus", choices=("nats", "http"), required=True, help="transport to the hub")
    p.add_argument("--service-url", help="the NLU service (default http://127.0.0.1:18091)")
    p.add_argument("--nats-url", help="NATS server for --bus nats (and the JetStream teacher stream)")
    p.add_argument(
        "--queue-group", dest="nats_queue_group", help="NATS queue group (default adaos-nlu-neural)"
    )
    p.add_argument("--hub-url", help="the hub's base URL for --bus http")
    p.add_argument("--hub-token", help="X-AdaOS-Token (default $ADAOS_TOKEN)")
    p.add_argument("--listen", help="HOST:PORT of the local ingress for --bus http (default 127.0.0.1:18093)")
    p.add_argument(
        "--standalone",
        action="store_true",
        default=None,
        help="also take nlp.intent.detect.request (no hub pipeline in front)",
    )
    p.add_argument(
        "--no-rasa-fallback",
        dest="rasa_fallback",
        action="store_false",
        default=None,
        help="misses become nlp.intent.not_obtained instead of nlp.intent.detect.rasa",
    )
    p.add_argument(
        "--timeout", dest="timeout_s", type=float, help="call budget in s ($ADAOS_NLU_NEURAL_TIMEOUT_S)"
    )
    p.add_argument("--state-dir", help="queue, statistics, overlay (default $ADAOS_STATE_DIR/nlu/bridge)")
    p.add_argument("--teacher-url", help="HTTP endpoint that receives misses")
    p.add_argument("--teacher-token", help="bearer token for --teacher-url ($NLU_BRIDGE_TEACHER_TOKEN)")
    p.add_argument("--teacher-stream", help="JetStream stream for misses (needs --nats-url)")
    p.add_argument(
        "--examples-stream", help="JetStream stream of nlp.teacher.example.save (needs --nats-url)"
    )
    p.add_argument("--queue-max", type=int, help="bound of the teacher queue (oldest dropped, counted)")
    p.add_argument("--redact-digits", action="store_true", default=None, help="digits → # before queueing")
    p.add_argument("--redact-names", action="store_true", default=None, help="registry names → {placeholder}")
    p.add_argument("--catalog-dir", help="catalog whose entity aliases --redact-names also removes")
    p.add_argument(
        "--overlay-path",
        help="teacher overlay file (default <state-dir>/teacher_catalog/intents/teacher.yaml)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING...")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> BridgeConfig:
    """Environment ← flags."""
    overrides: dict[str, Any] = {
        k: getattr(args, k)
        for k in (
            "service_url",
            "nats_url",
            "nats_queue_group",
            "hub_url",
            "hub_token",
            "standalone",
            "rasa_fallback",
            "timeout_s",
            "state_dir",
            "teacher_url",
            "teacher_token",
            "teacher_stream",
            "examples_stream",
            "queue_max",
            "redact_digits",
            "redact_names",
            "catalog_dir",
            "overlay_path",
            "log_level",
        )
    }
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--listen wants HOST:PORT, got {args.listen!r}")
        overrides.update(listen_host=host, listen_port=int(port))
    cfg = load_bridge_config(overrides=overrides)
    if args.bus == "nats" and not cfg.nats_url:
        raise ConfigError("--bus nats needs --nats-url (or NLU_BRIDGE_NATS_URL)")
    if args.bus == "http" and not cfg.hub_url:
        raise ConfigError("--bus http needs --hub-url (or NLU_BRIDGE_HUB_URL)")
    if (cfg.teacher_stream or cfg.examples_stream) and not cfg.nats_url:
        raise ConfigError("--teacher-stream and --examples-stream need --nats-url")
    return cfg


async def _serve(config: BridgeConfig, bus_kind: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_until_stopped(config, make_bus(bus_kind, config), stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_serve(config, args.bus))
    except OSError as exc:
        logging.getLogger(__name__).error("cannot run: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
