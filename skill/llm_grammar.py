"""What the local LLM sees and may say: the catalog's answer grammar (GBNF), its skeleton, the prompt,
and how the grammar-admitted logits of the intent name become a probability."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from .canonicalize import Canonical
from .catalog import Catalog
from .scoring import Calibration

NONE = "none"  # the answer "no catalog intent fits"
# The prompt ends with this, so the model's first token is already part of the intent name.
ANSWER_OPEN = '{"intent": "'
_VALUE_RULE = "value"
_NULL = b"null"


# What the fitted confidence map reads about the chosen intent (see ``llm_features``).
LLM_FEATURES = ("llm_logit", "ranker_score", "ranker_top")
_P_CLIP = 1e-6


def llm_features(p_chosen: float, intent: str, candidates: Sequence[tuple[str, float]]) -> np.ndarray:
    """The calibration features of an LLM answer.

    ``llm_logit`` is the log-odds of the chosen name's probability (at the sidecar's temperature),
    ``ranker_score`` the ranker's confidence in the same intent (0 when it was not a candidate), and
    ``ranker_top`` 1 when the LLM agreed with the ranker's first candidate.
    """
    p = min(max(p_chosen, _P_CLIP), 1.0 - _P_CLIP)
    scores = dict(candidates)
    top = 1.0 if candidates and candidates[0][0] == intent else 0.0
    return np.array([np.log(p / (1.0 - p)), float(scores.get(intent, 0.0)), top])


class LlmSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-model knobs, read from ``<model>.gguf.nlu.json`` beside the GGUF file when it exists.

    ``temperature`` divides the grammar-admitted logits before the softmax. ``calibration`` is the
    logistic map from :data:`LLM_FEATURES` to P(the named intent is right), fitted by
    ``python -m tools.llm_calibrate`` on held-out requests; without it the confidence is the
    (tempered) probability itself. ``calibration_report`` records how and on what it was fitted.
    """

    temperature: float = 1.0
    n_ctx: int = 4096
    n_batch: int = 64  # also the granularity of budget checks while the request's prompt is evaluated
    max_candidates: int = 4
    examples_per_candidate: int = 2
    max_value_chars: int = 32
    calibration: Calibration | None = None
    calibration_report: dict[str, Any] | None = None

    @classmethod
    def for_model(cls, model: Path) -> LlmSettings:
        """Defaults, overridden by the sidecar file if present (unknown keys are errors)."""
        sidecar = sidecar_path(model)
        if not sidecar.exists():
            return cls()
        try:
            settings = msgspec.json.decode(sidecar.read_bytes(), type=cls)
        except msgspec.DecodeError as exc:
            raise ValueError(f"{sidecar}: {exc}") from exc
        if settings.temperature <= 0:
            raise ValueError(f"{sidecar}: temperature must be > 0")
        cal = settings.calibration
        if cal is not None:
            if tuple(cal.features) != LLM_FEATURES:
                raise ValueError(f"{sidecar}: calibration features must be {list(LLM_FEATURES)}")
            sizes = {len(cal.mean), len(cal.scale), len(cal.coef)}
            if sizes != {len(LLM_FEATURES)}:
                raise ValueError(f"{sidecar}: calibration needs {len(LLM_FEATURES)} values per field")
            if not all(np.isfinite([*cal.mean, *cal.scale, *cal.coef, cal.bias])) or min(cal.scale) <= 0:
                raise ValueError(f"{sidecar}: calibration values must be finite, scales > 0")
        return settings


def sidecar_path(model: Path) -> Path:
    """``<model>.gguf.nlu.json`` beside the model file."""
    return model.with_name(model.name + ".nlu.json")


class AnswerShape(msgspec.Struct, frozen=True):
    """The answers the grammar admits: each intent (and "none") with its own slot names, in order."""

    slots: dict[str, tuple[str, ...]]
    max_value_chars: int = 32

    @classmethod
    def from_catalog(cls, catalog: Catalog, max_value_chars: int = 32) -> AnswerShape:
        """One entry per catalog intent plus "none" (no slots)."""
        slots = {name: tuple(intent.slots) for name, intent in catalog.intents.items()}
        slots[NONE] = ()
        return cls(slots=slots, max_value_chars=max_value_chars)

    def pieces(self, intent: str) -> list[bytes | None]:
        """The intent's answer after its name: fixed byte strings, ``None`` where a slot value goes."""
        names = self.slots[intent]
        if not names:
            return [b'", "slots": {}}']
        out: list[bytes | None] = []
        for idx, slot in enumerate(names):
            sep = '", "slots": {' if idx == 0 else ", "
            out += [f"{sep}{json.dumps(slot, ensure_ascii=False)}: ".encode(), None]
        out.append(b"}}")
        return out

    def max_answer_bytes(self) -> int:
        """An upper bound on the answer's length in bytes (a token is at least one byte)."""
        worst = 0
        for intent in self.slots:
            fixed = sum(len(p) for p in self.pieces(intent) if p is not None)
            # a value is null or a quoted string of up to max_value_chars UTF-8 characters
            values = len(self.slots[intent]) * (2 + 4 * self.max_value_chars)
            worst = max(worst, len(intent.encode()) + fixed + values)
        return worst


def _literal(text: str) -> str:
    """A GBNF string literal for ``text``."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def gbnf(shape: AnswerShape, root: str = "root") -> str:
    """The llama.cpp grammar of the whole answer object.

    ``root`` admits ``{"intent": ...}``; rule ``answer`` starts after ``ANSWER_OPEN`` (the prompt
    ends with it), so a stage can run the same grammar from there. Slots come in the intent's
    declared order, each ``null`` or a short string without quotes or backslashes, no free whitespace.
    """
    lines = [f"{root} ::= {_literal(ANSWER_OPEN)} answer"]
    alts: list[str] = []
    for idx, intent in enumerate(shape.slots):
        rule = f"intent{idx}"
        alts.append(rule)
        parts = [_literal(intent)]
        for piece in shape.pieces(intent):
            parts.append(_VALUE_RULE if piece is None else _literal(piece.decode()))
        lines.append(f"{rule} ::= " + " ".join(parts))
    lines.insert(1, "answer ::= " + " | ".join(alts))
    lines.append(f'{_VALUE_RULE} ::= "null" | "\\"" char{{0,{shape.max_value_chars}}} "\\""')
    # no quote, backslash or control character, no surrogate, nothing past U+10FFFF
    lines.append('char ::= [^"\\\\\\x00-\\x1F\\uD800-\\uDFFF\\U00110000-\\U001FFFFF]')
    return "\n".join(lines) + "\n"


class Progress(msgspec.Struct, frozen=True):
    """Where a partial answer stands: the text the grammar forces next, and whether it is complete."""

    forced: bytes = b""
    complete: bool = False
    intent: str | None = None  # known once the name is settled


def progress(shape: AnswerShape, out: bytes) -> Progress:
    """Match the answer so far (the bytes after ``ANSWER_OPEN``) against the skeleton.

    Raises ``ValueError`` if ``out`` is not a prefix of any admitted answer (a grammar bug).
    """
    quote = out.find(b'"')
    if quote < 0:
        names = [n for n in shape.slots if n.encode().startswith(out)]
        if not names:
            raise ValueError(f"no intent starts with {out!r}")
        if len(names) > 1:
            return Progress()
        name = names[0]
        first = shape.pieces(name)[0]
        assert first is not None
        return Progress(forced=name.encode()[len(out) :] + first, intent=name)
    name = out[:quote].decode()
    if name not in shape.slots:
        raise ValueError(f"unknown intent {name!r}")
    rest = out[quote:]
    pos = 0
    for piece in shape.pieces(name):
        tail = rest[pos:]
        if piece is not None:
            if tail.startswith(piece):
                pos += len(piece)
                continue
            if piece.startswith(tail):
                return Progress(forced=piece[len(tail) :], intent=name)
            raise ValueError(f"expected {piece!r} at {out!r}")
        if not tail:
            return Progress(intent=name)  # the model chooses null or a string
        if tail.startswith(_NULL):
            pos += len(_NULL)
        elif _NULL.startswith(tail):
            return Progress(forced=_NULL[len(tail) :], intent=name)
        elif tail.startswith(b'"'):
            end = tail.find(b'"', 1)
            if end < 0:
                return Progress(intent=name)  # inside a string value
            pos += end + 1
        else:
            raise ValueError(f"bad value at {out!r}")
    if pos != len(rest):
        raise ValueError(f"trailing bytes after the answer: {out!r}")
    return Progress(complete=True, intent=name)


def parse_answer(out: bytes) -> tuple[str, dict[str, str]]:
    """The intent and the non-empty slot values of a complete answer."""
    # A byte-level model can spell a character in an overlong encoding the grammar cannot see.
    data = json.loads(ANSWER_OPEN + out.decode("utf-8", errors="replace"))
    slots = {k: v for k, v in data["slots"].items() if isinstance(v, str) and v.strip()}
    return data["intent"], slots


def name_consistent(name: str, prefix: bytes, piece: bytes) -> bool:
    """Whether emitting ``piece`` after ``prefix`` (inside the name) keeps ``name`` possible."""
    text = prefix + piece
    target = name.encode() + b'"'
    return target.startswith(text) or text.startswith(target)


class NameStep(msgspec.Struct, frozen=True):
    """One sampling step inside the intent name: the choices the grammar allowed and their logits."""

    prefix: bytes
    pieces: tuple[bytes, ...]
    logits: tuple[float, ...]


def name_probabilities(
    steps: Sequence[NameStep], chosen: str, others: Sequence[str], temperature: float
) -> dict[str, float]:
    """P(name) for the chosen intent and an upper bound for each other name, at ``temperature``.

    At each step the probability mass of the admitted tokens that keep a name possible is multiplied
    in; an alternative stops at the step where it leaves the chosen path (its subtree's mass).
    """
    out: dict[str, float] = {}
    for name in (chosen, *others):
        prob = 1.0
        for step in steps:
            z = np.asarray(step.logits, dtype=np.float64) / temperature
            p = np.exp(z - z.max())
            p /= p.sum()
            keep = np.array([name_consistent(name, step.prefix, piece) for piece in step.pieces])
            prob *= float(p[keep].sum())
            chosen_keeps = [name_consistent(chosen, step.prefix, piece) for piece in step.pieces]
            if name != chosen and not any(k and c for k, c in zip(keep, chosen_keeps, strict=True)):
                break  # left the chosen path: this subtree's mass is all we know
        out[name] = prob
    return out


# --- prompt -------------------------------------------------------------------------------------

INSTRUCTIONS = (
    "You route a user's command to a smart-home assistant. Pick exactly one intent from the list "
    'below, or "none" if no intent fits the command. Answer with one JSON object: '
    '{"intent": "<name or none>", "slots": {...}} using only the slot names listed for that intent; '
    "copy each slot value from the command, or write null when the command has no value for it. "
    "Candidates from a smaller classifier come with their scores: use them as hints, they may be wrong."
)


def _describe(descriptions: dict[str, str]) -> str:
    return descriptions.get("en") or next(iter(descriptions.values()), "")


def fixed_prompt(catalog: Catalog) -> str:
    """The part of the prompt every request shares: instructions and the catalog's intents."""
    lines = [INSTRUCTIONS, "", "Intents:"]
    for name, intent in catalog.intents.items():
        line = f"- {name}: {_describe(intent.description)}"
        if intent.slots:
            slots = ", ".join(
                f"{s} ({spec.description})" if spec.description else s for s, spec in intent.slots.items()
            )
            line += f" [slots: {slots}]"
        lines.append(line)
    lines.append(f"- {NONE}: none of the above [no slots]")
    return "\n".join(lines)


def request_prompt(
    catalog: Catalog,
    canonical: Canonical,
    candidates: Sequence[tuple[str, float]],
    matched: dict[str, list[str]],
    examples_per_candidate: int = 2,
) -> str:
    """The per-request part: the ranker's candidates with scores and examples, then the command."""
    lines = ["Classifier candidates:"]
    for name, score in candidates:
        intent = catalog.intents.get(name)
        if intent is None:
            continue
        examples = list(matched.get(name, []))
        if not examples:
            examples = list(intent.examples.get(canonical.locale) or next(iter(intent.examples.values()), []))
        shown = "; ".join(json.dumps(e, ensure_ascii=False) for e in examples[:examples_per_candidate])
        lines.append(f"- {name} (score {score:.2f})" + (f", like: {shown}" if shown else ""))
    if len(lines) == 1:
        lines.append("- (none)")
    lines.append(f"Command: {json.dumps(canonical.text.strip(), ensure_ascii=False)}")
    if canonical.masked != canonical.normalized:
        lines.append(f"Canonicalized: {json.dumps(canonical.masked, ensure_ascii=False)}")
    values = [f"{e.placeholder}={e.ref or e.value}" for e in canonical.entities]
    if values:
        lines.append("Recognized values: " + ", ".join(values))
    return "\n".join(lines)


def matched_examples(evidence: dict[str, Any], top: str | None) -> dict[str, list[str]]:
    """The ranker's matched examples per intent (a list belongs to its top intent)."""
    raw = evidence.get("matched_examples")
    if isinstance(raw, dict):
        return {str(k): [str(x) for x in v] for k, v in raw.items() if isinstance(v, list)}
    if isinstance(raw, list) and top:
        return {top: [str(x) for x in raw]}
    return {}
