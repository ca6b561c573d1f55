"""The status page in headless Chromium, driven over the DevTools protocol (aiohttp's websocket; no driver).

Skips only when no Chromium is installed (CI: ``apt-get install -y chromium``). The screenshot is kept
under pytest's tmp dir and its path printed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from skill.app import create_app
from skill.config import Config
from skill.service import ServiceState
from tests.test_telemetry import obs_catalog


def find_chromium() -> str | None:
    """``NLU_CHROMIUM`` or the first Chromium-like browser on PATH."""
    names = (
        os.environ.get("NLU_CHROMIUM", ""),
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    )
    return next((path for name in names if name and (path := shutil.which(name))), None)


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get update && apt-get install -y chromium)"
)
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,1700", "--remote-debugging-port=0",
)  # fmt: skip
TIMEOUT = 30.0


class Cdp:
    """A minimal DevTools client: numbered commands, their answers, and every event kept for inspection."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = future
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        answer = await asyncio.wait_for(future, TIMEOUT)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def js(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        """Poll a page expression until it is truthy."""
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while asyncio.get_running_loop().time() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {expression}")


@contextlib.asynccontextmanager
async def browser(profile: Path) -> AsyncIterator[Cdp]:
    """Headless Chromium with a fresh profile, and a DevTools session on its first tab."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(int(TIMEOUT * 10)):
            if port_file.exists() and port_file.read_text().strip():
                break
            assert proc.returncode is None, f"chromium exited with {proc.returncode}"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = Cdp(ws)
                yield cdp
                cdp.reader.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def click(cdp: Cdp, selector: str) -> None:
    """A real mouse click in the middle of an element."""
    box = await cdp.js(
        f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
        " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
    )
    for kind in ("mousePressed", "mouseReleased"):
        await cdp.send(
            "Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1
        )


async def test_status_page_in_chromium(
    tmp_path: Path, make_config: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(catalog_dir=str(obs_catalog(tmp_path / "catalog")), audit_dir=str(tmp_path / "logs"))
    state = ServiceState(config)
    async with TestServer(create_app(state), host="127.0.0.1") as server:
        origin = str(server.make_url("/")).rstrip("/")
        async with browser(tmp_path / "chromium-profile") as cdp:
            for domain in ("Page", "Runtime", "Network"):
                await cdp.send(f"{domain}.enable")
            await cdp.send("Page.navigate", url=f"{origin}/ui")
            await cdp.wait_for("document.querySelector('#model-table tr') !== null", "the status to render")
            badge = await cdp.wait_for(
                "(t => t.includes('loading') ? '' : t)(document.querySelector('#status-badge').textContent)",
                "ready",
            )
            assert badge.startswith("degraded")  # regex rules only: no model in tests

            await cdp.js("document.querySelector('#try-text').focus()")
            await cdp.send("Input.insertText", text="what time is it")
            await click(cdp, "#try-submit")
            intent = await cdp.wait_for("document.querySelector('#try-intent').textContent", "the answer")
            assert intent == "voice.time.now"
            assert await cdp.js("document.querySelector('#try-decision').textContent") == "accept"
            stages = await cdp.js(
                "[...document.querySelectorAll('#try-stages tbody tr td:first-child')]"
                ".map(td => td.textContent)"
            )
            assert stages[:2] == ["canonicalize", "regex"]
            evidence = json.loads(await cdp.js("document.querySelector('#try-evidence').textContent"))
            assert evidence["rule"] == "time_en"
            recent = await cdp.wait_for(
                "[...document.querySelectorAll('#recent-table tbody td')]"
                ".some(td => td.textContent === 'what time is it')",
                "the decision in the recent table",
            )
            assert recent is True
            shot = await cdp.send("Page.captureScreenshot", format="png")
            path = tmp_path / "status_page.png"
            path.write_bytes(base64.b64decode(shot["data"]))
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            with capsys.disabled():
                print(f"\nstatus page screenshot: {path}")

            # A link with ?text= fills the box and submits it (usable with --dump-dom as well).
            await cdp.send(
                "Page.navigate", url=f"{origin}/ui?" + urlencode({"text": "сколько времени", "locale": "ru"})
            )
            await cdp.wait_for(
                "document.querySelector('#try-intent')?.textContent === 'voice.time.now'"
                " && document.querySelector('#try-locale-used')?.textContent === 'ru'",
                "the auto-submitted answer",
            )

        requested = [
            e["params"]["request"]["url"]
            for e in cdp.events
            if e.get("method") == "Network.requestWillBeSent"
        ]
        assert requested and all(u.startswith(origin) or u.startswith("data:") for u in requested), requested
        errors = [e for e in cdp.events if e.get("method") in ("Runtime.exceptionThrown", "Log.entryAdded")]
        assert not errors, errors
