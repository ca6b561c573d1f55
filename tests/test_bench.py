"""The benchmark tool: splits, report shape and rendering, and one end-to-end run on generated data."""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from tools import bench, metrics

REPO_ROOT = Path(__file__).resolve().parent.parent

# The report.json keys the issue asks for, exactly.
ISSUE_KEYS = {
    "inscope_accuracy", "macro_f1", "accept_rate", "abstain_rate", "reject_rate", "accepted_precision",
    "coverage_at_99_precision", "coverage_at_val_threshold", "precision_at_val_threshold",
    "oos_recall", "oos_precision", "oos_auroc", "ece", "neural_p50_ms", "neural_p99_ms",
    "pipeline_p50_ms", "pipeline_p99_ms", "model_bytes", "peak_rss_mb", "train_seconds", "model_id",
}  # fmt: skip


def _rows(counts: dict[str, int]) -> list[bench.BenchRow]:
    return [
        bench.BenchRow(f"{intent} {i}", intent, "train", "en")
        for intent, n in counts.items()
        for i in range(n)
    ]


def test_read_rows_accepts_lang_and_locale(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "hi", "intent": "greet", "lang": "en", "split": "train"}\n\n'
        '{"text": "привет", "intent": "greet", "locale": "ru", "split": "test", "extra": 1}\n',
        encoding="utf-8",
    )
    rows = bench.read_rows(path)
    assert [(r.text, r.split, r.locale or r.lang) for r in rows] == [
        ("hi", "train", "en"),
        ("привет", "test", "ru"),
    ]
    path.write_text('{"text": "no intent"}\n', encoding="utf-8")
    with pytest.raises(bench.BenchError, match="d.jsonl:1"):
        bench.read_rows(path)


def test_carve_val_is_stratified_deterministic_and_disjoint() -> None:
    rows = _rows({"a.x": 100, "b.y": 40, "c.z": 7, "d.w": 1})
    keep, val = bench.carve_val(rows, seed=13)
    assert Counter(r.intent for r in val) == {"a.x": 10, "b.y": 4, "c.z": 1}  # a lone row stays in train
    assert sorted(keep + val, key=rows.index) == rows
    assert keep == [r for r in rows if r not in val]  # original order kept
    assert bench.carve_val(rows, seed=13) == (keep, val)
    assert bench.carve_val(rows, seed=14)[1] != val


@pytest.mark.parametrize(("limit", "expected"), [(None, 60), (100, 60), (30, 30), (7, 7)])
def test_subsample_spreads_over_intents(limit: int | None, expected: int) -> None:
    rows = _rows({"a.x": 40, "b.y": 15, "c.z": 5})
    got = bench.subsample(rows, limit, seed=13)
    assert len(got) == expected
    assert got == sorted(got, key=rows.index)
    counts = Counter(r.intent for r in got)
    assert set(counts) == {"a.x", "b.y", "c.z"}
    if limit == 30:
        assert counts == {"a.x": 13, "b.y": 12, "c.z": 5}  # round-robin until c.z runs out


def _fake_eval(tmp_path: Path) -> tuple[bench.EvalOutput, Path]:
    rng = random.Random(0)
    test = []
    for i in range(200):
        gold = "oos" if i % 5 == 0 else f"intent.{i % 3}"
        conf = rng.random()
        intent = gold if gold != "oos" and rng.random() < conf else f"intent.{(i + 1) % 3}"
        outcome = "accept" if conf > 0.8 else "abstain" if conf > 0.4 else "reject"
        test.append(metrics.Prediction("t", gold, intent, conf, outcome, 2.0 + conf, 1.0 + conf, "en"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"\0" * 1234)
    ev = bench.EvalOutput(
        model_id="m-1", threads=1, warmup=32, torch_loaded=False, peak_rss_mb=123.4, ru_maxrss_mb=900.0,
        gate={"accept": 0.8, "reject": 0.4, "margin": 0.1}, ranker_info={"kind": "fake"}, policy_overlap=[],
        val=test[:100], test=test[100:],
    )  # fmt: skip
    return ev, model


def test_report_has_the_issue_keys_and_renders(tmp_path: Path) -> None:
    ev, model = _fake_eval(tmp_path)
    scores = metrics.score(ev.test, ev.val)
    meta = {
        "command": "python -m tools.bench --data d.jsonl --out o", "data": "d.jsonl", "seed": 13,
        "train_rows": 10, "use_oos_train": False, "val_rows": 100, "val_source": "val",
    }  # fmt: skip
    report = bench.build_report(scores, ev, model_dir=model, train_seconds=12.34, meta=meta)
    assert ISSUE_KEYS <= set(report)
    assert report["model_bytes"] == 1234
    assert report["train_seconds"] == 12.3
    assert report["peak_rss_mb"] == 123.4
    assert report["evaluation"]["torch_loaded"] is False
    assert set(report["per_intent"]) == {"intent.0", "intent.1", "intent.2"}
    assert json.loads(json.dumps(report)) == report  # plain JSON all the way down

    bench._render(scores, report, tmp_path, "toy")
    for name in ("reliability.png", "risk_coverage.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| In-scope accuracy |" in md
    assert "python -m tools.bench --data d.jsonl --out o" in md
    assert "## Definitions" in md


def test_evaluate_only_needs_a_model(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi", "intent": "a.b", "split": "test"}\n', encoding="utf-8")
    assert bench.main(["--evaluate-only", "--data", str(data), "--out", str(tmp_path / "o")]) == 2


_HAS_TRAINER = all(importlib.util.find_spec(m) is not None for m in ("tools.train", "skill.ranker"))

_TEMPLATES = {
    "lights.on": [
        "turn on the {} lights",
        "switch the {} lamp on",
        "lights on in the {}",
        "make the {} bright",
    ],
    "music.play": [
        "play some {} music",
        "put on {} songs",
        "start the {} playlist",
        "i want to hear {} tunes",
    ],
    "weather.get": [
        "what is the weather like {}",
        "will it rain {}",
        "forecast for {}",
        "is it cold outside {}",
    ],
}
_FILLERS = {
    "lights.on": ["kitchen", "bedroom", "hall", "office", "garage", "attic", "porch"],
    "music.play": ["jazz", "rock", "calm", "classical", "party", "piano", "folk"],
    "weather.get": ["today", "tomorrow", "tonight", "this weekend", "on monday", "in the morning", "later"],
}
_OOS = [
    "tell me about the roman empire",
    "how tall is a giraffe",
    "book a table for two",
    "what is my blood type",
]


def _write_dataset(path: Path) -> None:
    lines = []
    for intent, templates in _TEMPLATES.items():
        cells = [t.format(f) for t in templates for f in _FILLERS[intent]]  # 28 per intent
        random.Random(intent).shuffle(cells)
        lines += [{"text": t, "intent": intent, "lang": "en", "split": "train"} for t in cells[:20]]
        lines += [{"text": t, "intent": intent, "lang": "en", "split": "test"} for t in cells[20:]]
    lines += [{"text": t, "intent": "oos", "lang": "en", "split": "test"} for t in _OOS]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_TRAINER, reason="tools.train / skill.ranker not there yet")
def test_end_to_end_on_generated_data(tmp_path: Path) -> None:
    data, out = tmp_path / "tiny.jsonl", tmp_path / "out"
    _write_dataset(data)
    argv = ["--data", str(data), "--out", str(out), "--catalog", str(REPO_ROOT / "catalog")]
    assert bench.main(argv) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert ISSUE_KEYS <= set(report)
    assert report["counts"] == {"test": 28, "inscope": 24, "oos": 4, "val": 6}  # 10% of 20 per intent
    assert report["meta"]["val_source"].startswith("carved from train")
    assert report["evaluation"]["torch_loaded"] is False
    assert report["model_bytes"] > 0 and report["train_seconds"] > 0
    assert 0 < report["peak_rss_mb"] < 2048
    assert report["inscope_accuracy"] >= 0.6  # three easy intents: far above chance (1/3)
    assert report["oos_auroc"] is not None
    assert report["pipeline_p50_ms"] >= report["neural_p50_ms"] > 0
    assert abs(report["accept_rate"] + report["abstain_rate"] + report["reject_rate"] - 1.0) < 1e-9
    preds = msgspec.json.decode((out / bench.PREDICTIONS_NAME).read_bytes(), type=bench.EvalOutput)
    assert len(preds.test) == 28 and len(preds.val) == 6
    for name in ("report.md", "reliability.png", "risk_coverage.png"):
        assert (out / name).stat().st_size > 0


_ARTISTS = ["queen", "abba", "metallica", "adele", "coldplay", "nirvana", "madonna", "shakira", "eminem",
            "oasis", "radiohead", "blur", "muse", "u2", "sting", "bjork", "prince", "beyonce"]  # fmt: skip
_PLACES = ["paris", "oslo", "lima", "cairo", "tokyo", "dublin", "quito", "accra", "perth", "hanoi",
           "lagos", "turin", "porto", "bern", "kiev", "riga", "baku", "doha"]  # fmt: skip


def _span_rows(name: str, templates: list[str], slot: str, fillers: list[str], split: str) -> list[dict]:
    rows = []
    for i, value in enumerate(fillers):
        t = templates[i % len(templates)]
        start = t.index("{}")
        text = t.format(value)
        rows.append({"text": text, "intent": name, "lang": "en", "split": split,
                     "spans": [{"start": start, "end": start + len(value), "slot": slot}]})  # fmt: skip
    return rows


@pytest.mark.skipif(not _HAS_TRAINER, reason="tools.train / skill.ranker not there yet")
def test_bench_reports_slot_scores_on_unseen_names(tmp_path: Path) -> None:
    music = ["play something by {}", "put on {} please", "i want to hear {}", "play {} now"]
    travel = ["book a trip to {}", "flights to {} please", "i want to fly to {}", "find hotels in {}"]
    lines = (
        _span_rows("PlayMusic", music, "artist", _ARTISTS[:14], "train")
        + _span_rows("BookTrip", travel, "place", _PLACES[:14], "train")
        + _span_rows("PlayMusic", music, "artist", _ARTISTS[14:], "test")  # names never seen in training
        + _span_rows("BookTrip", travel, "place", _PLACES[14:], "test")
        + [{"text": t, "intent": "oos", "lang": "en", "split": "test"} for t in _OOS[:2]]
    )
    data, out = tmp_path / "spans.jsonl", tmp_path / "out"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    argv = ["--data", str(data), "--out", str(out), "--catalog", str(REPO_ROOT / "catalog")]
    assert bench.main(argv) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert {"slot_precision", "slot_recall", "slot_f1", "frame_accuracy", "slot_f1_by_slot"} <= set(report)
    assert set(report["slot_f1_by_slot"]) >= {"artist", "place"}
    assert report["slot_f1"] >= 0.5, report["slot_f1_by_slot"]
    # A file without spans is intent-only: the slot keys are there and null.
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in x.items() if k != "spans"}) + "\n" for x in lines))
    assert (
        bench.main(
            ["--data", str(plain), "--out", str(tmp_path / "o2"), "--catalog", str(REPO_ROOT / "catalog")]
        )
        == 0
    )
    report = json.loads((tmp_path / "o2" / "report.json").read_text(encoding="utf-8"))
    assert report["slot_f1"] is None and report["slot_f1_by_slot"] is None
