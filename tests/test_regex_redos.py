"""Catastrophic-backtracking guard: every rule of the real catalog against adversarial 1000-char inputs.

The inputs are built from each rule's own literals and placeholders (parsed out of the pattern),
repeated, shuffled and cut at 1000 characters, with near-miss tails that force the engine to give
up late. The target is 5 ms per rule and input; the assertion uses a generous bound (best of three
timings, 50 ms) so a busy CI machine cannot make it flake, and the measured maximum is printed.
"""

from __future__ import annotations

import os
import random
import re
import re._constants as sre_c
import re._parser as sre_parse
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from skill.canonicalize import Canonicalizer
from skill.catalog import load_catalog
from skill.regex_stage import CompiledRule, RegexStage

# Hypothesis keeps caches (constants, charmap) under ./.hypothesis, some at import time: not in the work tree.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "adaos-nlu-hypothesis")


REPO = Path(__file__).resolve().parent.parent
LENGTH = 1000
TARGET_MS = 5.0  # what every rule should meet (reported)
BOUND_MS = 50.0  # what the test asserts: far below catastrophic (seconds), far above noise
PLACEHOLDERS = (
    "{time}",
    "{date}",
    "{duration}",
    "{number}",
    "{device}",
    "{room}",
    "{city}",
    "{scenario}",
    "{app}",
    "{modal}",
    "{webspace}",
    "{skill}",
)
TAILS = ("", " #", "!", " пожалуйста ?", " please x", "\x00")

_SKIP_UNLESS_SLOW = pytest.mark.skipif(
    "os.environ.get('NLU_SLOW') != '1' and 'slow' not in (config.option.markexpr or '')",
    reason="slow: set NLU_SLOW=1 or run `python -m pytest -m slow`",
)


def slow(fn: Any) -> Any:
    """Marked ``slow`` and skipped unless NLU_SLOW=1 or ``-m slow`` (CI runs plain ``pytest -q``)."""
    return pytest.mark.slow(_SKIP_UNLESS_SLOW(fn))


def _representative(items: list[tuple[object, object]]) -> str:
    """One character a character class accepts (``[^{}]`` → ``a``)."""
    for op, av in items:
        if op is sre_c.NEGATE:
            return "a"
        if op is sre_c.LITERAL:
            return chr(av)  # type: ignore[arg-type]
        if op is sre_c.RANGE:
            return chr(av[0])  # type: ignore[index]
    return "a"


def fragments(pattern: str) -> list[str]:
    """The literal runs of a pattern, in order (alternatives and optional groups each give their own)."""
    out: list[str] = []
    cur: list[str] = []

    def flush() -> None:
        if cur:
            out.append("".join(cur))
            cur.clear()

    def walk(seq: object) -> None:
        for op, av in seq:  # type: ignore[attr-defined]
            if op is sre_c.LITERAL:
                cur.append(chr(av))
            elif op is sre_c.IN:
                cur.append(_representative(av))
            elif op is sre_c.ANY:
                cur.append("x")
            elif op is sre_c.SUBPATTERN:
                flush()
                walk(av[-1])
                flush()
            elif op is sre_c.BRANCH:
                flush()
                for alt in av[1]:
                    walk(alt)
                    flush()
            elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT):
                flush()
                walk(av[2])
                flush()
            else:  # anchors, categories, groupref...
                flush()

    walk(sre_parse.parse(pattern))
    flush()
    return [f for f in dict.fromkeys(out) if f.strip()]


def sample(pattern: str, choice: int, optional: bool, pump: int) -> str:
    """A string walked along the pattern: branch ``choice``, optional parts in or out, ``*``/``+`` pumped.

    With a large ``pump`` this is the classic attack shape: a head the rule accepts, a long run that
    keeps a quantifier busy, and (after cutting) a tail that fails late.
    """

    def walk(seq: object) -> str:
        out = []
        for op, av in seq:  # type: ignore[attr-defined]
            if op is sre_c.LITERAL:
                out.append(chr(av))
            elif op is sre_c.IN:
                out.append(_representative(av))
            elif op is sre_c.ANY:
                out.append("x")
            elif op is sre_c.CATEGORY:
                out.append({sre_c.CATEGORY_DIGIT: "0", sre_c.CATEGORY_SPACE: " "}.get(av, "a"))
            elif op is sre_c.SUBPATTERN:
                out.append(walk(av[-1]))
            elif op is sre_c.BRANCH:
                alts = av[1]
                out.append(walk(alts[choice % len(alts)]))
            elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT):
                lo, hi, item = av
                if hi == sre_c.MAXREPEAT:
                    times = max(lo, pump)
                else:
                    times = hi if optional else lo
                inner = walk(item)
                out.append(inner * (min(times, LENGTH // max(1, len(inner)) + 1) if inner else 0))
        return "".join(out)

    return walk(sre_parse.parse(pattern))


def fill(unit: str, tail: str = "") -> str:
    """``unit`` repeated up to exactly ``LENGTH`` characters including ``tail``."""
    if not unit:
        unit = "a"
    body = (unit * (LENGTH // len(unit) + 1))[: LENGTH - len(tail)]
    return body + tail


def adversarial_inputs(rule: CompiledRule, seed: int = 0) -> list[str]:
    """Inputs built from the rule's own literals and placeholders, each exactly 1000 characters."""
    frags = fragments(rule.pattern.pattern)
    holders = [p for p in PLACEHOLDERS if p in "".join(frags)] or ["{device}"]
    words = [w for f in frags for w in f.split()]
    rng = random.Random(f"{rule.rule_id}:{seed}")
    units = {f + " " for f in frags} | {f for f in frags} | {h + " " for h in holders}
    units.add(" ".join(frags) + " ")
    units.add("".join(frags))
    units.add(" ".join(words) + " ")
    for _ in range(4):
        shuffled = words[:]
        rng.shuffle(shuffled)
        units.add(" ".join(shuffled) + " ")
    inputs = {fill(u, tail) for u in units for tail in TAILS}
    branches = max(1, rule.pattern.pattern.count("|") + 1)
    for choice in range(min(branches, 16)):
        for optional in (True, False):
            walked = sample(rule.pattern.pattern, choice, optional, LENGTH)
            for tail in TAILS:
                if len(walked) >= LENGTH // 2:  # pumped: accepted head, long run, failing end
                    inputs.add(walked[: LENGTH - len(tail)].ljust(LENGTH - len(tail), " ") + tail)
                else:  # no unbounded quantifier: many accepted copies back to back
                    inputs.add(fill(walked + " ", tail))
    # A plausible head that matches the rule's start, then a long near-miss middle.
    head = " ".join(frags[:3]) + " "
    for f in frags[:6]:
        inputs.add(head + fill(f + " ", "#")[len(head) :])
    inputs.add(head + fill("".join(holders) + " ", " #")[len(head) :])
    return sorted(inputs)


def time_search(pattern: re.Pattern[str], text: str, repeats: int = 3) -> float:
    """Best of ``repeats`` wall-clock timings of ``pattern.search(text)`` in ms."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        pattern.search(text)
        best = min(best, (time.perf_counter_ns() - t0) / 1e6)
    return best


@pytest.fixture(scope="module")
def stage() -> RegexStage:
    """The real catalog's rules."""
    return RegexStage(load_catalog(REPO / "catalog"))


def test_sample_walks_the_pattern() -> None:
    rx = r"^(?:aa|bb) x(?: y)? [^{}]*\{time\}$"
    assert sample(rx, 0, True, 1) == "aa x y a{time}"
    assert sample(rx, 1, False, 3) == "bb x aaa{time}"
    assert re.search(rx, sample(rx, 1, False, 3))


def test_fragments_parser() -> None:
    assert fragments(r"^(?:поставь|заведи) будильник на \{time\}$") == [
        "поставь",
        "заведи",
        " будильник на {time}",
    ]
    assert fragments(r"^x [^{}]*(?: y)?$") == ["x ", "a", " y"]


def test_every_catalog_rule_is_fast_on_adversarial_input(stage: RegexStage) -> None:
    assert len(stage.rules) >= 50, "the real catalog should have its rules"
    worst: list[tuple[float, str, str]] = []
    cases = 0
    for rule in stage.rules:
        inputs = adversarial_inputs(rule)
        assert all(len(t) == LENGTH for t in inputs)
        per_rule = max((time_search(rule.pattern, t), t) for t in inputs)
        cases += len(inputs)
        worst.append((per_rule[0], rule.rule_id, per_rule[1][:40]))
    worst.sort(reverse=True)
    over_target = [w for w in worst if w[0] > TARGET_MS]
    print(
        f"\nregex ReDoS: {len(stage.rules)} rules x {cases // len(stage.rules)} avg inputs = {cases} cases; "
        f"max {worst[0][0]:.3f} ms ({worst[0][1]}), median rule max "
        f"{worst[len(worst) // 2][0]:.3f} ms, over {TARGET_MS} ms: {len(over_target)}"
    )
    slowest = [(round(ms, 3), rid) for ms, rid, _ in worst[:5]]
    assert worst[0][0] < BOUND_MS, f"catastrophic backtracking suspected: {slowest}"


def test_pipeline_regex_path_on_1000_chars(stage: RegexStage) -> None:
    """Through canonicalization too: the masked text of hostile raw input reaches every rule in time."""
    catalog = load_catalog(REPO / "catalog")
    canon = Canonicalizer(catalog)
    raw = [
        fill("выключи свет на кухне "),
        fill("поставь будильник на 7:30 "),
        fill("turn off the kitchen light "),
        fill("десять минут "),
        fill("сколько будет 5 плюс 5 "),
        fill("7:30 "),
        fill("а"),
        fill("{device} "),
        fill("напомни мне купить хлеб через "),
        fill("weather in berlin tomorrow "),
        fill("ё" + "\u0301"),
    ]
    worst = 0.0
    for text in raw:
        for locale in ("ru", "en"):
            t0 = time.perf_counter()
            c = canon.canonicalize(text, locale=locale)
            stage.decide(c)
            worst = max(worst, (time.perf_counter() - t0) * 1000.0)
    print(f"\ncanonicalize + all rules on 1000 chars: max {worst:.2f} ms")
    assert worst < 1000.0


def test_the_inputs_would_expose_catastrophic_backtracking() -> None:
    """Canary: a known-bad rule gets the attack shape, and on it the engine's cost really explodes."""
    bad = CompiledRule("x.bad", "bad", re.compile(r"^(?:a+)+b$"), "any", 0, 0)
    pumped = [t for t in adversarial_inputs(bad) if t.startswith("a" * 900) and not t.endswith("b")]
    assert pumped, "no pumped near-miss input for a nested quantifier"
    # 2^n steps: 22 characters of the same shape already cost far more than 16 do (the full 1000 never ends).
    assert time_search(bad.pattern, "a" * 22 + "#", 1) > 8 * time_search(bad.pattern, "a" * 16 + "#", 3)


def test_adversarial_inputs_are_deterministic(stage: RegexStage) -> None:
    rule = stage.rules[0]
    assert adversarial_inputs(rule, 1) == adversarial_inputs(rule, 1)


@slow
@settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_mixtures_of_rule_literals(stage: RegexStage, data: st.DataObject) -> None:
    """Hypothesis: random sequences of a random rule's fragments, placeholders and noise, 1000 chars."""
    rule = data.draw(st.sampled_from(stage.rules))
    frags = fragments(rule.pattern.pattern) + list(PLACEHOLDERS) + [" ", "#", "ё", "a", "0", "\x00"]
    parts = data.draw(st.lists(st.sampled_from(frags), min_size=1, max_size=400))
    text = fill("".join(parts))
    ms = time_search(rule.pattern, text)
    _MAX[0] = max(_MAX[0], ms)
    assert ms < BOUND_MS, (rule.rule_id, ms, text[:80])


_MAX = [0.0]


def teardown_module() -> None:
    """Print the maximum of the random mixtures (visible with ``-s``)."""
    if _MAX[0]:
        print(f"\nregex random mixtures: max {_MAX[0]:.3f} ms")
