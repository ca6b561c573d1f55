"""tools.report_html: one self-contained page from one or two bench folders."""

from __future__ import annotations

import base64
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from tools import bench, metrics, report_html

REPO = Path(__file__).resolve().parent.parent


def _bench_folder(root: Path, model_id: str, seed: int, *, plots: bool = True) -> Path:
    """A bench output folder as tools.bench writes it, from synthetic predictions (no training)."""
    rng = random.Random(seed)
    preds = []
    for i in range(240):
        gold = "oos" if i % 6 == 0 else f"intent.{i % 4}"
        conf = rng.random()
        hit = gold != "oos" and rng.random() < conf
        intent = gold if hit else f"intent.{(i + 1 + seed) % 4}"
        outcome = "accept" if conf > 0.8 else "abstain" if conf > 0.45 else "reject"
        preds.append(metrics.Prediction("t", gold, intent, conf, outcome, 2.0 + conf, 1.0 + conf, "en"))
    model = root / "models" / model_id
    model.mkdir(parents=True)
    (model / "model.onnx").write_bytes(b"\0" * (1000 + seed))
    ev = bench.EvalOutput(
        model_id=model_id, threads=1, warmup=32, torch_loaded=False, peak_rss_mb=100.0 + seed,
        ru_maxrss_mb=1.0, gate={"accept": 0.8, "reject": 0.45, "margin": 0.1}, ranker_info={},
        policy_overlap=[], val=preds[:120], test=preds[120:],
    )  # fmt: skip
    scores = metrics.score(ev.test, ev.val)
    meta = {
        "command": f"python -m tools.bench --data d.jsonl --out {root.name}", "data": "d.jsonl",
        "seed": seed, "train_rows": 10, "use_oos_train": False, "val_rows": 120, "val_source": "val",
        "created": "2026-01-01",
    }  # fmt: skip
    report = bench.build_report(scores, ev, model_dir=model, train_seconds=1.0, meta=meta)
    report["plots"] = list(report_html.PLOTS)
    root.mkdir(parents=True, exist_ok=True)
    (root / "report.json").write_bytes(msgspec.json.encode(report))
    if plots:
        bench._render(scores, report, root, model_id)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("bench")
    return _bench_folder(base / "run-a", "model-a", 1), _bench_folder(base / "run-b", "model-b", 2)


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_two_runs_side_by_side(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp" / "report.html"
    assert report_html.main([str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "A: model-a" in page and "B: model-b" in page
    images = _images(page)
    assert len(images) == 4  # reliability + risk-coverage, per run
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert page.count("<svg") >= 4  # two overlays, confusion pairs, per-intent bars
    assert "change (B − A)" in page and "ΔF1" in page
    assert re.search(r'class="n (better|worse)"', page)
    for key in ("Confusion pairs", "Per-intent precision and recall", "intent.0", "Reliability".lower()):
        assert key in page
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<script" not in page


def test_one_run_and_a_missing_plot(runs: tuple[Path, Path], tmp_path: Path) -> None:
    bare = _bench_folder(tmp_path / "bare", "model-c", 3, plots=False)
    out = tmp_path / "one.html"
    assert report_html.main([str(bare), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert "reliability.png missing" in page
    assert "change (B − A)" not in page
    assert "A: model-c" in page


def test_figures_and_verdicts() -> None:
    assert report_html.fmt(0.12345, "%") == "12.35%"
    assert report_html.fmt(2_500_000, "MB") == "2.50 MB"
    assert report_html.fmt(None, "%") == "n/a"
    assert report_html.verdict(0.9, 0.95, 1) == "better"
    assert report_html.verdict(10.0, 12.0, -1) == "worse"
    assert report_html.verdict(0.2, 0.3, 0) == ""
    assert report_html.verdict(None, 0.3, 1) == ""


def test_bad_folder_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert report_html.main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.html")]) == 2
    assert "report.json" in caplog.text
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text("{not json", encoding="utf-8")
    assert report_html.main([str(tmp_path / "broken"), "--out", str(tmp_path / "x.html")]) == 2
    assert not (tmp_path / "x.html").exists()


def test_command_line(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli.html"
    cmd = [sys.executable, "-m", "tools.report_html", str(runs[0]), str(runs[1]), "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 10_000
    assert json.loads((runs[0] / "report.json").read_text())["model_id"] == "model-a"
