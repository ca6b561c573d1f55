"""Decision audit log: record shape, privacy, rotation, failures that never reach /parse, the summary tool."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from skill.audit import (
    AUDIT_FILE,
    AuditWriter,
    DecisionLog,
    Entry,
    canonicalization_result,
    text_hash,
    to_record,
)
from skill.canonicalize import Ambiguity, Canonical, EntityMatch
from skill.config import Config
from skill.decision import Candidate, Decision, Outcome
from skill.pipeline import ParseResult, StageTrace
from tests.test_telemetry import obs_catalog, start
from tools import audit_summary

REPO = Path(__file__).resolve().parent.parent
TEXT = "Turn off the kitchen light at 7:30 in the attic"


def _result(outcome: Outcome = Outcome.ABSTAIN) -> ParseResult:
    canonical = Canonical(
        text=TEXT,
        normalized=TEXT.lower(),
        masked="turn off the {device} at {time} in the attic",
        locale="en",
        entities=(
            EntityMatch("device", "device.light", "kitchen light", 13, 26, "device:light:kitchen_ceiling",
                        ref="device:light:kitchen_ceiling"),
            EntityMatch("time", "time", "7:30", 30, 34, "07:30", source="value", match_type="parsed"),
        ),
        ambiguities=(Ambiguity("the lamp", ("device:light:a", "device:light:b")),),
        unresolved=("attic",),
    )  # fmt: skip
    decision = Decision(
        intent="device.turn_off",
        confidence=0.7,
        outcome=outcome,
        via="neural",
        alternatives=(Candidate("alarm.set", 0.2),),
        evidence={
            "softmax": 0.66, "knn": 0.71, "matched_examples": ["turn off the {device}"],
            "canonicalized_text": canonical.masked, "entities": [], "note": "echo: kitchen light",
        },
        reason="low_confidence",
    )  # fmt: skip
    stages = (
        StageTrace("canonicalize", "ok", 0.2),
        StageTrace("neural", "abstain", 3.1, "device.turn_off", 0.7),
    )
    return ParseResult(decision, canonical, stages, "m-1")


def _entry(request_id: str = "r-1", outcome: Outcome = Outcome.ABSTAIN) -> Entry:
    return Entry(1_700_000_000.25, request_id, _result(outcome), "", 0.0, 4.5)


def test_record_keeps_what_a_maintainer_needs() -> None:
    rec = to_record(_entry(), "text")
    assert json.loads(msgspec.json.encode(rec)) == rec  # plain JSON
    assert rec["v"] == 1 and rec["ts"] == "2023-11-14T22:13:20.250+00:00"
    assert rec["request_id"] == "r-1" and rec["model_id"] == "m-1" and rec["text"] == TEXT
    assert (rec["decision"], rec["intent"], rec["confidence"], rec["reason"]) == (
        "abstain", "device.turn_off", 0.7, "low_confidence",
    )  # fmt: skip
    assert rec["answered"] == {"intent": "", "confidence": 0.0}
    assert rec["candidates"] == [
        {"intent": "device.turn_off", "confidence": 0.7},
        {"intent": "alarm.set", "confidence": 0.2},
    ]
    assert [(s["stage"], s["ms"]) for s in rec["stages"]] == [("canonicalize", 0.2), ("neural", 3.1)]
    assert rec["total_ms"] == 4.5
    assert rec["canonical"]["result"] == "ambiguity"
    assert rec["canonical"]["masked"] == "turn off the {device} at {time} in the attic"
    assert rec["canonical"]["unresolved"] == ["attic"]
    assert rec["evidence"]["knn"] == 0.71 and "canonicalized_text" not in rec["evidence"]


@pytest.mark.parametrize("privacy", ["hash", "none"])
def test_privacy_keeps_no_user_words(privacy: Any) -> None:
    rec = to_record(_entry(), privacy)
    blob = msgspec.json.encode(rec).decode().lower()
    for fragment in ("kitchen light", "7:30", "07:30", "attic", "the lamp", "turn off the {device} at"):
        assert fragment not in blob, fragment
    assert ("text_sha256" in rec) is (privacy == "hash")
    assert "text" not in rec
    assert rec["canonical"]["unresolved"] == 1
    assert rec["canonical"]["ambiguities"] == [{"candidates": ["device:light:a", "device:light:b"]}]
    assert rec["canonical"]["entities"][0]["ref"] == "device:light:kitchen_ceiling"  # catalog data stays
    assert rec["evidence"]["matched_examples"] == ["turn off the {device}"]  # catalog examples stay
    assert rec["evidence"]["softmax"] == 0.66 and "note" not in rec["evidence"]
    if privacy == "hash":
        assert rec["text_sha256"] == text_hash(_result().canonical) and len(rec["text_sha256"]) == 16


@pytest.mark.parametrize(
    ("entities", "ambiguities", "unresolved", "expected"),
    [
        ((), (), (), "miss"),
        ((EntityMatch("time", "time", "7:30", 0, 4, "07:30"),), (), (), "hit"),
        ((), (), ("attic",), "unresolved"),
        ((), (Ambiguity("lamp", ("a", "b")),), ("attic",), "ambiguity"),
    ],
)
def test_canonicalization_label(entities: Any, ambiguities: Any, unresolved: Any, expected: str) -> None:
    c = Canonical("x", "x", "x", "en", entities=entities, ambiguities=ambiguities, unresolved=unresolved)
    assert canonicalization_result(c) == expected


def _lines(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for p in paths for line in p.read_text(encoding="utf-8").splitlines()]


def test_rotation_by_size(tmp_path: Path) -> None:
    path = tmp_path / "logs" / AUDIT_FILE
    writer = AuditWriter(path, max_bytes=4096, backups=2, queue_size=1000, privacy="text")
    writer.start()
    for i in range(60):
        writer.submit(_entry(f"r-{i}"))
    writer.close()
    assert (writer.written, writer.dropped, writer.failed) == (60, 0, 0)
    files = sorted(path.parent.iterdir())
    assert [f.name for f in files] == [
        AUDIT_FILE,
        f"{AUDIT_FILE}.1",
        f"{AUDIT_FILE}.2",
    ]  # two backups, no more
    assert all(f.stat().st_size <= 4096 for f in files)
    ids = [r["request_id"] for r in _lines([path.with_name(f"{AUDIT_FILE}.{i}") for i in (2, 1)] + [path])]
    assert ids == [f"r-{i}" for i in range(60 - len(ids), 60)]  # the newest survive, in order
    assert 6 <= len(ids) < 60  # three files of a few records each


def test_disk_full_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    writer = AuditWriter(Path("/dev/full"), max_bytes=1 << 20, backups=1, queue_size=100, privacy="text")
    writer.start()
    with caplog.at_level(logging.INFO, logger="skill.audit"):
        for batch in range(3):
            for i in range(5):
                writer.submit(_entry(f"r-{batch}-{i}"))
            time.sleep(0.05)  # separate batches: each fails on its own
        writer.close()
    assert writer.written == 0 and writer.failed == 15
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()


def test_full_queue_drops_without_blocking(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path / AUDIT_FILE, max_bytes=1 << 20, backups=1, queue_size=3, privacy="none")
    started = time.perf_counter()
    for i in range(10):  # writer not started: nothing drains
        writer.submit(_entry(f"r-{i}"))
    assert time.perf_counter() - started < 0.5
    assert writer.dropped == 7
    assert len([r for r in caplog.records if "queue full" in r.getMessage()]) == 1
    writer.start()
    writer.close()
    assert writer.written == 3


async def test_unwritable_log_never_breaks_parse(
    aiohttp_client: Any, tmp_path: Path, make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log folder should be", encoding="utf-8")
    config = make_config(catalog_dir=str(obs_catalog(tmp_path / "catalog")), audit_dir=str(blocker))
    client, _ = await start(aiohttp_client, config)
    for _ in range(5):
        resp = await client.post("/parse", json={"text": "what time is it"})
        assert resp.status == 200 and (await resp.json())["top_intent"] == "voice.time.now"
    metrics = ""
    for _ in range(100):  # the writer thread gets there a moment later
        metrics = await (await client.get("/metrics")).text()
        if 'nlu_audit_records_total{result="failed"} 5.0' in metrics:
            break
        await asyncio.sleep(0.02)
    assert 'nlu_audit_records_total{result="failed"} 5.0' in metrics
    assert len([r for r in caplog.records if r.name == "skill.audit" and r.levelno >= logging.ERROR]) == 1


def test_disabled_log_writes_nothing(tmp_path: Path, make_config: Callable[..., Config]) -> None:
    config = make_config(audit_enabled=False, audit_dir=str(tmp_path / "logs"))
    log = DecisionLog(config)
    assert log.writer is None and log.path is None and log.stats()["enabled"] is False
    wire = {"top_intent": "", "confidence": 0.0}
    log.add(_result(), wire, "r", 0.001)
    assert not (tmp_path / "logs").exists()
    assert log.recent_records()[0]["request_id"] == "r"  # the status page still sees it


SENTENCES = ["what time is it"] * 4 + ["сколько времени"] * 2 + ["tell me a story"] * 3 + ["hum a tune"] * 2


async def test_summary_of_a_real_log(
    aiohttp_client: Any,
    tmp_path: Path,
    make_config: Callable[..., Config],
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs = tmp_path / "logs"
    config = make_config(
        catalog_dir=str(obs_catalog(tmp_path / "catalog")),
        audit_dir=str(logs),
        audit_max_bytes=4096,
        audit_backups=5,
    )
    client, _ = await start(aiohttp_client, config)
    for text in SENTENCES:
        assert (await client.post("/parse", json={"text": text})).status == 200
    await client.close()  # app cleanup drains the writer
    files = sorted(logs.iterdir())
    assert len(files) >= 2, "the log should have rotated at 4 KiB"
    with capsys.disabled():
        print(f"\naudit log written by the test suite: {logs} ({len(files)} files)")

    assert audit_summary.main([str(logs), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == len(SENTENCES) and summary["unreadable_lines"] == {}
    assert summary["outcomes"]["accept"] == 6 and summary["outcomes"]["abstain"] == 5
    assert summary["per_intent"]["voice.time.now"]["accept"] == 6
    assert summary["per_intent"]["(none)"]["abstain"] == 5
    assert summary["fallback_ratio"] == pytest.approx(5 / 11, abs=1e-4)
    assert summary["confidence_bands"]["0.80-1.00"]["accept"] == 6
    assert [(a["text"], a["count"]) for a in summary["top_abstained"]] == [
        ("tell me a story", 3),
        ("hum a tune", 2),
    ]
    assert sum(summary["canonicalization"].values()) == len(SENTENCES)
    assert summary["latency_ms"]["total"]["p50"] is not None

    done = subprocess.run(
        [sys.executable, "-m", "tools.audit_summary", *map(str, files)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| voice.time.now | 6 |" in done.stdout
    assert "| tell me a story | 3 |" in done.stdout


def test_summary_of_failures() -> None:
    records = [to_record(_entry(f"r-{i}"), "text") for i in range(3)]
    records.append(to_record(_entry("r-9", Outcome.ACCEPT), "hash"))
    s = audit_summary.summarize(records, top=5)
    assert s["outcomes"] == {"accept": 1, "abstain": 3, "reject": 0, "error": 0}
    assert s["ambiguities"][0] == {
        "text": "the lamp",
        "count": 3,
        "candidates": ["device:light:a", "device:light:b"],
    }
    assert s["ambiguities"][1]["text"] == "(text not stored)"
    assert s["unresolved_spans"] == [{"text": "attic", "count": 3}]
    assert s["top_abstained"][0]["top_candidates"] == {"device.turn_off": 3}
    assert s["not_accepted_reasons"] == {"abstain: low_confidence": 3}
    assert Counter(s["confidence_bands"]["0.45-0.79"]) == Counter(
        {"abstain": 3, "accept": 1, "reject": 0, "error": 0}
    )


def test_summary_skips_torn_lines_and_reports_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / AUDIT_FILE
    good = msgspec.json.encode(to_record(_entry(), "text")).decode()
    log.write_text(good + "\n" + good[: len(good) // 2] + "\n", encoding="utf-8")
    assert audit_summary.main([str(log), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == 1 and sum(out["unreadable_lines"].values()) == 1
    assert audit_summary.main([str(tmp_path / "nope.jsonl")]) == 2
