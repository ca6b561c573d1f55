"""tools.bench_llm: the LLM stage's latency report, with the tiny model, and its input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tools import bench_llm


def test_tiny_model_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llm.json"
    argv = ["--tiny", "--catalog", str(REPO / "catalog"), "--requests", "4", "--warmup", "1"]
    assert bench_llm.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["requests"] == 4 and sum(report["outcomes"].values()) == 4
    assert report["catalog_intents"] == 25 and report["prefix_tokens"] > 1000
    assert 0 < report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert report["mean_prompt_tokens"] < report["prefix_tokens"]  # the prefix is cached, not re-sent
    assert report["rss_mb"]["llm_loaded"] > 0


def test_missing_or_damaged_model_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert bench_llm.main(["--llm-model", str(tmp_path / "none.gguf")]) == 2
    assert "LLM model file not found" in caplog.text
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    (tmp_path / "bad.gguf.nlu.json").write_text('{"temperature": 0}')
    assert bench_llm.main(["--llm-model", str(bad)]) == 2
    assert "temperature must be > 0" in caplog.text
