"""Helpers for the bridge tests: the real service on a loopback thread, fake teacher and hub, nats-server."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from skill.app import create_app
from skill.config import Config
from skill.service import ServiceState

NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
)
needs_nats = pytest.mark.skipif(
    NATS_SERVER is None, reason="nats-server binary not found (apt-get install -y nats-server)"
)


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceThread:
    """The real service (``create_app(ServiceState(config))``) on its own loop and thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.state: ServiceState | None = None

    @property
    def url(self) -> str:
        """Base URL on loopback."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> ServiceThread:
        """Serve and wait until the pipeline is loaded."""
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(port), self.loop).result(30)
        return self

    async def _start(self, port: int) -> None:
        self.state = ServiceState(self.config)
        self.runner = web.AppRunner(create_app(self.state), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        for _ in range(1000):
            if self.state.ready:
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("service did not become ready")

    def stop(self) -> None:
        """Stop serving (the port closes) and end the thread."""
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
            self.runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class FakeTeacher:
    """A teacher endpoint: records every delivery (key, body); can answer with a chosen status."""

    def __init__(self, token: str = "teacher-token") -> None:
        self.token = token
        self.deliveries: list[tuple[str, dict[str, Any]]] = []
        self.status = 200
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Endpoint URL."""
        return f"http://127.0.0.1:{self.port}/teacher/misses"

    async def start(self, port: int = 0) -> FakeTeacher:
        """Serve on loopback."""
        app = web.Application()
        app.router.add_post("/teacher/misses", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"ok": False}, status=401)
        if self.status != 200:
            return web.json_response({"ok": False}, status=self.status)
        body = await request.json()
        self.deliveries.append((request.headers["Idempotency-Key"], body))
        return web.json_response({"ok": True})

    def keys(self) -> list[str]:
        """Idempotency keys in arrival order."""
        return [k for k, _ in self.deliveries]

    async def stop(self) -> None:
        """Stop serving."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class FakeHub:
    """A hub's HTTP ingress (``POST /api/node/events/publish``) recording published events."""

    def __init__(self, token: str = "hub-token") -> None:
        self.token = token
        self.events: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeHub:
        """Serve on loopback."""
        app = web.Application()
        app.router.add_post("/api/node/events/publish", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        if request.headers.get("X-AdaOS-Token") != self.token:
            return web.json_response({"ok": False, "error": "unauthorized"}, status=401)
        self.events.append(await request.json())
        return web.json_response({"ok": True})

    def of(self, type_: str) -> list[dict[str, Any]]:
        """Bodies of events of this type."""
        return [e for e in self.events if e["type"] == type_]

    async def stop(self) -> None:
        """Stop serving."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class NatsServer:
    """A real nats-server (JetStream on) on a free loopback port, storing into ``store``."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        """Start and wait until it accepts connections."""
        assert NATS_SERVER is not None
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        """Terminate (this process only)."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    """Poll ``predicate`` until true or the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()
