"""Deterministic rules from the catalog, matched against the canonicalized (masked) text."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from .canonicalize import Canonical
from .catalog import Catalog
from .decision import Decision, Outcome

VIA = "regex"


class CompiledRule(msgspec.Struct, frozen=True):
    """A rule ready to match, with where it came from."""

    intent: str
    rule_id: str
    pattern: re.Pattern[str]
    locale: str
    priority: int
    order: int


class RegexStage:
    """Rules sorted by priority (higher first), then catalog order; the first match wins."""

    def __init__(self, catalog: Catalog) -> None:
        rules = []
        order = 0
        for name, intent in catalog.intents.items():
            for idx, rule in enumerate(intent.regex):
                rules.append(
                    CompiledRule(
                        intent=name,
                        rule_id=rule.id or f"{name}#{idx}",
                        pattern=re.compile(rule.pattern),
                        locale=rule.locale,
                        priority=rule.priority,
                        order=order,
                    )
                )
                order += 1
        self.rules: tuple[CompiledRule, ...] = tuple(sorted(rules, key=lambda r: (-r.priority, r.order)))

    def decide(self, canonical: Canonical) -> Decision:
        """Accept at confidence 1.0 on the first matching rule, otherwise abstain."""
        text = canonical.masked
        for rule in self.rules:
            if rule.locale not in {"any", canonical.locale}:
                continue
            match = rule.pattern.search(text)
            if match is None:
                continue
            groups: dict[str, Any] = {k: v for k, v in match.groupdict().items() if v is not None}
            return Decision(
                intent=rule.intent,
                confidence=1.0,
                outcome=Outcome.ACCEPT,
                via=VIA,
                slots=groups,
                evidence={"rule": rule.rule_id, "pattern": rule.pattern.pattern, "priority": rule.priority},
            )
        return Decision.abstain(VIA, "no_rule_matched", {"rules_tried": len(self.rules)})
