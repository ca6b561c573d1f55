"""Local LLM fallback: llama.cpp, grammar-constrained to the catalog, one generation at a time, in budget."""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from .canonicalize import Canonical
from .catalog import Catalog
from .config import Config
from .decision import Candidate, Decision, Outcome
from .llm_grammar import (
    ANSWER_OPEN,
    NONE,
    AnswerShape,
    LlmSettings,
    NameStep,
    fixed_prompt,
    gbnf,
    llm_features,
    matched_examples,
    name_probabilities,
    parse_answer,
    progress,
    request_prompt,
)
from .scoring import calibrate

if TYPE_CHECKING:
    from llama_cpp import Llama

_LOGGER = logging.getLogger(__name__)
VIA = "llm"
_SENTINEL = "\u2063REQUEST\u2063"  # marks where the per-request text goes inside the chat template
_MIN_REQUEST_TOKENS = 256


class _Timeout(Exception):
    """The request's budget ran out."""


class _TooLong(Exception):
    """The request does not fit the context after the cached prefix."""


class _Generation(msgspec.Struct, frozen=True):
    """The raw result of one constrained generation."""

    output: bytes
    steps: tuple[NameStep, ...]
    prompt_tokens: int
    generated_tokens: int
    forced_tokens: int


class LlmStage:
    """The fallback stage; owns one llama.cpp context with the fixed prompt prefix evaluated once."""

    def __init__(
        self, llm: Llama, catalog: Catalog, config: Config, settings: LlmSettings, name: str
    ) -> None:
        import llama_cpp  # noqa: PLC0415 - optional dependency, present once a Llama exists

        self._lc = llama_cpp
        self._llm = llm
        self.catalog = catalog
        self.settings = settings
        self.model_name = name
        self.budget_s = config.llm_budget_ms / 1000.0
        self.queue = config.llm_queue
        self.clock: Callable[[], float] = time.monotonic
        self.shape = AnswerShape.from_catalog(catalog, settings.max_value_chars)
        cal = settings.calibration
        self._calibration = cal.linear() if cal is not None else None
        self.grammar_text = gbnf(self.shape)
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._n_vocab = llm.n_vocab()
        self._grammar = llama_cpp.llama_sampler_init_grammar(
            self._vocab, self.grammar_text.encode(), b"answer"
        )
        if not self._grammar:
            raise ValueError("llama.cpp rejected the catalog grammar")
        dtype = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        self._cand = np.zeros(self._n_vocab, dtype=dtype)
        self._cand["id"] = np.arange(self._n_vocab, dtype=np.intc)
        self._one = np.zeros(1, dtype=dtype)
        self._pieces: dict[int, bytes] = {}
        self._piece_ids: dict[bytes, int] | None = None
        self._longest_piece = 1
        self._slot = threading.Lock()  # the single generation slot
        self._count_lock = threading.Lock()
        self._pending = 0
        head, self._tail = self._frame(fixed_prompt(catalog))
        self._prefix = llm.tokenize(head.encode(), add_bos=True, special=True)
        self.max_answer_tokens = self.shape.max_answer_bytes() + 4
        room = settings.n_ctx - len(self._prefix) - self.max_answer_tokens
        if room < _MIN_REQUEST_TOKENS:
            raise ValueError(
                f"n_ctx={settings.n_ctx} leaves {room} tokens for a request after the "
                f"{len(self._prefix)}-token catalog prompt: raise n_ctx in the .nlu.json sidecar"
            )
        started = time.perf_counter()
        self._eval_prefix()
        self.prefix_ms = (time.perf_counter() - started) * 1000.0
        self._tokens_for(b'", "slots": {}}')  # builds the piece table now if the tokenizer needs it

    @classmethod
    def load(cls, config: Config, catalog: Catalog, settings: LlmSettings | None = None) -> LlmStage:
        """Load the configured GGUF file; any failure raises (the service then disables the stage).

        ``settings`` replaces the sidecar's (the calibration tool loads the model uncalibrated).
        """
        if not config.llm_model:
            raise ValueError("no LLM model configured")
        path = Path(config.llm_model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LLM model file not found: {path}")
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError(f"not a GGUF file: {path}")
        try:
            from llama_cpp import Llama  # noqa: PLC0415 - optional dependency
        except ImportError as exc:
            raise ImportError(f"llama-cpp-python is not installed (pip install -e '.[llm]'): {exc}") from exc
        settings = settings or LlmSettings.for_model(path)
        started = time.perf_counter()
        llm = Llama(
            model_path=str(path),
            n_ctx=settings.n_ctx,
            n_batch=settings.n_batch,
            n_ubatch=settings.n_batch,
            n_threads=config.llm_threads,
            n_threads_batch=config.llm_threads,
            logits_all=False,
            verbose=False,
        )
        stage = cls(llm, catalog, config, settings, path.name)
        _LOGGER.info(
            "LLM fallback ready: %s (%d intents, prefix %d tokens cached in %.0f ms, loaded in %.0f ms)",
            path.name,
            len(catalog.intents),
            len(stage._prefix),
            stage.prefix_ms,
            (time.perf_counter() - started) * 1000.0,
        )
        return stage

    @property
    def summary(self) -> str:
        """One line for /health: the model and how its confidence is calibrated."""
        report = self.settings.calibration_report or {}
        if self.settings.calibration is None:
            return f"{self.model_name} (confidence uncalibrated, temperature {self.settings.temperature:g})"
        rows = report.get("rows", "?")
        ece = report.get("ece_crossfit", report.get("ece_fit"))
        tail = f", cross-fitted ECE {ece:.3f}" if isinstance(ece, float) else ""
        return f"{self.model_name} (confidence calibrated on {rows} requests{tail})"

    def close(self) -> None:
        """Free the grammar sampler and the model."""
        with self._slot:
            if self._grammar:
                self._lc.llama_sampler_free(self._grammar)
                self._grammar = None
            self._llm.close()

    # --- the FallbackStage protocol ---------------------------------------------------------------

    def decide_fallback(self, canonical: Canonical, proposal: Decision) -> Decision:
        """Ask the model to settle an abstention; never waits past the budget."""
        started = self.clock()
        deadline = started + self.budget_s
        with self._count_lock:
            if self._pending > self.queue:  # one generating plus ``queue`` waiting
                return Decision.abstain(VIA, "llm_queue_full", {"queue": self.queue})
            self._pending += 1
        try:
            if not self._slot.acquire(timeout=max(0.0, deadline - self.clock())):
                return self._timeout(started, "waiting")
            try:
                candidates = self._candidates(proposal)
                text = request_prompt(
                    self.catalog,
                    canonical,
                    candidates,
                    matched_examples(proposal.evidence, proposal.intent),
                    self.settings.examples_per_candidate,
                )
                gen = self._generate(text, deadline)
            finally:
                self._slot.release()
        except _Timeout:
            return self._timeout(started, "generating")
        except _TooLong:
            return Decision.abstain(VIA, "llm_prompt_too_long", {"n_ctx": self.settings.n_ctx})
        except Exception as exc:  # noqa: BLE001 - a failed generation is an error decision, not a crash
            _LOGGER.exception("LLM generation failed")
            return Decision(
                None,
                0.0,
                Outcome.ERROR,
                VIA,
                evidence={"error": f"{type(exc).__name__}: {exc}"},
                reason="llm_error",
            )
        finally:
            with self._count_lock:
                self._pending -= 1
        if self.clock() > deadline:
            return self._timeout(started, "finished late")  # the late answer is dropped, never emitted
        return self._decide(gen, canonical, candidates, (self.clock() - started) * 1000.0)

    # --- internals ----------------------------------------------------------------------------------

    def _timeout(self, started: float, where: str) -> Decision:
        ms = round((self.clock() - started) * 1000.0, 1)
        return Decision.abstain(
            VIA, "llm_timeout", {"budget_ms": round(self.budget_s * 1000), "ms": ms, "where": where}
        )

    def _candidates(self, proposal: Decision) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        if proposal.intent is not None:
            out.append((proposal.intent, proposal.confidence))
        out += [(c.intent, c.confidence) for c in proposal.alternatives if c.intent != proposal.intent]
        return [(n, s) for n, s in out if n in self.catalog.intents][: self.settings.max_candidates]

    def _decide(
        self, gen: _Generation, canonical: Canonical, candidates: list[tuple[str, float]], ms: float
    ) -> Decision:
        raw = gen.output.decode("utf-8", errors="replace")
        evidence: dict[str, Any] = {
            "raw_output": ANSWER_OPEN + raw,
            "candidates": [{"intent": n, "score": round(s, 4)} for n, s in candidates],
            "prompt_tokens": gen.prompt_tokens,
            "cached_prefix_tokens": len(self._prefix),
            "generated_tokens": gen.generated_tokens,
            "forced_tokens": gen.forced_tokens,
            "ms": round(ms, 1),
            "model": self.model_name,
        }
        if not progress(self.shape, gen.output).complete:
            return Decision.abstain(VIA, "llm_unparsable", evidence)
        intent, slots = parse_answer(gen.output)
        others = [n for n, _ in candidates if n != intent] + ([NONE] if intent != NONE else [])
        temp = self.settings.temperature
        probs = name_probabilities(gen.steps, intent, others, temp)
        raw_p = name_probabilities(gen.steps, intent, (), 1.0)[intent]
        evidence["probability_raw"] = round(raw_p, 4)
        evidence["temperature"] = temp
        evidence["probability_tempered"] = probs[intent]  # unrounded: the calibration tool reads it
        if intent != NONE and self._calibration is not None:
            conf = float(calibrate(llm_features(probs[intent], intent, candidates), self._calibration))
            evidence["calibrated"] = True
            rest = {n: p for n, p in probs.items() if n != intent}
            mass = sum(rest.values())
            # like the ranker: the others share what the calibrated confidence leaves, in proportion
            probs = {intent: conf} | {
                n: (1.0 - conf) * p / mass if mass > 0 else 0.0 for n, p in rest.items()
            }
        else:
            evidence["calibrated"] = False
        for cand in evidence["candidates"]:
            cand["llm"] = round(probs.get(cand["intent"], 0.0), 4)
        evidence["llm_slots"] = slots
        if intent == NONE:
            evidence["p_none"] = round(probs[NONE], 4)
            return Decision.abstain(VIA, "llm_none", evidence)
        spec = self.catalog.intents[intent].slots
        # Canonicalization's values win: the pipeline fills slots from entities unless we name them.
        found = {e.placeholder for e in canonical.entities}
        kept = {k: v for k, v in slots.items() if (spec[k].source or k) not in found}
        alts = sorted(
            (Candidate(n, round(p, 4)) for n, p in probs.items() if n not in (intent, NONE)),
            key=lambda c: -c.confidence,
        )
        return Decision(
            intent=intent,
            confidence=round(probs[intent], 4),
            outcome=Outcome.ACCEPT,
            via=VIA,
            alternatives=tuple(alts[:4]),
            slots=kept,
            evidence=evidence,
        )

    def _frame(self, fixed: str) -> tuple[str, str]:
        """Split the model's chat template around the request: (fixed head, tail before the answer)."""
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return fixed + "\n\n", "\nAnswer: " + ANSWER_OPEN
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: PLC0415

        special = {"bos_token": self._llm.token_bos(), "eos_token": self._llm.token_eos()}
        texts = {
            k: self._llm.detokenize([v], special=True).decode("utf-8", "replace") if v >= 0 else ""
            for k, v in special.items()
        }
        fmt = Jinja2ChatFormatter(template, eos_token=texts["eos_token"], bos_token=texts["bos_token"])
        try:
            prompt = fmt(
                messages=[{"role": "system", "content": fixed}, {"role": "user", "content": _SENTINEL}]
            ).prompt
        except Exception:  # noqa: BLE001 - templates without a system role
            prompt = fmt(messages=[{"role": "user", "content": fixed + "\n\n" + _SENTINEL}]).prompt
        head, _, tail = prompt.partition(_SENTINEL)
        if texts["bos_token"] and head.startswith(texts["bos_token"]):
            head = head[len(texts["bos_token"]) :]  # tokenize() adds it when the model wants one
        return head, tail + ANSWER_OPEN

    def _eval_prefix(self) -> None:
        self._llm.reset()
        self._llm.eval(self._prefix)

    def _rewind(self) -> None:
        """Drop everything after the cached prefix (the previous request's tokens)."""
        mem = self._lc.llama_get_memory(self._llm.ctx)
        if self._llm.n_tokens >= len(self._prefix) and self._lc.llama_memory_seq_rm(
            mem, -1, len(self._prefix), -1
        ):
            self._llm.n_tokens = len(self._prefix)
        else:  # recurrent models cannot drop a tail: pay the prefix again
            _LOGGER.debug("prefix cache miss: re-evaluating %d tokens", len(self._prefix))
            self._eval_prefix()

    def _piece(self, tok: int) -> bytes:
        piece = self._pieces.get(tok)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = self._lc.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
            piece = buf.raw[: max(n, 0)]
            self._pieces[tok] = piece
        return piece

    def _apply_grammar(self, data: np.ndarray) -> None:
        arr = self._lc.llama_token_data_array(
            data=data.ctypes.data_as(self._lc.llama_token_data_p), size=len(data), selected=-1, sorted=False
        )
        self._lc.llama_sampler_apply(self._grammar, ctypes.byref(arr))

    def _allows(self, tok: int) -> bool:
        self._one["id"][0], self._one["logit"][0] = tok, 0.0
        self._apply_grammar(self._one)
        return bool(np.isfinite(self._one["logit"][0]))

    def _eval(self, tokens: Sequence[int], deadline: float) -> None:
        step = self.settings.n_batch
        for i in range(0, len(tokens), step):
            if self.clock() >= deadline:
                raise _Timeout
            self._llm.eval(tokens[i : i + step])

    def _generate(self, request: str, deadline: float) -> _Generation:
        """Greedy decoding under the grammar; forced stretches are fed in one batch, not sampled."""
        llm, lc = self._llm, self._lc
        suffix = llm.tokenize(request.encode(), add_bos=False, special=False)
        suffix += llm.tokenize(self._tail.encode(), add_bos=False, special=True)
        if len(self._prefix) + len(suffix) + self.max_answer_tokens > self.settings.n_ctx:
            raise _TooLong
        self._rewind()
        self._eval(suffix, deadline)
        lc.llama_sampler_reset(self._grammar)
        out, steps, generated, forced_count = b"", [], 0, 0
        while True:
            state = progress(self.shape, out)
            if state.complete:
                break
            if state.forced:
                toks = self._tokens_for(state.forced)
                if toks and self._allows(toks[0]):
                    for t in toks:
                        if not self._allows(t):
                            raise RuntimeError(f"grammar rejected forced text {state.forced!r}")
                        lc.llama_sampler_accept(self._grammar, t)
                    out += state.forced
                    forced_count += len(toks)
                    if not progress(self.shape, out).complete:
                        self._eval(toks, deadline)
                    continue
                # no clean tokenization: let the grammar pick token by token
            if self.clock() >= deadline:
                raise _Timeout
            if generated >= self.max_answer_tokens:
                break
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(llm.ctx, -1), shape=(self._n_vocab,))
            self._cand["logit"] = logits
            self._cand["p"] = 0.0
            self._apply_grammar(self._cand)
            masked = self._cand["logit"]
            tok = int(np.argmax(masked))
            if not np.isfinite(masked[tok]) or lc.llama_vocab_is_eog(self._vocab, tok):
                break
            if state.intent is None:  # still choosing the name: keep what the confidence needs
                ids = np.flatnonzero(np.isfinite(masked))
                steps.append(
                    NameStep(
                        out, tuple(self._piece(int(i)) for i in ids), tuple(float(masked[i]) for i in ids)
                    )
                )
            lc.llama_sampler_accept(self._grammar, tok)
            out += self._piece(tok)
            generated += 1
            if not progress(self.shape, out).complete:
                self._eval([tok], deadline)
        return _Generation(out, tuple(steps), len(suffix), generated, forced_count)

    def _tokens_for(self, text: bytes) -> list[int]:
        """Tokens whose pieces spell exactly ``text``: the tokenizer's if they do, else longest match."""
        toks = self._llm.tokenize(text, add_bos=False, special=False)
        if b"".join(self._piece(t) for t in toks) == text:
            return toks
        if self._piece_ids is None:  # e.g. SentencePiece adds a leading space: build the table once
            table: dict[bytes, int] = {}
            for tok in range(self._n_vocab):
                piece = self._piece(tok)
                if piece and not self._lc.llama_vocab_is_control(self._vocab, tok):
                    table.setdefault(piece, tok)
            self._piece_ids = table
            self._longest_piece = max(map(len, table), default=1)
        out: list[int] = []
        pos = 0
        while pos < len(text):
            for size in range(min(self._longest_piece, len(text) - pos), 0, -1):
                tok_id = self._piece_ids.get(text[pos : pos + size])
                if tok_id is not None:
                    out.append(tok_id)
                    pos += size
                    break
            else:
                return []
        return out
