"""Wiring a bridge to a bus: standalone (NATS, HTTP ingress) or inside a running AdaOS hub."""

from __future__ import annotations

import asyncio
import logging

from .bridge import Bridge
from .bus import Bus
from .bus_adaos import AdaosBus
from .bus_http import HttpIngressBus
from .bus_nats import NatsBus
from .config import BridgeConfig, ConfigError, load_bridge_config

_LOGGER = logging.getLogger(__name__)


def make_bus(kind: str, config: BridgeConfig) -> Bus:
    """The adapter for ``--bus``."""
    if kind == "nats":
        if not config.nats_url:
            raise ConfigError("the NATS bus needs nats_url")
        return NatsBus(
            config.nats_url, queue_group=config.nats_queue_group, dedup_window_s=config.dedup_window_s
        )
    if kind == "http":
        if not config.hub_url:
            raise ConfigError("the HTTP bus needs hub_url")
        return HttpIngressBus(
            config.hub_url, config.hub_token, listen_host=config.listen_host, listen_port=config.listen_port
        )
    raise ConfigError(f"unknown bus {kind!r}")


async def run_until_stopped(config: BridgeConfig, bus: Bus, stop: asyncio.Event) -> None:
    """Connect, serve until ``stop`` is set, then drain: the bus first, then the bridge."""
    await bus.start()
    bridge = Bridge(config, bus)
    try:
        await bridge.start()
        await stop.wait()
        _LOGGER.info("stopping: draining in-flight requests")
    finally:
        await bus.close()
        await bridge.close()


async def start_in_hub(config: BridgeConfig | None = None) -> Bridge:
    """Start a bridge on the running hub's bus (the ``adaos`` package must be importable).

    Call from the hub's event loop, e.g. at skill or service start-up; keep the returned bridge
    and ``await bridge.close()`` on shutdown.
    """
    config = config or load_bridge_config()
    bus = AdaosBus.from_adaos(source=config.source)
    bridge = Bridge(config, bus)
    await bridge.start()
    return bridge
