"""The stage order: canonicalize → regex → neural ranker → gate → LLM fallback → gate."""

from __future__ import annotations

import time
from typing import Any, Protocol

import msgspec

from .canonicalize import Canonical, Canonicalizer, EntityMatch
from .catalog import Catalog
from .decision import Decision, Outcome
from .gate import GateConfig, IntentPolicy, gate
from .regex_stage import RegexStage
from .resolve import SpanResolver
from .slots import drop_kind_conflicts, fill_slots, kind_conflicts


class Stage(Protocol):
    """A decision stage over canonicalized text."""

    def decide(self, canonical: Canonical) -> Decision: ...


class ModelStage(Stage, Protocol):
    """A stage backed by a versioned model (the neural ranker)."""

    model_id: str

    @property
    def thresholds(self) -> dict[str, float]: ...


class FallbackStage(Protocol):
    """A slower stage that sees the ranker's proposal (the local LLM)."""

    def decide_fallback(self, canonical: Canonical, proposal: Decision) -> Decision: ...


class StageTrace(msgspec.Struct, frozen=True):
    """What one stage did and how long it took."""

    stage: str
    outcome: str
    ms: float
    intent: str | None = None
    confidence: float | None = None
    reason: str | None = None


class ParseResult(msgspec.Struct, frozen=True):
    """The pipeline's answer: the final gated decision plus everything that led to it."""

    decision: Decision
    canonical: Canonical
    stages: tuple[StageTrace, ...]
    model_id: str | None
    missing_slots: tuple[str, ...] = ()  # required slots of the decided intent that nothing filled
    invalid_slots: tuple[str, ...] = ()  # slots whose value is out of the declared range


def _trace(name: str, decision: Decision, started: float) -> StageTrace:
    return StageTrace(
        stage=name,
        outcome=decision.outcome.value,
        ms=round((time.perf_counter() - started) * 1000.0, 3),
        intent=decision.intent,
        confidence=round(decision.confidence, 4) if decision.intent else None,
        reason=decision.reason,
    )


class Pipeline:
    """Chains the stages; immutable once built, so a reload swaps a whole Pipeline."""

    def __init__(
        self,
        catalog: Catalog,
        canonicalizer: Canonicalizer,
        *,
        regex: RegexStage | None,
        ranker: ModelStage | None,
        llm: FallbackStage | None = None,
        gate_config: GateConfig | None = None,
    ) -> None:
        self.catalog = catalog
        self.canonicalizer = canonicalizer
        self.regex = regex
        self.ranker = ranker
        self.llm = llm
        self.gate_config = gate_config or GateConfig()
        self.resolver = SpanResolver(catalog, canonicalizer.lemmatizer)
        self.policies = {
            name: IntentPolicy(accept=i.thresholds.accept, margin=i.thresholds.margin)
            for name, i in catalog.intents.items()
            if i.thresholds is not None
        }

    @property
    def model_id(self) -> str | None:
        """The id of the model behind the neural stage, if any."""
        return self.ranker.model_id if self.ranker is not None else None

    def _gate(self, decision: Decision) -> Decision:
        return gate(decision, self.gate_config, self.policies.get(decision.intent or ""))

    def parse(
        self,
        text: str,
        locale: str | None = None,
        hub_entities: dict[str, Any] | None = None,
        *,
        fallback: bool = True,
        model: bool = True,
    ) -> ParseResult:
        """Run every stage that is needed and return the final decision.

        ``fallback=False`` stops before the slow LLM stage, ``model=False`` after the rules (the
        conversation layer's split search).
        """
        traces: list[StageTrace] = []
        started = time.perf_counter()
        canonical = self.resolver.reconcile(self.canonicalizer.canonicalize(text, locale, hub_entities))
        traces.append(StageTrace("canonicalize", "ok", round((time.perf_counter() - started) * 1000.0, 3)))
        final = self._decide(canonical, traces, fallback, model)
        intent = self.catalog.intents.get(final.intent) if final.intent else None
        evidence = dict(final.evidence)
        evidence.setdefault("canonicalized_text", canonical.masked)
        evidence["entities"] = [msgspec.to_builtins(e) for e in canonical.entities]
        if canonical.ambiguities:
            evidence["ambiguities"] = [msgspec.to_builtins(a) for a in canonical.ambiguities]
        tagged = self._tagged(final, canonical)
        if tagged:
            evidence["entities"] += [msgspec.to_builtins(e) for e, _ in tagged]
            unresolved = [
                {"text": e.text, "slot": e.kind, "start": e.start, "end": e.end, "confidence": e.confidence}
                | ({"candidates": list(c)} if c else {})
                for e, c in tagged
                if e.ref is None
            ]
            if unresolved:
                evidence["unresolved_entity_spans"] = unresolved
            # A tagged name several registry entities could be is an ambiguity in AdaOS's own shape too.
            if unclear := [{"text": e.text, "candidates": list(c)} for e, c in tagged if c]:
                evidence["ambiguities"] = evidence.get("ambiguities", []) + unclear
        filled = msgspec.structs.replace(canonical, entities=canonical.entities + tuple(e for e, _ in tagged))
        check = fill_slots(intent, filled, final.slots)
        if check.invalid:
            evidence["invalid_slots"] = list(check.invalid)
        final = msgspec.structs.replace(final, slots=check.slots, evidence=evidence)
        if check.invalid and final.outcome is Outcome.ACCEPT:
            # "set the light to 250 percent": the intent is clear, the value is not one it can take.
            final = msgspec.structs.replace(final, outcome=Outcome.ABSTAIN, reason="invalid_slot_value")
        return ParseResult(
            final,
            canonical,
            tuple(traces),
            self.model_id,
            missing_slots=check.missing,
            invalid_slots=tuple(i["slot"] for i in check.invalid),
        )

    def _tagged(self, final: Decision, canonical: Canonical) -> list[tuple[EntityMatch, tuple[str, ...]]]:
        """The tagger's open-class spans for the decided intent, as entities after canonicalization's.

        The ranker tags in the same pass that ranks; a regex decision asks the tagger only when its
        intent has taggable slots. Registry names and values were masked first, so they win; a tagged
        name the registry can still place (:mod:`skill.resolve`) gets its ref, else it stays ``ref: null``
        with the entities it could be.
        """
        intent = self.catalog.intents.get(final.intent or "")
        if intent is None:
            return []
        spans = final.evidence.get("tagged_spans")
        if spans is None and final.via == "regex" and hasattr(self.ranker, "tag"):
            spans = self.ranker.tag(canonical, intent.intent)  # type: ignore[union-attr]
        return self.resolver.place(intent, spans or (), canonical.entities)

    def _decide(
        self, canonical: Canonical, traces: list[StageTrace], use_llm: bool = True, use_model: bool = True
    ) -> Decision:
        if self.regex is not None:
            started = time.perf_counter()
            hit = self.regex.decide(canonical)
            if conflicts := kind_conflicts(self.catalog.intents.get(hit.intent or ""), canonical):
                hit = Decision.abstain("regex", "kind_conflict", {"kind_conflicts": conflicts})
            traces.append(_trace("regex", hit, started))
            if hit.outcome is Outcome.ACCEPT or not use_model:
                return hit
        if not use_model:
            return Decision.abstain("regex", "no_rules")
        if self.ranker is None:
            return Decision.abstain("neural", "model_not_loaded")
        started = time.perf_counter()
        proposal = self._gate(drop_kind_conflicts(self.ranker.decide(canonical), self.catalog, canonical))
        traces.append(_trace("neural", proposal, started))
        if proposal.outcome is not Outcome.ABSTAIN or self.llm is None or not use_llm:
            return proposal
        started = time.perf_counter()
        fallback = self._gate(self.llm.decide_fallback(canonical, proposal))
        traces.append(_trace("llm", fallback, started))
        if fallback.outcome is Outcome.ACCEPT:
            return fallback
        # The LLM could not settle it either: keep the ranker's answer, note the LLM's view.
        evidence = dict(proposal.evidence)
        evidence["llm"] = {"outcome": fallback.outcome.value, "reason": fallback.reason, **fallback.evidence}
        return msgspec.structs.replace(proposal, evidence=evidence)
