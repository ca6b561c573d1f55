"""The LLM fallback through the real llama.cpp library, with tiny GGUF models the tests write themselves."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from skill.canonicalize import Canonical, Canonicalizer
from skill.catalog import Catalog, load_catalog
from skill.config import Config
from skill.decision import Candidate, Decision, Outcome
from skill.llm import Engine, LlmOff, LlmStage, prefix_cache_path
from skill.llm_prompt import (
    NONE,
    VAL_EVERY,
    LlmSettings,
    calibrated_shares,
    example_line,
    fewshot_examples,
    fewshot_prefix,
    labels,
    llm_features,
    normalise,
    plan_batch,
    sidecar_path,
)
from skill.pipeline import Pipeline
from skill.regex_stage import RegexStage
from skill.service import ServiceState
from tests.conftest import MINI_INTENTS, REPO, write_catalog
from tools.tiny_gguf import write_tiny_gguf


def prefer(text: str, weight: float = 2.0) -> dict[str, float]:
    """Steer a tiny model towards the bytes of ``text``: the continuation made of them wins.

    The tiny models' SentencePiece vocabulary writes a space as U+2581, three byte tokens.
    """
    return {chr(b): weight for b in set(text.replace(" ", "\u2581").encode())}


# The mini catalog's intents read "alarm set", "device turn off", "desktop reset webspace".
SAYS_ALARM = prefer(" alarm set\n")
SAYS_NONE = prefer(" none\n")


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return load_catalog(write_catalog(tmp_path / "catalog"))


@pytest.fixture
def stage_factory(tmp_path: Path, catalog: Catalog, make_config: Callable[..., Config]) -> Iterator[Any]:
    stages: list[LlmStage] = []

    def _make(steer: dict[str, float] | None = None, seed: int = 0, **cfg: Any) -> LlmStage:
        path = write_tiny_gguf(tmp_path / f"tiny-{seed}-{len(stages)}.gguf", seed=seed, prefer=steer)
        cfg.setdefault("llm_threads", 1)  # two threads on a busy 2-core box spin in barriers
        stage = LlmStage.load(make_config(llm_model=str(path), **cfg), catalog)
        stages.append(stage)
        return stage

    yield _make
    for stage in stages:
        stage.close()


def canon(catalog: Catalog, text: str) -> Canonical:
    return Canonicalizer(catalog).canonicalize(text)


def proposal(top: str = "device.turn_off", conf: float = 0.6) -> Decision:
    return Decision(
        intent=top,
        confidence=conf,
        outcome=Outcome.ABSTAIN,
        via="neural",
        alternatives=(Candidate("alarm.set", 0.3), Candidate("desktop.reset_webspace", 0.05)),
        evidence={"matched_examples": ["выключи {device}"]},
        reason="low_confidence",
    )


# --- prompt and batch layout (pure) -----------------------------------------------------------------


def test_labels_are_words_and_stay_unique() -> None:
    names = labels(["device.turn_off", "alarm.set", "a.b_c", "a_b.c"])
    assert names["device.turn_off"] == "device turn off" and names[NONE] == "none"
    assert names["a.b_c"] == "a.b_c" and names["a_b.c"] == "a_b.c"  # both would read "a b c"
    assert len(set(names.values())) == len(names)


def test_fewshot_examples_go_round_robin_and_never_use_held_out_rows() -> None:
    repo = load_catalog(REPO / "catalog")
    settings = LlmSettings(examples_per_intent=2, none_examples=3)
    pairs = fewshot_examples(repo, settings)
    first_round = pairs[: len({i for _, i in pairs if i != NONE}) * 2]
    assert len({i for _, i in first_round}) > len(repo.intents) // 2  # every intent before any second one
    held = {
        t
        for intent in repo.intents.values()
        for texts in intent.examples.values()
        for k, t in enumerate(texts)
        if k % VAL_EVERY == VAL_EVERY - 1
    }
    assert not held & {t for t, _ in pairs}
    assert sum(i == NONE for _, i in pairs) <= 3 * len(repo.out_of_scope)


def test_prefix_fits_its_token_budget_and_is_deterministic() -> None:
    repo = load_catalog(REPO / "catalog")
    settings = LlmSettings(max_prefix_tokens=300)
    text, chosen = fewshot_prefix(repo, settings, len)  # a character per token
    assert len(text) <= 300 and chosen
    assert text == "".join(example_line(t, labels(list(repo.intents))[i]) for t, i in chosen)
    assert fewshot_prefix(repo, settings, len) == (text, chosen)
    last = chosen[-1][1]
    assert any(i != last for _, i in chosen[-3:]) or len(chosen) < 3  # shuffled, not in catalog order


def test_batch_plan_shares_the_request_and_common_prefixes() -> None:
    # three continuations: [5, 6, 7], [5, 6, 8], [9]; the request is [1, 2] at position 10
    plan = plan_batch([1, 2], [[5, 6, 7], [5, 6, 8], [9]], start=10)
    assert plan.tokens == (1, 2, 5, 6)  # 5 and 6 once; last tokens are read, not evaluated
    assert plan.pos == (10, 11, 12, 13)
    assert plan.seq_ids == ((0, 1, 2), (0, 1, 2), (0, 1), (0, 1))
    assert plan.logits == (False, True, True, True) and plan.logit_rows == 3
    assert plan.reads == (((1, 5), (2, 6), (3, 7)), ((1, 5), (2, 6), (3, 8)), ((1, 9),))
    with pytest.raises(ValueError):
        plan_batch([], [[1]], 0)


def test_shares_features_and_calibrated_split() -> None:
    p = normalise([math.log(3.0), 0.0, 0.0])
    assert p == pytest.approx([0.6, 0.2, 0.2])
    assert normalise([1.0, 0.0], temperature=1e6) == pytest.approx([0.5, 0.5], abs=1e-5)
    probs = {"a": 0.6, "b": 0.3, NONE: 0.1}
    f = llm_features(probs, "a", [("b", 0.7), ("a", 0.2)])
    assert f == pytest.approx([math.log(1.5), math.log(1.5) - math.log(0.3 / 0.7), 0.2, 0.0])
    shown = calibrated_shares(probs, "a", 0.2)
    assert shown == pytest.approx({"a": 0.2, "b": 0.6, NONE: 0.2})


# --- through llama.cpp ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_every_answer_names_a_candidate_or_none(stage_factory: Any, catalog: Catalog, seed: int) -> None:
    stage = stage_factory(seed=seed)
    for text in ("разбуди меня пораньше", "turn everything off", "сбрось всё"):
        d = stage.decide_fallback(canon(catalog, text), proposal())
        cands = [c["intent"] for c in d.evidence["candidates"]]
        assert cands == ["device.turn_off", "alarm.set", "desktop.reset_webspace", NONE]
        assert d.via == "llm" and d.evidence["chosen"] in cands
        assert sum(d.evidence["llm_shares"].values()) == pytest.approx(1.0)
        assert all(c["loglik"] < 0 for c in d.evidence["candidates"])
        if d.intent is None:
            assert (d.outcome, d.reason) == (Outcome.ABSTAIN, "llm_none")
        else:
            assert d.intent in catalog.intents and 0.0 < d.confidence <= 1.0 and d.slots == {}
            assert [a.confidence for a in d.alternatives] == sorted(
                (a.confidence for a in d.alternatives), reverse=True
            )
        assert d.evidence["logit_rows"] < d.evidence["batch_tokens"] + 1
        assert d.evidence["prompt_tokens"] < d.evidence["cached_prefix_tokens"]


def test_model_that_prefers_none_abstains(stage_factory: Any, catalog: Catalog) -> None:
    d = stage_factory(SAYS_NONE).decide_fallback(canon(catalog, "как дела"), proposal())
    assert (d.intent, d.outcome, d.reason, d.via) == (None, Outcome.ABSTAIN, "llm_none", "llm")
    assert d.evidence["p_none"] > 0.99


def test_steered_model_picks_its_candidate(stage_factory: Any, catalog: Catalog) -> None:
    d = stage_factory(SAYS_ALARM).decide_fallback(canon(catalog, "разбуди меня пораньше"), proposal())
    assert (d.intent, d.outcome, d.via) == ("alarm.set", Outcome.ACCEPT, "llm")
    assert d.confidence > 0.98 and d.slots == {}
    cands = {c["intent"]: c for c in d.evidence["candidates"]}
    assert cands["device.turn_off"]["score"] == 0.6 and cands["device.turn_off"]["llm"] < 0.01
    assert d.evidence["calibrated"] is False


def test_only_the_rankers_candidates_and_none_compete(stage_factory: Any, catalog: Catalog) -> None:
    stage = stage_factory(SAYS_ALARM)
    p = Decision(
        "device.turn_off", 0.6, Outcome.ABSTAIN, "neural", (Candidate("desktop.reset_webspace", 0.1),)
    )
    d = stage.decide_fallback(canon(catalog, "разбуди меня"), p)
    assert [c["intent"] for c in d.evidence["candidates"]] == [
        "device.turn_off",
        "desktop.reset_webspace",
        NONE,
    ]
    assert d.intent != "alarm.set"  # the model likes it best, but the ranker did not offer it


def test_temperature_comes_from_the_sidecar(
    tmp_path: Path, catalog: Catalog, make_config: Callable[..., Config]
) -> None:
    path = write_tiny_gguf(tmp_path / "t.gguf", prefer=SAYS_ALARM)
    sidecar_path(path).write_text(json.dumps({"temperature": 1000.0}))
    stage = LlmStage.load(make_config(llm_model=str(path), llm_threads=1), catalog)
    d = stage.decide_fallback(canon(catalog, "разбуди меня"), proposal())
    stage.close()
    assert d.evidence["temperature"] == 1000.0 and d.evidence["chosen"] == "alarm.set"
    assert d.confidence < 0.5 < d.evidence["probability_raw"]
    sidecar_path(path).write_text(json.dumps({"temprature": 2.0}))
    with pytest.raises(ValueError, match="temprature"):
        LlmSettings.for_model(path)


def test_context_too_small_fails_the_load_and_long_requests_abstain(
    tmp_path: Path, catalog: Catalog, make_config: Callable[..., Config]
) -> None:
    path = write_tiny_gguf(tmp_path / "c.gguf", prefer=SAYS_ALARM)
    sidecar = sidecar_path(path)
    sidecar.write_text(json.dumps({"n_ctx": 256, "max_prefix_tokens": 1024}))
    with pytest.raises(ValueError, match="raise n_ctx"):
        LlmStage.load(make_config(llm_model=str(path), llm_threads=1), catalog)
    sidecar.write_text(json.dumps({"max_request_tokens": 40}))
    stage = LlmStage.load(make_config(llm_model=str(path), llm_threads=1), catalog)
    d = stage.decide_fallback(canon(catalog, "разбуди меня " * 3), proposal())
    assert (d.intent, d.outcome, d.reason) == (None, Outcome.ABSTAIN, "llm_prompt_too_long")
    assert stage.decide_fallback(canon(catalog, "разбуди"), proposal()).intent == "alarm.set"
    stage.close()


def _naive(engine: Engine, request: list[int], cont: list[int], size: int) -> float:
    """One candidate in one sequence, with logits at every token it is read at: no sharing, no trie.

    The batch is padded to ``size`` tokens with tokens after the candidate's (causally invisible to
    it): llama.cpp takes other matmul paths for other batch sizes, and a quantized model's numbers
    then differ in the second decimal.
    """
    start = len(engine.prefix)
    engine.rewind()
    tail = [*request, *cont[:-1]]
    tail += [request[0]] * max(0, size - len(tail))
    flags = [False] * (len(request) - 1) + [True] * len(cont)
    flags += [False] * (len(tail) - len(flags))
    engine._decode(tail, range(start, start + len(tail)), [(0,)] * len(tail), flags)
    total = 0.0
    for j, tok in enumerate(cont):
        logits, norm = engine.log_norm(len(request) - 1 + j)
        total += float(logits[tok]) - norm
    engine.rewind()
    return total


def test_the_line_end_is_scored_only_when_a_label_starts_another(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    intents = copy.deepcopy(MINI_INTENTS)
    daily = copy.deepcopy(intents["intents"][0])
    daily["intent"], daily["regex"] = "alarm.set_daily", []
    daily["examples"] = {"ru": ["будильник каждый день в семь"], "en": ["an alarm every day at seven"]}
    intents["intents"].append(daily)
    catalog = load_catalog(write_catalog(tmp_path / "catalog", intents))
    path = write_tiny_gguf(tmp_path / "d.gguf", prefer=SAYS_ALARM)
    stage = LlmStage.load(make_config(llm_model=str(path), llm_threads=1), catalog)
    try:
        newline = stage.engine.tokenize("\n")[-1]
        plain = stage.continuations(["alarm.set", "device.turn_off", NONE])
        assert all(c[-1] != newline for c in plain)  # "alarm set" starts no other label here
        both = stage.continuations(["alarm.set", "alarm.set_daily", NONE])
        assert all(c[-1] == newline for c in both)  # "alarm set" is a prefix of "alarm set daily"
        s = stage.score("разбуди меня", ["alarm.set", "alarm.set_daily"])
        assert s.logliks[0] != s.logliks[1]
    finally:
        stage.close()


def test_prefix_cache_gives_the_same_scores_as_a_fresh_context(stage_factory: Any, catalog: Catalog) -> None:
    texts = ["разбуди меня пораньше", "turn everything off", "сбрось всё", "разбуди меня пораньше"]
    names = ["device.turn_off", "alarm.set", "desktop.reset_webspace"]
    warm = stage_factory(seed=7)
    cached = [warm.score(t, names).logliks for t in texts]
    fresh = [stage_factory(seed=7).score(t, names).logliks for t in texts]
    assert cached == pytest.approx(fresh, rel=1e-4, abs=1e-4)
    assert cached[0] == pytest.approx(cached[3], rel=1e-5, abs=1e-5)  # nothing of earlier requests leaks
    # and one sequence per candidate, no sharing, gives the same numbers as the shared batch
    request = warm.request_tokens(texts[1])
    size = warm.score(texts[1], names).batch_tokens
    naive = [_naive(warm.engine, request, c, size) for c in warm.continuations([*names, NONE])]
    assert naive == pytest.approx(list(cached[1]), rel=1e-5, abs=1e-5)


def test_the_evaluated_prefix_is_kept_on_disk_for_the_next_load(
    tmp_path: Path, catalog: Catalog, make_config: Callable[..., Config]
) -> None:
    text, names = "разбуди меня пораньше", ["device.turn_off", "alarm.set"]
    path = write_tiny_gguf(tmp_path / "k.gguf", seed=5)
    cfg = make_config(llm_model=str(path), llm_threads=1)
    first = LlmStage.load(cfg, catalog)
    cache = prefix_cache_path(path, first.engine.prefix, first.engine, first.settings)
    expected = first.score(text, names).logliks
    first.close()
    assert first.prefix_from == "evaluated" and cache.is_file()
    assert not cache.is_relative_to(Path.home())  # the tests' user cache dir (conftest), not $HOME
    second = LlmStage.load(cfg, catalog)
    assert second.prefix_from == "disk cache"
    assert second.score(text, names).logliks == pytest.approx(expected, rel=1e-6, abs=1e-6)
    second.close()
    cache.write_bytes(b"not a llama.cpp state" * 50)  # damaged: evaluated again, and rewritten
    third = LlmStage.load(cfg, catalog)
    assert third.prefix_from == "evaluated"
    assert third.score(text, names).logliks == pytest.approx(expected, rel=1e-6, abs=1e-6)
    third.close()
    again = LlmStage.load(cfg, catalog)
    assert again.prefix_from == "disk cache"
    again.close()
    off = write_tiny_gguf(tmp_path / "off.gguf", seed=5)
    sidecar_path(off).write_text(json.dumps({"prefix_cache": False}))
    stage = LlmStage.load(make_config(llm_model=str(off), llm_threads=1), catalog)
    assert stage.prefix_from == "evaluated"
    assert not prefix_cache_path(off, stage.engine.prefix, stage.engine, stage.settings).exists()
    stage.close()


# --- never block -------------------------------------------------------------------------------------


def test_budget_runs_out_while_waiting_for_the_slot(stage_factory: Any, catalog: Catalog) -> None:
    stage = stage_factory(SAYS_ALARM, llm_budget_ms=200)
    with stage._slot:  # another request is scoring
        started = time.monotonic()
        d = stage.decide_fallback(canon(catalog, "разбуди меня"), proposal())
        elapsed = time.monotonic() - started
    assert (d.intent, d.outcome, d.reason, d.via) == (None, Outcome.ABSTAIN, "llm_timeout", "llm")
    assert 0.15 < elapsed < 1.0 and d.evidence["where"] == "waiting"
    assert stage.decide_fallback(canon(catalog, "разбуди меня"), proposal()).intent == "alarm.set"


class TickingClock:
    """Reads 1, 2, 3, ... seconds: a budget of ``k + 0.5`` s runs out at the clock's ``k + 2``-th read."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return float(self.reads)


@pytest.mark.parametrize(
    ("seed", "text"), [(1, "разбуди меня пораньше"), (2, "turn everything off"), (3, "сбрось всё")]
)
def test_budget_runs_out_at_every_check_and_the_late_answer_is_dropped(
    stage_factory: Any, catalog: Catalog, seed: int, text: str
) -> None:
    stage = stage_factory(seed=seed)
    c = canon(catalog, text)
    stage.clock = clock = TickingClock()
    stage.budget_s = 1e6
    expected = stage.decide_fallback(c, proposal())
    reads = clock.reads  # start, slot wait, before the scoring step, the late check, the ms
    assert expected.reason != "llm_timeout" and reads == 5
    wheres = []
    for k in range(reads - 2):  # the deadline passes at every check in turn, the last one included
        stage.clock = TickingClock()
        stage.budget_s = k + 0.5
        d = stage.decide_fallback(c, proposal())
        assert (d.intent, d.outcome, d.reason, d.via) == (None, Outcome.ABSTAIN, "llm_timeout", "llm"), k
        wheres.append(d.evidence["where"])
    assert wheres == ["scoring", "scoring", "finished late"]  # a free slot is taken even with no time left
    stage.clock = TickingClock()
    stage.budget_s = reads - 2 + 0.5  # passes only after the answer is final
    again = stage.decide_fallback(c, proposal())  # nothing of the aborted runs leaks into this one
    assert again.evidence["candidates"] == expected.evidence["candidates"]
    assert (again.intent, again.confidence) == (expected.intent, expected.confidence)


def test_full_queue_answers_at_once_and_waiters_still_get_answers(
    stage_factory: Any, catalog: Catalog
) -> None:
    stage = stage_factory(SAYS_ALARM, llm_queue=2, llm_budget_ms=10_000)
    c = canon(catalog, "разбуди меня")
    results: list[Decision] = []
    stage._slot.acquire()  # a long scoring step holds the slot
    try:
        waiters = [
            threading.Thread(target=lambda: results.append(stage.decide_fallback(c, proposal())))
            for _ in range(3)
        ]  # two queue, the third scores... once the slot frees
        for t in waiters[:2]:
            t.start()
        for _ in range(200):
            if stage._pending == 2:
                break
            time.sleep(0.01)
        assert stage._pending == 2
        waiters[2].start()
        for _ in range(200):
            if stage._pending == 3:
                break
            time.sleep(0.01)
        started = time.monotonic()
        d = stage.decide_fallback(c, proposal())  # 1 holding (simulated) is not counted: 3 pending > 2
        assert time.monotonic() - started < 0.2
        assert (d.intent, d.outcome, d.reason) == (None, Outcome.ABSTAIN, "llm_queue_full")
    finally:
        stage._slot.release()
    for t in waiters:
        t.join(10)
    assert [r.intent for r in results] == ["alarm.set"] * 3


# --- loading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "not found"),
        (b"this is not a model", "not a GGUF file"),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "Failed to load model"),
    ],
)
def test_missing_or_broken_model_disables_the_stage_and_health_says_why(
    tmp_path: Path, mini_catalog: Path, make_config: Callable[..., Config], content: bytes | None, error: str
) -> None:
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    cfg = make_config(catalog_dir=str(mini_catalog), llm_model=str(path), llm_threads=1)
    with pytest.raises((OSError, ValueError), match=error):
        LlmStage.load(cfg, load_catalog(mini_catalog))
    state = ServiceState(cfg)
    state.load()
    llm = state.health()["stages"]["llm"]
    assert llm["ready"] is False and llm["detail"].startswith("disabled:") and error in llm["detail"]
    assert state.pipeline is not None and state.pipeline.llm is None


def test_service_loads_the_stage_when_configured(
    tmp_path: Path, mini_catalog: Path, make_config: Callable[..., Config]
) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", prefer=SAYS_ALARM)
    state = ServiceState(make_config(catalog_dir=str(mini_catalog), llm_model=str(path), llm_threads=1))
    state.load()
    llm = state.health()["stages"]["llm"]
    assert llm["ready"] is True
    assert llm["detail"].startswith("tiny.gguf (confidence uncalibrated, temperature 1")
    assert isinstance(state.pipeline.llm, LlmStage) if state.pipeline else False
    state.pipeline.llm.close() if state.pipeline and state.pipeline.llm else None


def test_a_stage_the_calibration_turned_off_is_not_loaded_and_health_says_why(
    tmp_path: Path, mini_catalog: Path, make_config: Callable[..., Config]
) -> None:
    path = write_tiny_gguf(tmp_path / "off.gguf", prefer=SAYS_ALARM)
    held = {"rows_handed": 60, "rescued": 3, "rescue_rate": 0.05, "accepted_precision": 0.5}
    sidecar_path(path).write_text(json.dumps({"accept": False, "calibration_report": {"held_out": held}}))
    cfg = make_config(catalog_dir=str(mini_catalog), llm_model=str(path), llm_threads=1)
    with pytest.raises(LlmOff, match="rescues 5 %, accepted precision 50 % on 60 held-out rows"):
        LlmStage.load(cfg, load_catalog(mini_catalog))
    state = ServiceState(cfg)
    state.load()
    llm = state.health()["stages"]["llm"]
    assert llm["ready"] is False
    assert llm["detail"].startswith("disabled: LlmOff: LLM stage: rescues 5 %, accepted precision 50 %")
    assert "below the 90 % precision target" in llm["detail"]
    assert state.pipeline is not None and state.pipeline.llm is None


def test_importing_the_stage_does_not_need_llama_cpp() -> None:
    code = "import sys, skill.llm, skill.service; sys.exit('llama_cpp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


# --- end to end through the pipeline -------------------------------------------------------------------


class AbstainingRanker:
    """A stub ranker whose answer the gate turns into an abstention (0.6 < accept 0.8)."""

    model_id = "stub-ranker"

    @property
    def thresholds(self) -> dict[str, float]:
        return {"accept": 0.8, "reject": 0.45, "margin": 0.1}

    def decide(self, canonical: Canonical) -> Decision:
        return Decision(
            "device.turn_off",
            0.6,
            Outcome.ACCEPT,
            "neural",
            alternatives=(Candidate("alarm.set", 0.3),),
            evidence={"matched_examples": ["выключи {device}"], "softmax": 0.6},
        )


def _pipeline(catalog: Catalog, llm: LlmStage) -> Pipeline:
    return Pipeline(
        catalog, Canonicalizer(catalog), regex=RegexStage(catalog), ranker=AbstainingRanker(), llm=llm
    )


def test_pipeline_lets_the_llm_settle_an_abstention_and_fills_slots_itself(
    stage_factory: Any, catalog: Catalog
) -> None:
    result = _pipeline(catalog, stage_factory(SAYS_ALARM)).parse("разбуди меня пожалуйста в 7:30")
    d = result.decision
    assert (d.intent, d.outcome, d.via) == ("alarm.set", Outcome.ACCEPT, "llm")
    assert d.slots == {"time": "07:30"}  # from canonicalization, not from the model
    assert [s.stage for s in result.stages] == ["canonicalize", "regex", "neural", "llm"]
    assert result.stages[2].outcome == "abstain" and result.stages[3].outcome == "accept"
    assert d.evidence["candidates"][0]["intent"] == "device.turn_off"
    assert d.evidence["candidates"][0]["llm"] == pytest.approx(0.0, abs=0.01)


def test_pipeline_keeps_the_ranker_abstention_when_the_llm_says_none(
    stage_factory: Any, catalog: Catalog
) -> None:
    result = _pipeline(catalog, stage_factory(SAYS_NONE)).parse("расскажи о своих чувствах")
    d = result.decision
    assert (d.intent, d.outcome, d.via, d.reason) == (
        "device.turn_off",
        Outcome.ABSTAIN,
        "neural",
        "low_confidence",
    )
    assert d.evidence["llm"]["reason"] == "llm_none" and d.evidence["llm"]["outcome"] == "abstain"
