"""The LLM fallback through the real llama.cpp library, with tiny GGUF models the tests write themselves."""

from __future__ import annotations

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

from skill.canonicalize import Canonical, Canonicalizer, EntityMatch
from skill.catalog import Catalog, load_catalog
from skill.config import Config
from skill.decision import Candidate, Decision, Outcome
from skill.llm import LlmStage
from skill.llm_grammar import (
    ANSWER_OPEN,
    NONE,
    AnswerShape,
    LlmSettings,
    NameStep,
    gbnf,
    name_probabilities,
    parse_answer,
    progress,
)
from skill.pipeline import Pipeline
from skill.regex_stage import RegexStage
from skill.service import ServiceState
from tests.conftest import REPO, write_catalog
from tools.tiny_gguf import write_tiny_gguf

# Steering: "a" starts only alarm.set in the mini catalog, "n" only "none"; '"' closes slot strings.
SAYS_ALARM = {"a": 1.0, '"': 1.5}
SAYS_ALARM_TIME = {"a": 1.0}  # fills the time slot with "aaa…"
SAYS_NONE = {"n": 1.0}


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return load_catalog(write_catalog(tmp_path / "catalog"))


@pytest.fixture
def stage_factory(tmp_path: Path, catalog: Catalog, make_config: Callable[..., Config]) -> Iterator[Any]:
    stages: list[LlmStage] = []

    def _make(prefer: dict[str, float] | None = None, seed: int = 0, **cfg: Any) -> LlmStage:
        path = write_tiny_gguf(tmp_path / f"tiny-{seed}-{len(stages)}.gguf", seed=seed, prefer=prefer)
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


# --- grammar and skeleton (pure) -------------------------------------------------------------------

SHAPE = AnswerShape(slots={"alarm.set": ("time", "date"), "alarm.cancel": (), NONE: ()}, max_value_chars=8)


@pytest.mark.parametrize(
    ("out", "forced", "complete", "intent"),
    [
        (b"", b"", False, None),
        (b"alarm.", b"", False, None),  # alarm.set or alarm.cancel: the model decides
        (b"alarm.s", b'et", "slots": {"time": ', False, "alarm.set"),
        (b"n", b'one", "slots": {}}', False, NONE),
        (b'alarm.set", "slots": {"time": ', b"", False, "alarm.set"),
        (b'alarm.set", "slots": {"time": nu', b"ll", False, "alarm.set"),
        (b'alarm.set", "slots": {"time": "7:3', b"", False, "alarm.set"),
        (b'alarm.set", "slots": {"time": "7:30"', b', "date": ', False, "alarm.set"),
        (b'alarm.set", "slots": {"time": "7:30", "date": null', b"}}", False, "alarm.set"),
        (b'alarm.set", "slots": {"time": "7:30", "date": null}}', b"", True, "alarm.set"),
        (b'alarm.cancel", "slots": {}}', b"", True, "alarm.cancel"),
    ],
)
def test_progress_follows_the_skeleton(out: bytes, forced: bytes, complete: bool, intent: str | None) -> None:
    state = progress(SHAPE, out)
    assert (state.forced, state.complete, state.intent) == (forced, complete, intent)


@pytest.mark.parametrize(
    "out", [b"x", b'joke.tell"', b'alarm.set", "slots": {"date": null', b'none", "slots": {}}x']
)
def test_progress_rejects_what_the_grammar_cannot_produce(out: bytes) -> None:
    with pytest.raises(ValueError):
        progress(SHAPE, out)


def test_grammar_names_every_intent_with_its_own_slots(catalog: Catalog) -> None:
    text = gbnf(AnswerShape.from_catalog(catalog))
    assert '"alarm.set" "\\", \\"slots\\": {\\"time\\": " value "}}"' in text
    assert '"desktop.reset_webspace" "\\", \\"slots\\": {}}"' in text
    assert '"none" "\\", \\"slots\\": {}}"' in text
    assert parse_answer(b'alarm.set", "slots": {"time": "07:30", "date": null}}') == (
        "alarm.set",
        {"time": "07:30"},
    )


def test_name_probabilities_split_the_mass_along_the_path() -> None:
    # step 1: "a" (alarm.*) vs "n" (none) at logits 2:0; step 2: "s" vs "c" at 1:1
    steps = [NameStep(b"", (b"a", b"n"), (2.0, 0.0)), NameStep(b"alarm.", (b"s", b"c"), (1.0, 1.0))]
    probs = name_probabilities(steps, "alarm.set", ["alarm.cancel", NONE], 1.0)
    p_a = 1 / (1 + math.exp(-2))
    assert probs["alarm.set"] == pytest.approx(p_a * 0.5)
    assert probs["alarm.cancel"] == pytest.approx(p_a * 0.5)
    assert probs[NONE] == pytest.approx(1 - p_a)
    flat = name_probabilities(steps, "alarm.set", [], 100.0)["alarm.set"]
    assert flat == pytest.approx(0.25, abs=0.01)  # a high temperature flattens towards uniform


# --- through llama.cpp ---------------------------------------------------------------------------------


def test_repo_catalog_grammar_compiles_and_constrains_free_sampling(tmp_path: Path) -> None:
    from llama_cpp import Llama, LlamaGrammar

    repo = load_catalog(REPO / "catalog")
    shape = AnswerShape.from_catalog(repo)
    grammar = LlamaGrammar.from_string(gbnf(shape), verbose=False)
    llm = Llama(str(write_tiny_gguf(tmp_path / "r.gguf", seed=3)), n_ctx=1024, n_threads=1, verbose=False)
    for seed in range(4):  # llama.cpp's own sampler, temperature 1: whatever it samples must parse
        llm.set_seed(seed)
        out = llm.create_completion(
            "x", max_tokens=shape.max_answer_bytes() + 8, temperature=1.0, grammar=grammar, seed=seed
        )
        data = json.loads(out["choices"][0]["text"])  # type: ignore[index]
        assert data["intent"] in shape.slots
        assert list(data["slots"]) == list(shape.slots[data["intent"]])
    llm.close()


@pytest.mark.parametrize("seed", range(5))
def test_every_answer_parses_and_names_a_catalog_intent(
    stage_factory: Any, catalog: Catalog, seed: int
) -> None:
    stage = stage_factory(seed=seed)
    for text in ("разбуди меня пораньше", "turn everything off", "сбрось всё"):
        d = stage.decide_fallback(canon(catalog, text), proposal())
        raw = d.evidence["raw_output"]
        assert raw.startswith(ANSWER_OPEN)
        data = json.loads(raw)
        assert data["intent"] in set(catalog.intents) | {NONE}
        assert d.via == "llm"
        if d.intent is None:
            assert (d.outcome, d.reason) == (Outcome.ABSTAIN, "llm_none")
        else:
            assert d.intent in catalog.intents and 0.0 < d.confidence <= 1.0
            assert set(d.slots) <= set(catalog.intents[d.intent].slots)
            assert [a.confidence for a in d.alternatives] == sorted(
                (a.confidence for a in d.alternatives), reverse=True
            )


def test_model_that_answers_none_abstains(stage_factory: Any, catalog: Catalog) -> None:
    d = stage_factory(SAYS_NONE).decide_fallback(canon(catalog, "как дела"), proposal())
    assert (d.intent, d.outcome, d.reason, d.via) == (None, Outcome.ABSTAIN, "llm_none", "llm")
    assert d.evidence["raw_output"] == '{"intent": "none", "slots": {}}'
    assert d.evidence["p_none"] > 0.99


def test_steered_model_picks_its_intent_with_calibrated_confidence(
    stage_factory: Any, catalog: Catalog
) -> None:
    d = stage_factory(SAYS_ALARM).decide_fallback(canon(catalog, "разбуди меня пораньше"), proposal())
    assert (d.intent, d.outcome, d.via) == ("alarm.set", Outcome.ACCEPT, "llm")
    assert d.confidence > 0.98
    assert d.slots == {}  # an empty string is no value
    assert d.evidence["raw_output"] == '{"intent": "alarm.set", "slots": {"time": ""}}'
    cands = {c["intent"]: c for c in d.evidence["candidates"]}
    assert cands["device.turn_off"]["score"] == 0.6 and cands["device.turn_off"]["llm"] < 0.01
    assert d.evidence["prompt_tokens"] < d.evidence["cached_prefix_tokens"]
    assert d.evidence["forced_tokens"] > d.evidence["generated_tokens"]


def test_llm_slot_values_yield_to_canonicalized_entities(stage_factory: Any, catalog: Catalog) -> None:
    stage = stage_factory(SAYS_ALARM_TIME)
    d = stage.decide_fallback(canon(catalog, "разбуди меня"), proposal())
    assert d.slots == {"time": "a" * 32}
    time_entity = EntityMatch("time", "time", "7:30", 0, 4, "07:30", source="value", match_type="parsed")
    c = Canonical("7:30", "7:30", "{time}", "ru", entities=(time_entity,))
    d = stage.decide_fallback(c, proposal())
    assert d.intent == "alarm.set" and d.slots == {}  # the pipeline fills time=07:30 from the entity
    assert d.evidence["llm_slots"] == {"time": "a" * 32}


def test_temperature_comes_from_the_sidecar(
    tmp_path: Path, catalog: Catalog, make_config: Callable[..., Config]
) -> None:
    path = write_tiny_gguf(tmp_path / "t.gguf", prefer=SAYS_ALARM)
    (tmp_path / "t.gguf.nlu.json").write_text(json.dumps({"temperature": 10.0}))
    stage = LlmStage.load(make_config(llm_model=str(path), llm_threads=1), catalog)
    d = stage.decide_fallback(canon(catalog, "разбуди меня"), proposal())
    stage.close()
    assert d.intent == "alarm.set" and d.evidence["temperature"] == 10.0
    assert 0.3 < d.confidence < 0.7 and d.evidence["probability_raw"] > 0.98
    (tmp_path / "t.gguf.nlu.json").write_text(json.dumps({"temprature": 2.0}))
    with pytest.raises(ValueError, match="temprature"):
        LlmSettings.for_model(path)


def test_context_too_small_for_the_catalog_fails_the_load_and_long_requests_abstain(
    tmp_path: Path, catalog: Catalog, make_config: Callable[..., Config]
) -> None:
    path = write_tiny_gguf(tmp_path / "c.gguf", prefer=SAYS_ALARM)
    sidecar = tmp_path / "c.gguf.nlu.json"
    sidecar.write_text(json.dumps({"n_ctx": 1024}))  # the byte-level catalog prompt alone is ~850 tokens
    with pytest.raises(ValueError, match="raise n_ctx"):
        LlmStage.load(make_config(llm_model=str(path), llm_threads=1), catalog)
    sidecar.write_text(json.dumps({"n_ctx": 1536}))
    stage = LlmStage.load(make_config(llm_model=str(path), llm_threads=1), catalog)
    d = stage.decide_fallback(canon(catalog, "разбуди меня " * 60), proposal())
    assert (d.intent, d.outcome, d.reason) == (None, Outcome.ABSTAIN, "llm_prompt_too_long")
    assert stage.decide_fallback(canon(catalog, "разбуди меня"), proposal()).intent == "alarm.set"
    stage.close()


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NO_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.mark.parametrize(("template", "turn"), [(CHATML, "<|im_start|>assistant\n"), (NO_SYSTEM, "model\n")])
def test_the_models_chat_template_frames_the_prompt(
    tmp_path: Path, catalog: Catalog, make_config: Callable[..., Config], template: str, turn: str
) -> None:
    path = write_tiny_gguf(tmp_path / "chat.gguf", prefer=SAYS_ALARM, chat_template=template)
    stage = LlmStage.load(make_config(llm_model=str(path), llm_threads=1), catalog)
    assert stage._tail.endswith(turn + ANSWER_OPEN)
    assert stage._prefix[0] == 1 and stage._prefix[1] != 1  # one BOS, not the template's and ours
    assert stage.decide_fallback(canon(catalog, "разбуди меня"), proposal()).intent == "alarm.set"
    stage.close()


def test_prefix_cache_gives_the_same_answers_as_a_fresh_context(stage_factory: Any, catalog: Catalog) -> None:
    texts = ["разбуди меня пораньше", "turn everything off", "сбрось всё", "разбуди меня пораньше"]
    warm = stage_factory(seed=7)
    answers = [warm.decide_fallback(canon(catalog, t), proposal()).evidence["raw_output"] for t in texts]
    fresh = [
        stage_factory(seed=7).decide_fallback(canon(catalog, t), proposal()).evidence["raw_output"]
        for t in texts
    ]
    assert answers == fresh


# --- never block -------------------------------------------------------------------------------------


def test_budget_runs_out_while_waiting_for_the_slot(stage_factory: Any, catalog: Catalog) -> None:
    stage = stage_factory(SAYS_ALARM, llm_budget_ms=200)
    with stage._slot:  # another request is generating
        started = time.monotonic()
        d = stage.decide_fallback(canon(catalog, "разбуди меня"), proposal())
        elapsed = time.monotonic() - started
    assert (d.intent, d.outcome, d.reason, d.via) == (None, Outcome.ABSTAIN, "llm_timeout", "llm")
    assert 0.15 < elapsed < 1.0
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
    reads = clock.reads  # start, slot wait, prompt chunks, each sampled token, the late check, the ms
    assert expected.reason != "llm_timeout" and reads > 6
    wheres = set()
    for k in range(reads - 2):  # the deadline passes at every check in turn, the last one included
        stage.clock = TickingClock()
        stage.budget_s = k + 0.5
        d = stage.decide_fallback(c, proposal())
        assert (d.intent, d.outcome, d.reason, d.via) == (None, Outcome.ABSTAIN, "llm_timeout", "llm"), k
        wheres.add(d.evidence["where"])
    assert wheres == {"generating", "finished late"}  # a free slot is taken even with no time left
    stage.clock = TickingClock()
    stage.budget_s = reads - 2 + 0.5  # passes only after the answer is final
    again = stage.decide_fallback(c, proposal())  # nothing of the aborted runs leaks into this one
    assert again.evidence["raw_output"] == expected.evidence["raw_output"]
    assert (again.intent, again.confidence) == (expected.intent, expected.confidence)


def test_full_queue_answers_at_once_and_waiters_still_get_answers(
    stage_factory: Any, catalog: Catalog
) -> None:
    stage = stage_factory(SAYS_ALARM, llm_queue=2, llm_budget_ms=10_000)
    c = canon(catalog, "разбуди меня")
    results: list[Decision] = []
    stage._slot.acquire()  # a long generation holds the slot
    try:
        waiters = [
            threading.Thread(target=lambda: results.append(stage.decide_fallback(c, proposal())))
            for _ in range(3)
        ]  # two queue, the third generates... once the slot frees
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
    assert state.health()["stages"]["llm"] == {
        "ready": True,
        "detail": "tiny.gguf (confidence uncalibrated, temperature 1)",
    }
    assert isinstance(state.pipeline.llm, LlmStage) if state.pipeline else False


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


def test_pipeline_lets_the_llm_settle_an_abstention(stage_factory: Any, catalog: Catalog) -> None:
    result = _pipeline(catalog, stage_factory(SAYS_ALARM)).parse("разбуди меня пораньше пожалуйста")
    d = result.decision
    assert (d.intent, d.outcome, d.via) == ("alarm.set", Outcome.ACCEPT, "llm")
    assert [s.stage for s in result.stages] == ["canonicalize", "regex", "neural", "llm"]
    assert result.stages[2].outcome == "abstain" and result.stages[3].outcome == "accept"
    assert d.evidence["candidates"][0] == {
        "intent": "device.turn_off",
        "score": 0.6,
        "llm": pytest.approx(0.0, abs=0.01),
    }
    assert d.evidence["raw_output"].startswith('{"intent": "alarm.set"')


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
