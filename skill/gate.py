"""Accept / abstain / reject from calibrated confidence: a pure function of a decision and thresholds."""

from __future__ import annotations

import msgspec

from .decision import Decision, Outcome


class GateConfig(msgspec.Struct, frozen=True):
    """Thresholds; they come from the active model's config, overridable by the environment."""

    accept: float = 0.80
    reject: float = 0.45
    margin: float = 0.10


class IntentPolicy(msgspec.Struct, frozen=True):
    """Per-intent stricter thresholds declared in the catalog (risky intents)."""

    accept: float | None = None
    margin: float | None = None


def gate(decision: Decision, cfg: GateConfig, policy: IntentPolicy | None = None) -> Decision:
    """Turn a stage's proposal into the final outcome.

    Order: no intent → keep reject, else abstain; confidence below ``reject`` → reject; below the
    (possibly stricter) accept threshold → abstain; top-1 minus top-2 below the margin → abstain.
    """
    if decision.outcome is Outcome.ERROR:
        return decision
    if decision.intent is None:
        outcome = Outcome.REJECT if decision.outcome is Outcome.REJECT else Outcome.ABSTAIN
        return msgspec.structs.replace(decision, outcome=outcome, reason=decision.reason or "no_candidate")
    accept = cfg.accept
    margin = cfg.margin
    if policy is not None:
        accept = max(accept, policy.accept if policy.accept is not None else accept)
        margin = max(margin, policy.margin if policy.margin is not None else margin)
    conf = decision.confidence
    runner_up = decision.alternatives[0].confidence if decision.alternatives else 0.0
    if decision.outcome is Outcome.REJECT or conf < cfg.reject:
        return msgspec.structs.replace(
            decision, outcome=Outcome.REJECT, reason=decision.reason or "below_reject_threshold"
        )
    if conf < accept:
        reason = "below_intent_threshold" if accept > cfg.accept and conf >= cfg.accept else "low_confidence"
        return msgspec.structs.replace(decision, outcome=Outcome.ABSTAIN, reason=reason)
    if conf - runner_up < margin:
        return msgspec.structs.replace(decision, outcome=Outcome.ABSTAIN, reason="small_margin")
    return msgspec.structs.replace(decision, outcome=Outcome.ACCEPT, reason=None)
