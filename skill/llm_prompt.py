"""What the local LLM sees and how its scores become a confidence.

The model is not asked to write anything. A few-shot prefix built from the catalog
(``<utterance> => <intent as words>`` lines) is evaluated once and kept in the KV cache; a request
appends ``<utterance> =>`` and the stage reads the log-likelihood of each candidate continuation
(``" <intent as words>\\n"``: the ranker's top candidates and ``none``) from one batched evaluation.
This module holds the pure parts: the prefix, the request line, the batch layout that shares the
request's tokens and the candidates' common token prefixes, and the features of the confidence map.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from .catalog import Catalog
from .scoring import Calibration, calibrate

NONE = "none"  # the answer "no catalog intent fits"
ARROW = " =>"  # a request line ends here; the continuation starts with a space
END = "\n"  # every continuation ends a line, so a label that is a prefix of another is not favoured
VAL_EVERY = 5  # tools/_data.py holds out every 5th example of an (intent, locale) list: never use those

# What the fitted confidence map reads about the chosen candidate (see ``llm_features``).
LLM_FEATURES = ("llm_logit", "llm_margin", "ranker_score", "ranker_top")
_P_CLIP = 1e-6
_SPACE = re.compile(r"\s+")


class LlmSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-model knobs, read from ``<model>.gguf.nlu.json`` beside the GGUF file when it exists.

    ``temperature`` divides the candidates' log-likelihoods before they are normalised.
    ``calibration`` is the logistic map from :data:`LLM_FEATURES` to P(the chosen intent is right),
    fitted by ``python -m tools.llm_calibrate`` on held-out requests; without it the confidence is
    the normalised likelihood itself. ``accept`` is the calibration's verdict: ``false`` when the
    stage could not reach ``precision_target`` on the held-out rows, and then the stage stays off.
    """

    temperature: float = 1.0
    n_ctx: int = 1536  # the prefix, a request and its candidates; the KV cache grows with it
    n_batch: int = 256  # the prefix is evaluated in chunks of this; a request is one chunk
    max_candidates: int = 4  # the ranker's top candidates; "none" is always added
    max_prefix_tokens: int = 1024  # the few-shot prefix stops growing here (load time grows with it)
    examples_per_intent: int = 2  # per locale, at most
    none_examples: int = 3  # per locale, from the catalog's out_of_scope lists
    max_request_tokens: int = 96  # a longer utterance is cut to this many tokens
    precision_target: float = 0.9  # tools.llm_calibrate turns the stage off below this
    prefix_cache: bool = True  # keep the evaluated prefix on disk (user cache dir) for the next load
    accept: bool = True
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
        settings.check(str(sidecar))
        return settings

    def check(self, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` for values the stage cannot work with."""
        if self.temperature <= 0:
            raise ValueError(f"{where}: temperature must be > 0")
        if self.max_candidates < 1 or self.n_batch < 32 or self.max_request_tokens < 8:
            raise ValueError(f"{where}: max_candidates >= 1, n_batch >= 32, max_request_tokens >= 8")
        cal = self.calibration
        if cal is not None:
            if tuple(cal.features) != LLM_FEATURES:
                raise ValueError(f"{where}: calibration features must be {list(LLM_FEATURES)}")
            sizes = {len(cal.mean), len(cal.scale), len(cal.coef)}
            if sizes != {len(LLM_FEATURES)}:
                raise ValueError(f"{where}: calibration needs {len(LLM_FEATURES)} values per field")
            if not all(np.isfinite([*cal.mean, *cal.scale, *cal.coef, cal.bias])) or min(cal.scale) <= 0:
                raise ValueError(f"{where}: calibration values must be finite, scales > 0")


def sidecar_path(model: Path) -> Path:
    """``<model>.gguf.nlu.json`` beside the model file."""
    return model.with_name(model.name + ".nlu.json")


# --- the prompt ---------------------------------------------------------------------------------


def one_line(text: str) -> str:
    """An utterance as it appears on a prompt line: whitespace collapsed, no line breaks."""
    return _SPACE.sub(" ", text).strip()


def labels(names: Sequence[str]) -> dict[str, str]:
    """The word each intent is written as: ``device.turn_off`` -> ``device turn off``.

    Plain words cost fewer tokens than dots and underscores and read more naturally to a base model
    (measured: docs/LLM.md). Two intents that would read the same keep their names.
    """
    words = {n: n.replace(".", " ").replace("_", " ") for n in [*names, NONE]}
    counts: dict[str, int] = {}
    for w in words.values():
        counts[w] = counts.get(w, 0) + 1
    return {n: w if counts[w] == 1 else n for n, w in words.items()}


def example_line(text: str, label: str) -> str:
    """One few-shot line."""
    return f"{one_line(text)}{ARROW} {label}{END}"


def request_line(text: str) -> str:
    """The per-request prompt: the utterance, then what precedes every continuation."""
    return f"{one_line(text)}{ARROW}"


def continuation(label: str) -> str:
    """What the model is scored on for a candidate."""
    return f" {label}{END}"


def fewshot_examples(catalog: Catalog, settings: LlmSettings) -> list[tuple[str, str]]:
    """(utterance, intent) pairs in the order they are offered to the prefix.

    Round robin: the first example of every intent in each locale, then the second, and so on, so
    every intent is shown before any gets a second example; out-of-scope lines ("none") go in
    between. Examples the training tools hold out (every 5th of a list) are never used.
    """
    locales = sorted({loc for intent in catalog.intents.values() for loc in intent.examples})
    out: list[tuple[str, str]] = []
    for rank in range(settings.examples_per_intent):
        for name, intent in catalog.intents.items():
            for loc in locales:
                usable = [
                    t for i, t in enumerate(intent.examples.get(loc, ())) if i % VAL_EVERY != VAL_EVERY - 1
                ]
                if rank < len(usable):
                    out.append((usable[rank], name))
        for loc in locales:
            usable = [
                t for i, t in enumerate(catalog.out_of_scope.get(loc, ())) if i % VAL_EVERY != VAL_EVERY - 1
            ]
            share = -(-settings.none_examples // settings.examples_per_intent)  # spread over the rounds
            out += [(t, NONE) for t in usable[rank * share : min((rank + 1) * share, settings.none_examples)]]
    return out


def fewshot_prefix(
    catalog: Catalog, settings: LlmSettings, count_tokens: Callable[[str], int]
) -> tuple[str, list[tuple[str, str]]]:
    """The prefix text and the examples in it: as many as fit ``max_prefix_tokens``, shuffled.

    The order is shuffled with a fixed seed so that no intent sits at the end of the prefix (the
    place a small model weighs most); the same catalog always gives the same prefix.
    """
    names = labels(list(catalog.intents))
    chosen: list[tuple[str, str]] = []
    used = 0
    for text, intent in fewshot_examples(catalog, settings):
        cost = count_tokens(example_line(text, names[intent]))
        if used + cost > settings.max_prefix_tokens:
            break
        chosen.append((text, intent))
        used += cost
    random.Random(len(chosen)).shuffle(chosen)
    return "".join(example_line(t, names[i]) for t, i in chosen), chosen


# --- one batch for all candidates ---------------------------------------------------------------


class BatchPlan(msgspec.Struct, frozen=True):
    """Tokens of one llama.cpp batch: the request, then a token trie of the candidates' continuations.

    Candidate ``c`` runs in sequence ``c``; the request's tokens belong to every sequence, and a trie
    node to every candidate whose continuation passes through it, so shared tokens are evaluated once.
    ``reads[c]`` lists (batch row whose logits predict the token, token) for each token of ``c``.
    """

    tokens: tuple[int, ...]
    pos: tuple[int, ...]
    seq_ids: tuple[tuple[int, ...], ...]
    logits: tuple[bool, ...]
    reads: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def logit_rows(self) -> int:
        return sum(self.logits)


def plan_batch(request: Sequence[int], continuations: Sequence[Sequence[int]], start: int) -> BatchPlan:
    """Lay out the request at positions ``start..`` and the candidates' trie after it."""
    if not request or any(not c for c in continuations):
        raise ValueError("empty request or continuation")
    every = tuple(range(len(continuations)))
    tokens = list(request)
    pos = list(range(start, start + len(request)))
    seqs: list[list[int]] = [list(every) for _ in request]
    logits = [False] * len(request)
    logits[-1] = True
    root = len(request) - 1
    nodes: dict[tuple[int, ...], int] = {}
    reads: list[tuple[tuple[int, int], ...]] = []
    for c, cont in enumerate(continuations):
        row, out = root, []
        for depth, tok in enumerate(cont):
            out.append((row, tok))
            if depth == len(cont) - 1:
                break  # the last token only needs to be read, not evaluated
            key = tuple(cont[: depth + 1])
            if key not in nodes:
                nodes[key] = len(tokens)
                tokens.append(tok)
                pos.append(start + len(request) + depth)
                seqs.append([])
                logits.append(True)
            row = nodes[key]
            seqs[row].append(c)
        reads.append(tuple(out))
    return BatchPlan(tuple(tokens), tuple(pos), tuple(tuple(s) for s in seqs), tuple(logits), tuple(reads))


# --- from scores to a confidence ------------------------------------------------------------------


def normalise(logliks: Sequence[float], temperature: float = 1.0) -> np.ndarray:
    """The candidates' share: softmax of the log-likelihoods divided by ``temperature``."""
    z = np.asarray(logliks, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def _logit(p: float) -> float:
    p = min(max(p, _P_CLIP), 1.0 - _P_CLIP)
    return float(np.log(p / (1.0 - p)))


def llm_features(probs: dict[str, float], intent: str, candidates: Sequence[tuple[str, float]]) -> np.ndarray:
    """The calibration features of the chosen candidate ``intent``.

    ``llm_logit`` is the log-odds of its normalised likelihood (candidates and "none", at the
    sidecar's temperature), ``llm_margin`` the log-odds gap to the runner-up, ``ranker_score`` the
    ranker's confidence in the same intent (0 when it was not a ranker candidate), and
    ``ranker_top`` 1 when it is the ranker's first candidate.
    """
    p = probs.get(intent, 0.0)
    rest = [v for k, v in probs.items() if k != intent]
    runner = max(rest, default=0.0)
    scores = dict(candidates)
    top = 1.0 if candidates and candidates[0][0] == intent else 0.0
    return np.array([_logit(p), _logit(p) - _logit(runner), float(scores.get(intent, 0.0)), top])


def combined(
    probs: dict[str, float],
    candidates: Sequence[tuple[str, float]],
    cal: Calibration | tuple[np.ndarray, float],
) -> dict[str, float]:
    """The fitted map's P(right) for every ranker candidate: its likelihood share and the ranker's view.

    The map is fitted on every candidate of the held-out requests (right or not), so the stage can
    pick the candidate the combination trusts most, not only the one the model likes best.
    """
    return {n: float(calibrate(llm_features(probs, n, candidates), cal)[()]) for n, _ in candidates}


def calibrated_shares(probs: dict[str, float], intent: str, confidence: float) -> dict[str, float]:
    """The chosen intent at its calibrated confidence; the others share the rest in proportion."""
    rest = {n: p for n, p in probs.items() if n != intent}
    mass = sum(rest.values())
    return {intent: confidence} | {
        n: (1.0 - confidence) * p / mass if mass > 0 else 0.0 for n, p in rest.items()
    }
