"""``tools.flows`` over a real audit log written by the test service (real HTTP on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from skill.app import create_app
from skill.config import Config
from tests.conversation_kit import SCRIPT, ScriptedRanker, scripted_state, write_conv_catalog
from tools import flows

REPO = Path(__file__).resolve().parent.parent

# (scope fields, text): three sessions and one stateless call.
CONVERSATION: list[tuple[dict[str, str], str]] = [
    ({"session_id": "a"}, "поставь будильник на 7:30"),
    ({"session_id": "a"}, "отмени"),  # cancels the alarm
    ({"session_id": "b"}, "узнай погоду на даче"),  # abstains...
    ({"session_id": "b"}, "какая погода на даче"),  # ...and the user says it again, differently
    ({"session_id": "b"}, "выключи свет на кухне и поставь будильник на 7:30"),  # two requests
    ({"webspace_id": "ws-c"}, "включи свет на кухне"),
    ({"webspace_id": "ws-c"}, "а в спальне?"),  # update
    ({"webspace_id": "ws-c"}, "выключи свет в спальне"),  # undoes it: the declared counterpart
    ({}, "поставь будильник на 7:30"),  # no scope: not part of any session
]


@pytest.fixture
async def audit_log(aiohttp_client: Any, tmp_path: Path, make_config: Callable[..., Config]) -> Path:
    logs = tmp_path / "logs"
    config = make_config(
        catalog_dir=str(write_conv_catalog(tmp_path / "catalog")), audit_dir=str(logs), watch_pointer=False
    )
    ranker = ScriptedRanker({**SCRIPT, "какая погода на даче": [("weather.get", 0.95)]})
    client = await aiohttp_client(create_app(scripted_state(config, ranker)))
    for i, (scope, text) in enumerate(CONVERSATION):
        resp = await client.post("/parse", json={"text": text, "request_id": f"r{i}", **scope})
        assert resp.status == 200
    await client.close()  # app cleanup drains the audit writer
    return logs


def test_flows_page_from_a_real_audit_log(
    audit_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [json.loads(line) for line in (audit_log / "nlu_decisions.jsonl").read_text().splitlines()]
    assert len(records) == len(CONVERSATION) + 1  # the two-request utterance is two records
    split = [r for r in records if r.get("segment")]
    assert [(r["request_id"], r["segment"]["index"], r["segment"]["of"]) for r in split] == [
        ("r4", 0, 2),
        ("r4", 1, 2),
    ]
    assert split[1]["text"] == "поставь будильник на 7:30" and split[1]["session_id"] == "b"
    update = next(r for r in records if r["request_id"] == "r6")
    assert update["scope"] == "webspace:ws-c" and update["context"]["action"] == "update"
    assert update["text"] == "а в спальне?"  # the words said, not the completed request

    out = tmp_path / "flows"
    assert flows.main([str(audit_log), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "flows.json").read_text())
    assert report["records"] == len(records) and report["stateless_records"] == 1
    assert report["scopes"] == 3 and report["split_requests"] == 1
    trans = {(t["from"], t["to"]): t["count"] for t in report["transitions"]}
    assert trans[("alarm.set", "alarm.cancel")] == 1
    assert trans[("(abstain)", "weather.get")] == 1
    assert trans[("device.turn_off", "alarm.set")] == 1  # the two segments, in order
    assert trans[("device.turn_on", "device.turn_on")] == 1  # the kitchen, then the bedroom
    (pair,) = report["top_rephrases"]
    assert pair == {
        "abstained": "узнай погоду на даче",
        "rephrased": "какая погода на даче",
        "rephrased_intent": "weather.get",
        "count": 1,
    }
    assert report["rephrase_accepted"] == 1
    cancels = {c["intent"]: (c["accepted"], c["cancelled"]) for c in report["followed_by_cancel"]}
    assert cancels == {"alarm.set": (2, 1), "device.turn_on": (2, 1)}
    nxt = {a: [x["to"] for x in rows] for a, rows in report["next_intent"].items()}
    assert nxt["weather.get"] == ["device.turn_off"] and "(end)" in nxt["alarm.cancel"]
    assert report["context_actions"]["cancel"] == 2 and report["context_actions"]["update"] == 1

    page = (out / "flows.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "<svg" in page and "</svg>" in page
    assert "marker-end" in page  # arrows drawn
    for heading in (
        "Transition diagram",
        "Most common transitions",
        "Abstain → rephrase",
        "followed by a cancel",
    ):
        assert heading in page
    assert "узнай погоду на даче" in page and "alarm.cancel" in page
    for external in ("<script", "<link", "src=", "@import", "url(http"):
        assert external not in page  # self-contained


def test_flows_cli(audit_log: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.flows", str(audit_log), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| alarm.set | alarm.cancel | 1 |" in done.stdout
    assert (tmp_path / "o" / "flows.html").is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "tools.flows", str(tmp_path / "nothing.jsonl")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode == 2 and "no audit log" in missing.stderr
