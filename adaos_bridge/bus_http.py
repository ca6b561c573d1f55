"""HTTP adapter for a bridge outside the hub: publish through the hub's ingress, receive on a local one.

Out: ``POST <hub>/api/node/events/publish`` with header ``X-AdaOS-Token`` and body ``{type, payload,
webspace_id}`` (contracts §3). In: the hub cannot push events to another process today, so the
bridge serves the same route with the same body and token on ``listen_host:listen_port``; whatever
forwards ``nlp.intent.detect.*`` and ``nlp.teacher.example.save`` (a hub-side relay, a test) posts
there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from .bus import BusEvent, Handler, matches

_LOGGER = logging.getLogger(__name__)
INGRESS_PATH = "/api/node/events/publish"


class HttpIngressBus:
    """Publishes to a hub over HTTP and accepts events on a local HTTP listener."""

    def __init__(
        self,
        hub_url: str,
        token: str | None,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 18093,
        publish_attempts: int = 3,
        timeout_s: float = 5.0,
    ) -> None:
        self.hub_url = hub_url.rstrip("/")
        self.token = token
        self.listen_host = listen_host
        self.port = listen_port
        self.publish_attempts = publish_attempts
        self.timeout_s = timeout_s
        self._subs: list[tuple[str, Handler]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Open the client session and the local ingress."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        app = web.Application(client_max_size=256 * 1024)
        app.router.add_post(INGRESS_PATH, self._ingress)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.listen_host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = int(server.sockets[0].getsockname()[1])
        _LOGGER.info("HTTP ingress on http://%s:%s%s", self.listen_host, self.port, INGRESS_PATH)

    async def _health(self, request: web.Request) -> web.Response:
        ready = bool(self._subs)
        return web.json_response({"ok": ready, "in_flight": len(self._tasks)}, status=200 if ready else 503)

    async def _ingress(self, request: web.Request) -> web.Response:
        if not self._subs:  # started but the bridge has not subscribed yet
            return web.json_response({"ok": False, "error": "not_ready"}, status=503)
        if self.token and request.headers.get("X-AdaOS-Token") != self.token:
            return web.json_response({"ok": False, "error": "unauthorized"}, status=401)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"ok": False, "error": "invalid_json"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("type"), str) or not body["type"]:
            return web.json_response({"ok": False, "error": "type_required", "field": "type"}, status=400)
        raw_payload = body.get("payload")
        payload: dict[str, Any] = raw_payload if isinstance(raw_payload, dict) else {}
        if body.get("webspace_id") and "webspace_id" not in payload:
            payload = {**payload, "webspace_id": body["webspace_id"]}
        event = BusEvent(body["type"], payload, str(body.get("source") or "http"), time.time())
        for prefix, handler in self._subs:
            if matches(prefix, event.type):
                task = asyncio.get_running_loop().create_task(self._run(handler, event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return web.json_response({"ok": True})

    @staticmethod
    async def _run(handler: Handler, event: BusEvent) -> None:
        try:
            await handler(event)
        except Exception:  # noqa: BLE001 - one bad event must not stop the ingress
            _LOGGER.exception("handler crashed for %s", event.type)

    async def subscribe(self, prefix: str, handler: Handler, *, shared: bool = True) -> None:
        """Events posted to the local ingress whose type starts with ``prefix``."""
        self._subs.append((prefix, handler))

    async def publish(self, type_: str, payload: dict[str, Any]) -> None:
        """POST to the hub; a few quick retries on connection errors and 5xx, then log and give up."""
        if self._session is None:
            raise RuntimeError("HttpIngressBus.start() first")
        body = {"type": type_, "payload": payload, "webspace_id": payload.get("webspace_id") or "desktop"}
        headers = {"X-AdaOS-Token": self.token} if self.token else {}
        for attempt in range(1, self.publish_attempts + 1):
            try:
                async with self._session.post(
                    f"{self.hub_url}{INGRESS_PATH}", json=body, headers=headers
                ) as resp:
                    if resp.status < 500:
                        if resp.status >= 400:
                            _LOGGER.error("hub refused %s: HTTP %s", type_, resp.status)
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                _LOGGER.debug("publish %s attempt %d failed: %s", type_, attempt, exc)
            await asyncio.sleep(0.05 * attempt)
        _LOGGER.error("could not publish %s to %s", type_, self.hub_url)

    async def close(self) -> None:
        """Stop the ingress, finish handlers in flight, close the session."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30)
        if self._session is not None:
            await self._session.close()
            self._session = None
