"""The conversation layer: several requests in one utterance, follow-ups, clarification.

It wraps the single-utterance :class:`~skill.pipeline.Pipeline` from the outside. For one request:

1. the whole utterance through the pipeline (without the LLM stage);
2. an open clarification answered («в спальне», "the timer") → the asked-about request, decided;
3. a follow-up of a recent frame («а в спальне?», "make it eight", «отмени») → the frame's utterance
   completed and judged again by the pipeline (``followup.py``);
4. otherwise the split search (``segment.py``): every split at connectors and punctuation, each part
   through the pipeline, an elliptical part completed from the part before it; a split is taken
   only when it raises the confidence the whole had;
5. the LLM fallback for what is still not accepted; context actions; clarifying questions;
6. the session store keeps the accepted frames for the TTL (``context.py``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any

import msgspec

from ..canonicalize import Canonical, detect_locale
from ..contracts import Clarify, Segment, SegmentContext, wire_result
from ..decision import Decision, Outcome
from ..pipeline import ParseResult, Pipeline
from . import clarify as clar
from .context import Frame, Pending, SessionStore, Snapshot
from .followup import Ambiguous, FollowUps, Rewrite, cancel_intent_of, is_bare_cancel, is_slot_only
from .lexicon import GENERIC_CANCEL, Lexicon, lexicon
from .segment import Cut, Part, find_cuts, joint_confidence, plans

_VERBLESS_WORDS = 3  # a part this short may borrow the verb of the part before it
_BELOW_ONE = 1.0 - 1e-9  # "every part taken by a rule": the rules-only pass of the split search

__all__ = ["Answer", "Conversation", "Request", "SessionStore", "Turn", "audit_info", "scope_of", "to_wire"]


class Request(msgspec.Struct, frozen=True):
    """One ``/parse`` request as the conversation layer needs it."""

    text: str
    request_id: str
    locale: str | None = None
    entities: dict[str, Any] | None = None
    scope: str | None = None  # the session key: None = no context


class Turn(msgspec.Struct, frozen=True):
    """One request of the answer: its decided result, where it is in the text, what it does in the session."""

    result: ParseResult
    part: Part
    action: str  # start | update | cancel | noop
    refers_to: str | None = None
    resolution: str | None = None  # slot_update | cancel | clarify_answer | carry_over
    clarify: Clarify | None = None
    pending: Pending | None = None  # the open question this turn leaves (internal)

    @property
    def accepted(self) -> bool:
        """Whether the service accepted this request."""
        return self.result.decision.outcome is Outcome.ACCEPT


class Answer(msgspec.Struct, frozen=True):
    """Every request the utterance held, in order; ``split`` when there is more than one."""

    turns: tuple[Turn, ...]
    scope: str | None = None
    parses: int = 1  # pipeline runs it took

    @property
    def split(self) -> bool:
        """A split was taken."""
        return len(self.turns) > 1


def scope_of(session_id: str | None, webspace_id: str | None) -> str | None:
    """The session key: the session, else AdaOS's webspace, else none (a stateless request)."""
    if session_id:
        return f"session:{session_id}"
    return f"webspace:{webspace_id}" if webspace_id else None


def frame_of(turn_result: ParseResult, request_id: str, index: int, at: float) -> Frame | None:
    """The frame an accepted result leaves for follow-ups."""
    d = turn_result.decision
    if d.outcome is not Outcome.ACCEPT or not d.intent:
        return None
    return Frame(d.intent, dict(d.slots), request_id, index, turn_result.canonical, at)


def _note(result: ParseResult, **context: Any) -> ParseResult:
    """``evidence.context``: how context completed this result."""
    evidence = {**result.decision.evidence, "context": {k: v for k, v in context.items() if v is not None}}
    return msgspec.structs.replace(
        result, decision=msgspec.structs.replace(result.decision, evidence=evidence)
    )


class Conversation:
    """Owns the session store; takes the pipeline per call (a reload swaps it, the sessions stay)."""

    def __init__(self, store: SessionStore | None = None, *, max_cuts: int = 4) -> None:
        self.store = store if store is not None else SessionStore()
        self.max_cuts = max_cuts
        self.followups = FollowUps()

    def answer(self, pipeline: Pipeline, req: Request) -> Answer:
        """All the requests of one utterance, decided, with their context; updates the session."""
        locale = req.locale or detect_locale(req.text)
        snap = self.store.get(req.scope)
        cuts = find_cuts(req.text, locale, self.max_cuts)
        full: list[ParseResult] = []

        def whole() -> ParseResult:
            if not full:
                full.append(pipeline.parse(req.text, locale, req.entities, fallback=False))
            return full[0]

        # With split points, the rules first: when they take the whole utterance, or every part of a
        # split, the ranker never runs on the whole (two requests cost their parts, not three parses).
        rules = (
            pipeline.parse(req.text, locale, req.entities, fallback=False, model=False) if cuts else whole()
        )
        if rules.decision.outcome is Outcome.ACCEPT and not full:
            full.append(rules)  # an accepted rule is the whole pipeline's answer
        part = Part(req.text, 0, len(req.text))
        turns: list[Turn] | None = None
        if snap.pending is not None:
            found = self._answer_pending(pipeline, whole(), part, snap.pending)
            turns = [found] if found is not None else None
        if turns is None and snap.frames:
            found = self._follow_up(pipeline, rules if cuts else whole(), part, snap)
            turns = [found] if found is not None else None
        parses = 0
        if turns is None:
            turns, parses = self._segments(pipeline, req, rules, whole, locale=locale, cuts=cuts)
            turns = [self._decide_action(pipeline, t, snap, req) for t in turns]
        answer = Answer(tuple(turns), req.scope, len(full) + bool(cuts) + parses)
        self._remember(req, answer)
        return answer

    # -- the steps ------------------------------------------------------------------------------------

    def _answer_pending(
        self, pipeline: Pipeline, whole: ParseResult, part: Part, pending: Pending
    ) -> Turn | None:
        if pending.question_kind == "which_entity":
            ref = self._pick_entity(pipeline, whole.canonical, pending)
            if ref is None:
                return None
            rw = self.followups.choose_entity(pipeline, pending, ref)
            if rw is None or not _accepted_as(rw.result, pending.intent):
                return None
            action = "update" if pending.refers_to else "start"
            refers = pending.refers_to or pending.request_id
            result = _note(rw.result, rewritten_text=rw.text, refers_to=refers)
            return Turn(result, part, action, refers, "clarify_answer")
        chosen = self.followups.choose_intent(pipeline, whole, pending)
        if chosen is None or chosen.decision.outcome is not Outcome.ACCEPT:
            return None
        result = _note(chosen, clarified=pending.request_id)
        return Turn(result, part, "start", pending.request_id, "clarify_answer")

    @staticmethod
    def _pick_entity(pipeline: Pipeline, reply: Canonical, pending: Pending) -> str | None:
        """The candidate the reply names: by its ref, or by its room when that leaves one."""
        for ent in reply.entities:
            if ent.ref in pending.candidates:
                return ent.ref
        rooms = {e.ref.split(":", 1)[1] for e in reply.entities if e.placeholder == "room" and e.ref}
        if not rooms:
            return None
        rooms_of = {e.ref: e.room for items in pipeline.catalog.entities.values() for e in items}
        hits = [r for r in pending.candidates if rooms_of.get(r) in rooms]
        return hits[0] if len(hits) == 1 else None

    def _follow_up(self, pipeline: Pipeline, whole: ParseResult, part: Part, snap: Snapshot) -> Turn | None:
        lex = lexicon(whole.canonical.locale)
        canonical = whole.canonical
        generic = whole.decision.outcome is Outcome.ACCEPT and whole.decision.intent in GENERIC_CANCEL
        if generic or is_bare_cancel(canonical, lex):
            latest = [f for f in snap.frames if f.request_id == snap.frames[0].request_id]
            for frame in latest:  # newest first: "cancel that" undoes the last request
                rw = self.followups.cancel(pipeline, frame)
                if rw is not None:
                    result = _note(rw.result, rewritten_text=rw.text, refers_to=frame.request_id)
                    return Turn(result, part, "cancel", frame.request_id, "cancel")
            return None
        if not is_slot_only(canonical, lex):
            return None
        for frame in snap.frames:
            out = self.followups.update(pipeline, canonical, frame)
            if out is None:
                continue  # its values do not fit this frame: an older one may take them
            if isinstance(out, Ambiguous):
                return self._ambiguous(pipeline, whole, part, out, frame)
            if not _accepted_as(out.result, frame.intent):
                return None  # the completed request did not pass the gates: no guessing
            result = _note(out.result, rewritten_text=out.text, refers_to=frame.request_id)
            return Turn(result, part, "update", frame.request_id, "slot_update")
        return None

    def _ambiguous(
        self, pipeline: Pipeline, whole: ParseResult, part: Part, amb: Ambiguous, frame: Frame
    ) -> Turn:
        question = clar.entity_question(pipeline.catalog, amb.intent, amb.text, amb.refs, amb.template.locale)
        evidence = {**whole.decision.evidence, "context": {"refers_to": frame.request_id}}
        decision = Decision(
            None, 0.0, Outcome.ABSTAIN, "context", evidence=evidence, reason="ambiguous_entity"
        )
        pending = Pending(
            "", "which_entity", amb.refs, amb.template, self.store.now(), amb.intent, amb.span,
            refers_to=frame.request_id,
        )  # fmt: skip
        result = msgspec.structs.replace(whole, decision=decision)
        return Turn(result, part, "noop", frame.request_id, "slot_update", question, pending)

    def _segments(
        self,
        pipeline: Pipeline,
        req: Request,
        rules: ParseResult,
        whole: Callable[[], ParseResult],
        *,
        locale: str,
        cuts: list[Cut],
    ) -> tuple[list[Turn], int]:
        """The best split of the utterance, or the whole as one request; and the parts' parse count."""
        d = rules.decision
        if d.outcome is Outcome.ACCEPT and _rule_covers(rules):
            return [Turn(rules, Part(req.text, 0, len(req.text)), "start")], 0  # nothing can beat a rule
        if not cuts:
            return [Turn(whole(), Part(req.text, 0, len(req.text)), "start")], 0
        memo: dict[tuple[int, int], ParseResult] = {}
        carried: dict[tuple[int, int, int, int], Rewrite | None] = {}
        # Pass 1, rules only: a split whose every part a rule takes (1.0) beats anything the ranker
        # could say of the whole, so the whole's ranker call is spared.
        rule_memo: dict[tuple[int, int], ParseResult] = {}

        def by_rules(p: Part) -> ParseResult:
            if (p.start, p.end) not in rule_memo:
                rule_memo[(p.start, p.end)] = pipeline.parse(
                    p.text, locale, req.entities, fallback=False, model=False
                )
            return rule_memo[(p.start, p.end)]

        best = self._search(
            pipeline,
            req.text,
            cuts,
            locale=locale,
            parse=by_rules,
            whole_score=(Outcome.ACCEPT, _BELOW_ONE),
            carried=carried,
        )
        if best is None:
            for key, r in rule_memo.items():  # an accepted rule is the full pipeline's answer too
                if r.decision.outcome is Outcome.ACCEPT:
                    memo[key] = r

            def by_pipeline(p: Part) -> ParseResult:
                if (p.start, p.end) not in memo:
                    memo[(p.start, p.end)] = pipeline.parse(p.text, locale, req.entities, fallback=False)
                return memo[(p.start, p.end)]

            w = whole()
            wd = w.decision
            whole_score = (wd.outcome, wd.confidence if wd.intent else 0.0)
            if wd.outcome is Outcome.ACCEPT and wd.confidence >= 1.0:
                # A rule matched only a part ("включи {device}" in "включи {device} и в {room}"): it
                # vouches for nothing else, so a split of accepted parts may still win.
                whole_score = (Outcome.ACCEPT, pipeline.gate_config.accept)
            best = self._search(
                pipeline,
                req.text,
                cuts,
                locale=locale,
                parse=by_pipeline,
                whole_score=whole_score,
                carried=carried,
            )
        parses = len(rule_memo) + len(set(memo) - set(rule_memo)) + sum(1 for v in carried.values() if v)
        if best is None:
            return [Turn(whole(), Part(req.text, 0, len(req.text)), "start")], parses
        turns = []
        for idx, (p, r, rewritten) in enumerate(best):
            if rewritten is not None:
                noted = _note(r, rewritten_text=rewritten, carried_from=idx - 1)
                turns.append(Turn(noted, p, "start", None, "carry_over"))
            else:
                turns.append(Turn(r, p, "start"))
        return turns, parses

    def _search(
        self,
        pipeline: Pipeline,
        text: str,
        cuts: list[Cut],
        *,
        locale: str,
        parse: Callable[[Part], ParseResult],
        whole_score: tuple[Outcome, float],
        carried: dict[tuple[int, int, int, int], Rewrite | None],
    ) -> list[tuple[Part, ParseResult, str | None]] | None:
        """The split with the highest joint confidence (fewer parts on a tie), or None."""
        lex = lexicon(locale)
        reject = pipeline.gate_config.reject
        best: tuple[float, list[tuple[Part, ParseResult, str | None]]] | None = None
        for parts in plans(text, cuts, locale):
            got: list[tuple[Part, ParseResult, str | None]] = []
            for i, p in enumerate(parts):
                r = parse(p)
                rewritten = None
                own = r.decision.outcome is Outcome.ACCEPT
                prev_ok = i and got[-1][1].decision.outcome is Outcome.ACCEPT
                if prev_ok and not (own and not is_slot_only(r.canonical, lex)):
                    # an elliptical part leans on the part before it first, even if it means something alone
                    prev_part, prev = got[-1][0], got[-1][1]
                    key = (prev_part.start, prev_part.end, p.start, p.end)
                    if key not in carried:
                        carried[key] = self._carry(pipeline, r.canonical, prev, lex)
                    if (rw := carried[key]) is not None:
                        r, rewritten = rw.result, rw.text
                conf = r.decision.confidence if r.decision.intent else 0.0
                if (
                    rewritten is None
                    and r.decision.via != "regex"
                    and len(r.canonical.normalized.split()) < 2
                ):
                    break  # one word is an argument ("and roll"), not a request, unless a rule says so
                got.append((p, r, rewritten))
                if conf <= whole_score[1] or (best is not None and conf <= best[0]):
                    break  # the weakest part decides: this split cannot win any more
                if whole_score[0] is Outcome.ACCEPT and r.decision.outcome is not Outcome.ACCEPT:
                    break
            if len(got) < len(parts) or _repeats(got):
                continue
            score = joint_confidence(
                [
                    (r.decision.outcome, r.decision.confidence if r.decision.intent else 0.0)
                    for _, r, _ in got
                ],
                whole_score,
                reject,
            )
            if score is not None and (best is None or score > best[0]):
                best = (score, got)
        return best[1] if best is not None else None

    def _carry(
        self, pipeline: Pipeline, canonical: Canonical, prev: ParseResult, lex: Lexicon
    ) -> Rewrite | None:
        """An elliptical part completed from the part before it.

        Slots: «включи свет на кухне и в спальне» → the same intent in the bedroom. The verb: «включи
        свет и музыку» → «включи музыку», taken only when that is a different intent (so "play rock and
        roll" stays one request).
        """
        frame = frame_of(prev, "", 0, 0.0)
        if frame is None:
            return None
        if is_slot_only(canonical, lex):
            out = self.followups.update(pipeline, canonical, frame)
            return out if isinstance(out, Rewrite) and _accepted_as(out.result, frame.intent) else None
        words = canonical.normalized.split()
        verb = next((w for w in prev.canonical.normalized.split() if w not in lex.fillers), None)
        if verb is None or not words or len(words) > _VERBLESS_WORDS or words[0] == verb:
            return None
        text = f"{verb} {canonical.normalized}"
        result = pipeline.parse(text, canonical.locale, None, fallback=False)
        d = result.decision
        if d.outcome is Outcome.ACCEPT and d.intent != frame.intent:
            return Rewrite(result, text)
        return None

    def _decide_action(self, pipeline: Pipeline, turn: Turn, snap: Snapshot, req: Request) -> Turn:
        """start / cancel / noop for a request decided on its own words; LLM fallback; clarification."""
        result = turn.result
        if (
            result.decision.outcome is not Outcome.ACCEPT
            and pipeline.llm is not None
            and turn.resolution is None
        ):
            result = pipeline.parse(turn.part.text, result.canonical.locale, req.entities)
        d = result.decision
        if d.outcome is Outcome.ACCEPT:
            ref = next(
                (
                    f
                    for f in snap.frames
                    if cancel_intent_of(pipeline.catalog, f.intent) == d.intent
                    and _compatible(d.slots, f.slots)
                ),
                None,
            )  # "отмени будильник" after "поставь будильник на семь"; not "выключи телевизор" after the light
            if ref is not None:
                return msgspec.structs.replace(turn, result=result, action="cancel", refers_to=ref.request_id)
            action = "cancel" if d.intent in GENERIC_CANCEL else "start"
            return msgspec.structs.replace(turn, result=result, action=action)
        question = clar.for_decision(d, result.canonical, pipeline.gate_config, pipeline.catalog)
        pending = None
        if question is not None:
            pending = self._pending_for(question, result.canonical)
        return msgspec.structs.replace(
            turn, result=result, action="noop", refers_to=None, clarify=question, pending=pending
        )

    def _pending_for(self, question: Clarify, canonical: Canonical) -> Pending:
        if question.question_kind == "which_entity":
            text = question.text if isinstance(question.text, str) else ""
            ent = next((e for e in canonical.entities if e.text == text), None)
            return Pending(
                "", "which_entity", tuple(c.ref for c in question.candidates if c.ref), canonical,
                self.store.now(), question.intent if isinstance(question.intent, str) else None,
                (ent.start, ent.end) if ent is not None else None,
            )  # fmt: skip
        return Pending(
            "", "which_intent", tuple(c.intent for c in question.candidates if c.intent), canonical,
            self.store.now(), same_domain=question.domain is not None,
        )  # fmt: skip

    def _remember(self, req: Request, answer: Answer) -> None:
        if not req.scope:
            return
        now = self.store.now()
        frames = [
            f
            for i, t in enumerate(answer.turns)
            if (f := frame_of(t.result, req.request_id, i, now)) is not None
        ]
        pending = next((t.pending for t in answer.turns if t.pending is not None), None)
        if pending is not None:
            pending = msgspec.structs.replace(pending, request_id=req.request_id, at=now)
        self.store.update(req.scope, frames, pending)


def _repeats(got: list[tuple[Part, ParseResult, str | None]]) -> bool:
    """Two neighbours with the same frame are one request said twice ("отмени, отмени это"), not two."""
    for (_, a, _), (_, b, _) in itertools.pairwise(got):
        da, db = a.decision, b.decision
        if (
            da.outcome is Outcome.ACCEPT
            and db.outcome is Outcome.ACCEPT
            and (da.intent, da.slots) == (db.intent, db.slots)
        ):
            return True
    return False


def _compatible(slots: dict[str, Any], frame_slots: dict[str, Any]) -> bool:
    """No slot the two share has different values."""
    return all(frame_slots[k] == v for k, v in slots.items() if k in frame_slots)


def _rule_covers(result: ParseResult) -> bool:
    """Whether the regex rule that decided matched the whole masked text (rules are searched)."""
    pattern = result.decision.evidence.get("pattern")
    if result.decision.via != "regex" or not isinstance(pattern, str):
        return True
    try:
        return re.fullmatch(pattern, result.canonical.masked) is not None
    except re.error:
        return True


def _accepted_as(result: ParseResult, intent: str | None) -> bool:
    d = result.decision
    return d.outcome is Outcome.ACCEPT and d.intent == intent


# -- the wire -------------------------------------------------------------------------------------------


def _context(turn: Turn) -> SegmentContext:
    if turn.resolution:
        return SegmentContext(turn.action, turn.refers_to, turn.resolution)
    return SegmentContext(turn.action, turn.refers_to)


def to_wire(answer: Answer, accept: float, request_id: str) -> dict[str, Any]:
    """The ``/parse`` result: the first request's contract fields, plus context, clarify and segments."""
    first = answer.turns[0]
    extra: dict[str, Any] = {"context": _context(first)}
    asked = next(((i, t.clarify) for i, t in enumerate(answer.turns) if t.clarify is not None), None)
    if asked is not None:
        i, question = asked
        extra["clarify"] = msgspec.structs.replace(question, segment_index=i) if answer.split else question
    if answer.split:
        extra["segments"] = [segment_wire(i, t, accept, request_id) for i, t in enumerate(answer.turns)]
    wire = msgspec.structs.replace(wire_result(first.result, accept, request_id), **extra)
    out: dict[str, Any] = msgspec.to_builtins(wire)
    return out


def segment_wire(index: int, turn: Turn, accept: float, request_id: str) -> Segment:
    """One entry of ``segments``."""
    w = wire_result(turn.result, accept, request_id)
    extra: dict[str, Any] = {"context": _context(turn)}
    if turn.clarify is not None:
        extra["clarify"] = msgspec.structs.replace(turn.clarify, segment_index=index)
    if turn.resolution == "carry_over":
        extra["carried_over"] = True
    return Segment(
        index=index,
        text=turn.part.text,
        start=turn.part.start,
        end=turn.part.end,
        top_intent=w.top_intent,
        confidence=w.confidence,
        slots=w.slots,
        via=w.via,
        decision=w.decision,
        reason=w.reason,
        alternatives=w.alternatives,
        missing_slots=w.missing_slots,
        **extra,
    )


def audit_info(answer: Answer, index: int, session_id: str | None) -> dict[str, Any]:
    """What the decision audit log keeps of the conversation for one request (``tools.flows`` reads it)."""
    turn = answer.turns[index]
    info: dict[str, Any] = {
        "session_id": session_id,
        "scope": answer.scope,
        "context": {k: v for k, v in msgspec.to_builtins(_context(turn)).items() if v is not None},
    }
    if turn.clarify is not None:
        info["clarify"] = turn.clarify.question_kind
    if answer.split:
        info["segment"] = {
            "index": index,
            "of": len(answer.turns),
            "start": turn.part.start,
            "end": turn.part.end,
        }
    if answer.split or turn.result.canonical.text != turn.part.text:
        info["text"] = turn.part.text  # the words said, not the completed request
    return info
