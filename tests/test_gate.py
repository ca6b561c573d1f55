"""Gate rules as a table: thresholds, margin, per-intent policies, rejections."""

from __future__ import annotations

import pytest

from skill.decision import Candidate, Decision, Outcome
from skill.gate import GateConfig, IntentPolicy, gate

CFG = GateConfig(accept=0.80, reject=0.45, margin=0.10)


def _d(
    intent: str | None, conf: float, runner_up: float | None = None, outcome: Outcome = Outcome.ACCEPT
) -> Decision:
    alts = (Candidate("other.intent", runner_up),) if runner_up is not None else ()
    return Decision(intent=intent, confidence=conf, outcome=outcome, via="neural", alternatives=alts)


@pytest.mark.parametrize(
    ("decision", "policy", "outcome", "reason"),
    [
        (_d("a.b", 0.95, 0.02), None, Outcome.ACCEPT, None),
        (_d("a.b", 0.80, 0.05), None, Outcome.ACCEPT, None),  # the threshold itself accepts
        (_d("a.b", 0.7999, 0.05), None, Outcome.ABSTAIN, "low_confidence"),
        (_d("a.b", 0.60), None, Outcome.ABSTAIN, "low_confidence"),
        (_d("a.b", 0.45), None, Outcome.ABSTAIN, "low_confidence"),  # reject is strictly below
        (_d("a.b", 0.4499), None, Outcome.REJECT, "below_reject_threshold"),
        (_d("a.b", 0.10), None, Outcome.REJECT, "below_reject_threshold"),
        (_d("a.b", 0.85, 0.80), None, Outcome.ABSTAIN, "small_margin"),
        (_d("a.b", 0.90, 0.8001), None, Outcome.ABSTAIN, "small_margin"),
        (_d("a.b", 0.91, 0.80), None, Outcome.ACCEPT, None),
        (_d("a.b", 0.85, 0.01), IntentPolicy(accept=0.90), Outcome.ABSTAIN, "below_intent_threshold"),
        (_d("a.b", 0.95, 0.01), IntentPolicy(accept=0.90), Outcome.ACCEPT, None),
        (_d("a.b", 0.95, 0.80), IntentPolicy(margin=0.2), Outcome.ABSTAIN, "small_margin"),
        (_d("a.b", 0.95, 0.86), IntentPolicy(margin=0.01), Outcome.ABSTAIN, "small_margin"),  # never laxer
        (_d("a.b", 0.95, 0.01), IntentPolicy(accept=0.5), Outcome.ACCEPT, None),
        (_d(None, 0.0), None, Outcome.ABSTAIN, "no_candidate"),
        (_d(None, 0.0, outcome=Outcome.REJECT), None, Outcome.REJECT, "no_candidate"),
        (_d("a.b", 0.99, outcome=Outcome.REJECT), None, Outcome.REJECT, "below_reject_threshold"),
    ],
)
def test_gate_table(
    decision: Decision, policy: IntentPolicy | None, outcome: Outcome, reason: str | None
) -> None:
    out = gate(decision, CFG, policy)
    assert out.outcome is outcome
    assert out.reason == reason
    assert out.intent == decision.intent
    assert out.confidence == decision.confidence


def test_error_passes_through() -> None:
    d = Decision(intent=None, confidence=0.0, outcome=Outcome.ERROR, via="llm", reason="timeout")
    assert gate(d, CFG) is d


def test_stage_reason_is_kept_on_reject() -> None:
    d = Decision(intent="a.b", confidence=0.3, outcome=Outcome.REJECT, via="neural", reason="out_of_scope")
    assert gate(d, CFG).reason == "out_of_scope"
