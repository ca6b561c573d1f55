"""Read-only status page at ``/`` and ``/ui``: static HTML and JS from ``skill/static``, data as JSON."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from .audit import DecisionLog
from .service import ServiceState
from .telemetry import Telemetry

_LOGGER = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html", ".js": "application/javascript", ".css": "text/css"}
# Everything comes from this service: no external script, style, font or image can load.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
RECENT_SHOWN = 20


class StatusPage:
    """The page's routes; it reads the state, the metrics and the recent decisions, and changes nothing."""

    def __init__(self, state: ServiceState, telemetry: Telemetry, decisions: DecisionLog) -> None:
        self.state = state
        self.telemetry = telemetry
        self.decisions = decisions
        # A handful of small files, read once: the page never touches the disk while serving.
        self.files = {p.name: p.read_bytes() for p in STATIC_DIR.iterdir() if p.suffix in _TYPES}

    def register(self, router: web.UrlDispatcher) -> None:
        """``GET /``, ``GET /ui``, ``GET /ui/static/{name}`` and ``GET /ui/status.json``."""
        router.add_get("/", self.index)
        router.add_get("/ui", self.index)
        router.add_get("/ui/static/{name}", self.static)
        router.add_get("/ui/status.json", self.status)

    def _file(self, name: str) -> web.Response:
        body = self.files.get(name)
        if body is None:
            raise web.HTTPNotFound(text=f"no such file: {name}")
        return web.Response(body=body, content_type=_TYPES[Path(name).suffix], headers=_HEADERS)

    async def index(self, _request: web.Request) -> web.Response:
        """The page itself."""
        return self._file("index.html")

    async def static(self, request: web.Request) -> web.Response:
        """The page's script and style sheet (only files shipped in ``skill/static``)."""
        return self._file(request.match_info["name"])

    async def status(self, _request: web.Request) -> web.Response:
        """Everything the page shows, in one JSON document."""
        body: dict[str, Any] = {
            "health": self.state.health(),
            "metrics": self.telemetry.snapshot(),
            "audit": self.decisions.stats(),
            "recent": self.decisions.recent_records(RECENT_SHOWN),
        }
        return web.Response(
            body=msgspec.json.encode(body),
            content_type="application/json",
            headers={"Cache-Control": "no-cache"},
        )
