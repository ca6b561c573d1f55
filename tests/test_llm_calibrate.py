"""Fitting the LLM fallback's confidence (tools.llm_calibrate) and serving with the fitted map."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest

from skill.canonicalize import Canonicalizer
from skill.catalog import load_catalog
from skill.config import Config
from skill.decision import Candidate, Decision, Outcome
from skill.gate import GateConfig, gate
from skill.llm import LlmOff, LlmStage
from skill.llm_prompt import LLM_FEATURES, LlmSettings, llm_features, sidecar_path
from skill.scoring import calibrate
from skill.service import ServiceState
from tests.conftest import MINI_INTENTS, REPO, write_catalog
from tools import llm_calibrate
from tools.tiny_gguf import write_tiny_gguf

SAYS_ALARM = {chr(b): 2.0 for b in set(" alarm set\n".replace(" ", "\u2581").encode())}  # whatever the prompt


def _rows(path: Path, rows: list[tuple[str, str]], split: str = "val") -> Path:
    path.write_text(
        "".join(
            json.dumps({"text": t, "intent": i, "lang": "ru", "split": split}, ensure_ascii=False) + "\n"
            for t, i in rows
        ),
        encoding="utf-8",
    )
    return path


HALF_RIGHT = [(f"разбуди меня в {h} часов", "alarm.set") for h in range(1, 13)] + [
    (f"выключи лампу номер {n}", "device.turn_off") for n in range(1, 13)
]


def test_features_are_the_log_odds_the_margin_and_the_rankers_view() -> None:
    f = llm_features({"a": 0.1, "b": 0.9}, "b", [("a", 0.6), ("b", 0.3)])
    assert f == pytest.approx([np.log(9.0), np.log(9.0) - np.log(1 / 9), 0.3, 0.0])
    assert llm_features({"a": 1.0}, "a", [("a", 0.6)])[0] == pytest.approx(np.log((1 - 1e-6) / 1e-6))
    assert list(llm_features({"z": 0.5, "none": 0.5}, "z", [])) == [0.0, 0.0, 0.0, 0.0]


def test_an_overconfident_model_is_pulled_down_and_turned_off(
    tmp_path: Path, mini_catalog: Path, make_config: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    """The steered model says alarm.set with p > 0.98 for everything; it is right on half the rows."""
    model = write_tiny_gguf(tmp_path / "tiny.gguf", prefer=SAYS_ALARM)
    sidecar_path(model).write_text(json.dumps({"n_batch": 256}))
    data = _rows(tmp_path / "rows.jsonl", HALF_RIGHT)
    args = ["--llm-model", str(model), "--catalog", str(mini_catalog), "--data", str(data)]
    assert llm_calibrate.main([*args, "--no-ranker", "--rows", "all", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert report["rows"] == 24 and report["accuracy"] == 0.5 and report["mean_raw_probability"] > 0.98
    assert report["ece_raw"] > 0.45 and report["ece_fit"] < 0.05 and report["ece_crossfit"] < 0.1
    assert abs(report["mean_confidence"] - 0.5) < 0.02
    held = report["held_out"]
    assert held["rows_handed"] == 24 and held["rescued"] == 0 and held["accepted_precision"] is None
    assert report["accept"] is False  # nothing it says can be trusted at the gate: off

    stored = json.loads(sidecar_path(model).read_text())
    assert stored["n_batch"] == 256 and stored["accept"] is False  # other keys survive
    assert stored["calibration"]["features"] == list(LLM_FEATURES)
    settings = LlmSettings.for_model(model)
    assert settings.calibration is not None and settings.calibration_report == stored["calibration_report"]

    catalog = load_catalog(mini_catalog)
    cfg = make_config(llm_model=str(model), llm_threads=1)
    with pytest.raises(LlmOff, match="rescues 0 %, accepted precision n/a .* on 24 held-out rows"):
        LlmStage.load(cfg, catalog)
    # served anyway (as tools.bench_llm measures it): the map's confidence, and the gate abstains
    stage = LlmStage.load(cfg, catalog, settings=msgspec.structs.replace(settings, accept=True))
    try:
        canonical = Canonicalizer(catalog).canonicalize("сделай что-нибудь")
        proposal = Decision("device.turn_off", 0.5, Outcome.ABSTAIN, "neural", (Candidate("alarm.set", 0.3),))
        d = stage.decide_fallback(canonical, proposal)
    finally:
        stage.close()
    assert d.intent == "alarm.set" and d.evidence["calibrated"] is True
    assert d.evidence["probability_tempered"] > 0.98
    cands = [("device.turn_off", 0.5), ("alarm.set", 0.3)]
    expected = calibrate(llm_features(d.evidence["llm_shares"], "alarm.set", cands), settings.calibration)
    assert d.confidence == pytest.approx(float(expected), abs=1e-4)
    assert 0.3 < d.confidence < 0.7
    llm_share = {c["intent"]: c["llm"] for c in d.evidence["candidates"]}
    assert llm_share["alarm.set"] == pytest.approx(d.confidence, abs=1e-4)
    assert sum(llm_share.values()) <= 1.0 + 1e-3
    assert gate(d, GateConfig()).outcome is not Outcome.ACCEPT  # the coin-flip answer is what it is


def test_a_model_that_is_right_is_kept_on_and_health_gives_its_worth(
    tmp_path: Path, make_config: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    # always right, and better than the ranker's view: without a ranker every intent is a candidate
    # in catalog order, and alarm.set comes last here, so "ranker_top" points at the wrong one
    intents = copy.deepcopy(MINI_INTENTS)
    intents["intents"] = intents["intents"][1:] + intents["intents"][:1]
    mini_catalog = write_catalog(tmp_path / "catalog", intents)
    model = write_tiny_gguf(tmp_path / "right.gguf", prefer=SAYS_ALARM)
    rows = [(t, "alarm.set") for t, _ in HALF_RIGHT[:12]] * 2
    data = _rows(tmp_path / "rows.jsonl", rows)
    argv = ["--llm-model", str(model), "--catalog", str(mini_catalog), "--data", str(data), "--json"]
    assert llm_calibrate.main([*argv, "--no-ranker", "--rows", "all"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    held = report["held_out"]
    assert report["accept"] is True and held["rescue_rate"] == 1.0 and held["accepted_precision"] == 1.0
    assert report["held_out_ranker_only"]["rescued"] == 0
    state = ServiceState(make_config(catalog_dir=str(mini_catalog), llm_model=str(model), llm_threads=1))
    state.load()
    llm = state.health()["stages"]["llm"]
    assert llm["ready"] is True
    assert llm["detail"].startswith(
        "right.gguf: LLM stage: rescues 100 %, accepted precision 100 % on 24 held-out rows"
        " (confidence calibrated"
    )
    if state.pipeline is not None and state.pipeline.llm is not None:
        state.pipeline.llm.close()


def test_the_served_path_is_fitted_on_the_rows_the_pipeline_hands_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Repo catalog and embedded ranker; only the rows the pipeline hands to the LLM are used."""
    # steered to letters "none" lacks, so that it names a candidate (an unsteered random model pays
    # about the same per token everywhere, and "none" is the shortest answer)
    letters = {chr(b): 3.0 for b in set("\u2581dvicturmalspyh\n".encode())}
    model = write_tiny_gguf(tmp_path / "rand.gguf", prefer=letters)
    argv = ["--llm-model", str(model), "--catalog", str(REPO / "catalog"), "--json"]
    assert llm_calibrate.main(argv) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert report["mode"] == "abstain" and report["ranker"].startswith("node-default-")
    assert report["answers"] + report["rows_not_sent"] + report["rows_in_prefix"] == report["rows_in"]
    assert report["rows_not_sent"] > report["answers"] >= report["rows"] >= llm_calibrate.MIN_ANSWERS
    assert report["ece_fit"] < report["ece_raw"]
    assert abs(report["mean_confidence"] - report["accuracy"]) < 0.03
    assert report["held_out"]["rows_handed"] == report["answers"]
    assert report["held_out_ranker_only"]["rows_handed"] == report["answers"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("too_few", "at least 20 are needed"),
        ("unknown_intent", "intents not in the catalog: weather.get"),
        ("no_val", "no val rows"),
        ("missing_model", "LLM model file not found"),
        ("no_ranker_abstain", "use --rows all"),
    ],
)
def test_bad_input_exits_2_with_a_reason_and_writes_nothing(
    tmp_path: Path, mini_catalog: Path, case: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf", prefer=SAYS_ALARM)
    rows = HALF_RIGHT[:5] if case == "too_few" else HALF_RIGHT
    if case == "unknown_intent":
        rows = [*rows, ("какая погода", "weather.get")]
    data = _rows(tmp_path / "rows.jsonl", rows, split="train" if case == "no_val" else "val")
    argv = ["--llm-model", str(model if case != "missing_model" else tmp_path / "nope.gguf")]
    argv += ["--catalog", str(mini_catalog), "--data", str(data), "--no-ranker"]
    argv += [] if case == "no_ranker_abstain" else ["--rows", "all"]
    assert llm_calibrate.main(argv) == 2
    assert message in caplog.text
    assert not sidecar_path(model).exists()


@pytest.mark.parametrize(
    "calibration",
    [
        {"features": ["llm_logit"], "mean": [0], "scale": [1], "coef": [1], "bias": 0},
        {"features": list(LLM_FEATURES), "mean": [0, 0], "scale": [1, 1, 1], "coef": [1, 0, 0], "bias": 0},
        {"features": list(LLM_FEATURES), "mean": [0, 0, 0], "scale": [0, 1, 1], "coef": [1, 0, 0], "bias": 0},
        {
            "features": list(LLM_FEATURES),
            "mean": [0, 0, 0],
            "scale": [1, 1, 1],
            "coef": [1, 0, 0],
            "bias": 1e999,
        },
    ],
)
def test_a_damaged_calibration_disables_the_stage_with_the_reason(
    tmp_path: Path, mini_catalog: Path, make_config: Callable[..., Config], calibration: dict[str, object]
) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf", prefer=SAYS_ALARM)
    sidecar_path(model).write_text(json.dumps({"calibration": calibration}).replace("Infinity", "1e999"))
    with pytest.raises(ValueError, match="calibration"):
        LlmSettings.for_model(model)
    state = ServiceState(make_config(catalog_dir=str(mini_catalog), llm_model=str(model), llm_threads=1))
    state.load()
    llm = state.health()["stages"]["llm"]
    assert llm["ready"] is False and "calibration" in llm["detail"]
    assert state.pipeline is not None and state.pipeline.regex is not None  # the service still serves
