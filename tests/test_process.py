"""The real process: `python -m skill` answers /health within AdaOS's 10 s and exits 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import REPO
from tools.bench_http import free_port


def test_start_health_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAOS_")}
    env["ADAOS_STATE_DIR"] = str(tmp_path / "state")  # an empty node: the embedded model serves
    env["ADAOS_LOGS_DIR"] = str(tmp_path / "logs")
    proc = subprocess.Popen(
        [sys.executable, "-m", "skill", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    started = time.monotonic()
    body = None
    try:
        while time.monotonic() - started < 10.0:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                    body = json.loads(resp.read())
                    break
            except OSError:
                time.sleep(0.1)
        assert body is not None, "no 200 from /health within 10 s"
        assert body["ok"] is True
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/parse",
            data=json.dumps({"text": "открой маркетплейс"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            parsed = json.loads(resp.read())
        assert parsed["ok"] is True and parsed["top_intent"] == "desktop.open_marketplace"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out.decode(errors="replace")
    log = out.decode(errors="replace")
    assert "ready: model_id=" in log
