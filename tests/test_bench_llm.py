"""tools.bench_llm: the LLM stage's usefulness and latency report (tiny model) and its input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tools import bench_llm


def test_tiny_model_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llm.json"
    probe = tmp_path / "probe.jsonl"  # a second set in the bench format, like home_probe.jsonl
    rows = [("поставь будильник пораньше", "alarm.set"), ("what's up with the garden gnome", "oos")] * 3
    probe.write_text(
        "".join(json.dumps({"text": t, "intent": i, "lang": "ru", "split": "test"}) + "\n" for t, i in rows)
    )
    argv = ["--tiny", "--catalog", str(REPO / "catalog"), "--requests", "4", "--warmup", "1"]
    assert bench_llm.main([*argv, "--home-probe", str(probe), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    for key in ("rows_handed", "rescue_rate", "wrong_accept_rate", "accepted_precision", "p50_ms", "p95_ms"):
        assert key in report
    sets = report["sets"]
    assert set(sets) == {"catalog_val", "home_probe"} and sets["catalog_val"]["rows_handed"] == 4
    assert report["rows_handed"] == sum(s["rows_handed"] for s in sets.values()) == report["requests"]
    assert 0.0 <= report["rescue_rate"] <= 1.0 and 0.0 <= report["wrong_accept_rate"] <= 1.0
    assert report["catalog_intents"] > 20 and report["prefix_tokens"] > 500
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert report["mean_prompt_tokens"] < report["prefix_tokens"]  # the prefix is cached, not re-sent
    assert report["mean_logit_rows"] < report["mean_batch_tokens"] + 1
    assert report["rss_mb"]["llm_loaded"] > 0 and report["stage_on"] is True
    assert report["prefix_from"] in ("evaluated", "disk cache")


def test_missing_or_damaged_model_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert bench_llm.main(["--llm-model", str(tmp_path / "none.gguf")]) == 2
    assert "LLM model file not found" in caplog.text
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    (tmp_path / "bad.gguf.nlu.json").write_text('{"temperature": 0}')
    assert bench_llm.main(["--llm-model", str(bad)]) == 2
    assert "temperature must be > 0" in caplog.text
