"""Local LLM fallback: llama.cpp scores the ranker's candidates against a cached few-shot prefix.

The model never generates. A prefix of catalog examples (``<utterance> => <intent>`` lines, see
:mod:`skill.llm_prompt`) is evaluated once at load and kept in the KV cache, copied to one sequence
per candidate slot. A request is ONE batch: the utterance's tokens (in every sequence) and a token
trie of the candidates' continuations (each in its own sequence), with logits only where a
continuation token is read. The log-likelihoods, normalised over the candidates and "none", go
through the fitted confidence map, and the decision through the same gate as the ranker's. One
scoring step at a time, inside the budget; a late answer is dropped, never emitted.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import platformdirs

from . import SERVICE_NAME
from .canonicalize import Canonical
from .catalog import Catalog
from .config import Config
from .decision import Candidate, Decision, Outcome
from .llm_prompt import (
    END,
    NONE,
    BatchPlan,
    LlmSettings,
    calibrated_shares,
    combined,
    continuation,
    fewshot_prefix,
    labels,
    normalise,
    plan_batch,
    request_line,
)

_LOGGER = logging.getLogger(__name__)
VIA = "llm"
ANCHOR = "=>"  # continuations are tokenized after this, as they follow it in the prompt


class LlmOff(RuntimeError):
    """The calibration found that the model does not reach its precision target: the stage stays off."""


class _Timeout(Exception):
    """The request's budget ran out."""


class _TooLong(Exception):
    """The request does not fit the context, the batch or the request limit."""


class Scores(msgspec.Struct, frozen=True):
    """One scoring step: the candidates' log-likelihoods and what the batch cost."""

    names: tuple[str, ...]
    logliks: tuple[float, ...]
    request_tokens: int
    batch_tokens: int
    logit_rows: int


class Engine:
    """One llama.cpp model and context: the cached prefix in every sequence, one batch per request."""

    def __init__(self, path: Path) -> None:
        import llama_cpp  # noqa: PLC0415 - optional dependency
        from llama_cpp._internals import LlamaModel  # noqa: PLC0415 - the pinned 0.3.36 wrapper

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter
        self._lc = lc = llama_cpp
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        self.model = LlamaModel(path_model=str(path), params=params, verbose=False)
        self.vocab = self.model.vocab
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.ctx: Any = None
        self.batch: Any = None
        self.mem: Any = None
        self.n_ctx = self.n_seq = self.n_batch = self.max_outputs = 0
        self.prefix: list[int] = []

    def start(self, settings: LlmSettings, threads: int, n_seq: int, max_outputs: int) -> None:
        """Create the context: ``n_seq`` sequences, logits for at most ``max_outputs`` rows a batch."""
        lc = self._lc
        self.n_seq = n_seq
        self.n_batch = settings.n_batch
        self.max_outputs = min(max_outputs, settings.n_batch)
        params = lc.llama_context_default_params()
        params.n_ctx = settings.n_ctx
        params.n_batch = params.n_ubatch = settings.n_batch
        params.n_seq_max = n_seq
        params.n_outputs_max = self.max_outputs  # the logits buffer: rows x n_vocab floats
        params.kv_unified = True  # the sequences share the prefix's cells instead of copies
        params.swa_full = True  # sliding-window layers keep the prefix when a request is dropped
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model.model, params)
        if not self.ctx:
            raise ValueError(
                f"llama.cpp could not create a context (n_ctx={settings.n_ctx}, {n_seq} sequences)"
            )
        self.n_ctx = int(lc.llama_n_ctx(self.ctx))
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(settings.n_batch, 0, n_seq)

    def __del__(self) -> None:
        # The service drops a replaced stage without closing it (a request may still hold it).
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: llama_cpp may be half gone
            pass

    def close(self) -> None:
        """Free the batch, the context and the model (idempotent)."""
        if self.batch is not None:
            self._lc.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            self._lc.llama_free(self.ctx)
            self.ctx = None
        self.model.close()

    def tokenize(self, text: str, bos: bool = False) -> list[int]:
        return list(self.model.tokenize(text.encode(), bos and self.model.add_bos_token(), False))

    def tokens_after(self, anchor: str, text: str) -> list[int]:
        """``text``'s tokens as they come after ``anchor`` (a SentencePiece space prefix stays with it)."""
        head = self.tokenize(anchor)
        both = self.tokenize(anchor + text)
        return both[len(head) :] if both[: len(head)] == head else self.tokenize(text)

    def _decode(
        self, tokens: Sequence[int], pos: Sequence[int], seqs: Sequence[Sequence[int]], logits: Sequence[bool]
    ) -> None:
        b = self.batch
        b.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos[i]
            b.n_seq_id[i] = len(seqs[i])
            for j, s in enumerate(seqs[i]):
                b.seq_id[i][j] = s
            b.logits[i] = bool(logits[i])
        code = self._lc.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def eval_prefix(self, prefix: Sequence[int], check: Callable[[], None] | None = None) -> None:
        """Evaluate the prefix from an empty cache into sequence 0 and share it with every sequence."""
        self._lc.llama_memory_clear(self.mem, True)
        for i in range(0, len(prefix), self.n_batch):
            if check is not None:
                check()
            chunk = prefix[i : i + self.n_batch]
            self._decode(chunk, range(i, i + len(chunk)), [(0,)] * len(chunk), [False] * len(chunk))
        for s in range(1, self.n_seq):
            self._lc.llama_memory_seq_cp(self.mem, 0, s, -1, -1)
        self.prefix = list(prefix)

    def save_prefix(self, path: Path) -> None:
        """Write sequence 0's state (the prefix) to ``path`` atomically."""
        lc = self._lc
        tokens = (lc.llama_token * len(self.prefix))(*self.prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            if not lc.llama_state_seq_save_file(self.ctx, str(tmp).encode(), 0, tokens, len(self.prefix)):
                raise OSError(f"llama.cpp could not write {tmp}")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_prefix(self, path: Path, prefix: Sequence[int]) -> bool:
        """Restore a saved prefix into every sequence; False (and an empty cache) if it is not that prefix."""
        lc = self._lc
        lc.llama_memory_clear(self.mem, True)
        tokens = (lc.llama_token * len(prefix))()
        count = ctypes.c_size_t(0)
        read = lc.llama_state_seq_load_file(
            self.ctx, str(path).encode(), 0, tokens, len(prefix), ctypes.byref(count)
        )
        if not read or count.value != len(prefix) or list(tokens) != list(prefix):
            lc.llama_memory_clear(self.mem, True)
            return False
        for s in range(1, self.n_seq):
            lc.llama_memory_seq_cp(self.mem, 0, s, -1, -1)
        self.prefix = list(prefix)
        return True

    def rewind(self, check: Callable[[], None] | None = None) -> None:
        """Drop every sequence's tokens after the prefix (the previous request's)."""
        n = len(self.prefix)
        if all(self._lc.llama_memory_seq_rm(self.mem, s, n, -1) for s in range(self.n_seq)):
            return
        _LOGGER.debug("prefix cache miss: re-evaluating %d tokens", n)  # e.g. recurrent models
        self.eval_prefix(self.prefix, check)

    def score(self, plan: BatchPlan) -> list[float]:
        """Evaluate the plan in one batch; the log-likelihood of each candidate's continuation."""
        self._decode(plan.tokens, plan.pos, plan.seq_ids, plan.logits)
        rows: dict[int, tuple[np.ndarray, float]] = {}
        out = []
        for reads in plan.reads:
            total = 0.0
            for row, tok in reads:
                if row not in rows:
                    rows[row] = self.log_norm(row)
                logits, norm = rows[row]
                total += float(logits[tok]) - norm
            out.append(total)
        return out

    def log_norm(self, row: int) -> tuple[np.ndarray, float]:
        """Batch row ``row``'s logits and their log-sum-exp (the softmax over the whole vocabulary)."""
        ptr = self._lc.llama_get_logits_ith(self.ctx, row)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        top = float(logits.max())
        return logits, top + float(np.log(np.exp(logits - top, dtype=np.float64).sum()))


class LlmStage:
    """The fallback stage: a cached few-shot prefix and one scoring batch per abstention."""

    def __init__(  # noqa: PLR0917
        self, engine: Engine, catalog: Catalog, config: Config, settings: LlmSettings, name: str
    ) -> None:
        self.engine = engine
        self.catalog = catalog
        self.settings = settings
        self.model_name = name
        self.budget_s = config.llm_budget_ms / 1000.0
        self.queue = config.llm_queue
        self.clock: Callable[[], float] = time.monotonic
        cal = settings.calibration
        self._calibration = cal.linear() if cal is not None else None
        self._slot = threading.Lock()  # the single scoring slot
        self._count_lock = threading.Lock()
        self._pending = 0
        self.labels = labels(list(catalog.intents))
        self._conts = {n: engine.tokens_after(ANCHOR, continuation(w)) for n, w in self.labels.items()}
        # the label without the line end: enough unless one candidate's label starts another's
        bare = {n: engine.tokens_after(ANCHOR, continuation(w)[: -len(END)]) for n, w in self.labels.items()}
        self._bare = {
            n: b if b and self._conts[n][: len(b)] == b else self._conts[n] for n, b in bare.items()
        }
        text, self.prefix_examples = fewshot_prefix(catalog, settings, lambda s: len(engine.tokenize(s)))
        prefix = engine.tokenize(text, bos=True)
        n_seq = settings.max_candidates + 1  # the candidates and "none"
        longest = sorted((len(c) - 1 for n, c in self._conts.items() if n != NONE), reverse=True)
        rows = 1 + sum(longest[: settings.max_candidates]) + len(self._conts[NONE]) - 1
        if engine.ctx is None:
            engine.start(settings, config.llm_threads, n_seq, rows)
        worst = settings.max_request_tokens + max(map(len, self._conts.values()))
        if len(prefix) + worst > engine.n_ctx:
            raise ValueError(
                f"n_ctx={engine.n_ctx} leaves {engine.n_ctx - len(prefix)} tokens after the "
                f"{len(prefix)}-token few-shot prefix, {worst} needed: raise n_ctx (or lower "
                "max_prefix_tokens) in the .nlu.json sidecar"
            )
        started = time.perf_counter()
        self.prefix_from = self._restore_or_eval(prefix, Path(config.llm_model or name), settings)
        self.prefix_ms = (time.perf_counter() - started) * 1000.0

    def _restore_or_eval(self, prefix: list[int], model: Path, settings: LlmSettings) -> str:
        """Load the evaluated prefix from the disk cache, or evaluate it and store it there."""
        use = settings.prefix_cache and model.is_file()
        path = prefix_cache_path(model, prefix, self.engine, settings) if use else None
        if path is not None and path.is_file():
            if self.engine.load_prefix(path, prefix):
                return "disk cache"
            _LOGGER.info("LLM prefix cache %s does not match: evaluating the prefix", path)
        self.engine.eval_prefix(prefix)
        if path is not None:
            try:
                self.engine.save_prefix(path)
                for old in sorted(path.parent.glob(f"{model.name}-*.kv"), key=_mtime)[:-2]:
                    old.unlink(missing_ok=True)  # keep this one and the one before (a catalog rollback)
            except OSError as exc:
                _LOGGER.warning("LLM prefix cache not written (%s): %s", path, exc)
        return "evaluated"

    @classmethod
    def load(cls, config: Config, catalog: Catalog, settings: LlmSettings | None = None) -> LlmStage:
        """Load the configured GGUF file; any failure raises (the service then disables the stage).

        ``settings`` replaces the sidecar's (the calibration tool loads the model uncalibrated).
        A sidecar whose calibration found the model below its precision target raises
        :class:`LlmOff` before the model is read.
        """
        if not config.llm_model:
            raise ValueError("no LLM model configured")
        path = Path(config.llm_model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LLM model file not found: {path}")
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError(f"not a GGUF file: {path}")
        settings = settings or LlmSettings.for_model(path)
        settings.check(path.name)
        if not settings.accept:
            raise LlmOff(verdict(settings))
        try:
            import llama_cpp  # noqa: F401, PLC0415 - optional dependency
        except ImportError as exc:
            raise ImportError(f"llama-cpp-python is not installed (pip install -e '.[llm]'): {exc}") from exc
        started = time.perf_counter()
        engine = Engine(path)
        try:
            stage = cls(engine, catalog, config, settings, path.name)
        except BaseException:
            engine.close()
            raise
        _LOGGER.info(
            "LLM fallback ready: %s (%d intents, %d-token few-shot prefix %s in %.0f ms, load %.0f ms)",
            path.name,
            len(catalog.intents),
            len(engine.prefix),
            "from the disk cache" if stage.prefix_from == "disk cache" else "evaluated",
            stage.prefix_ms,
            (time.perf_counter() - started) * 1000.0,
        )
        return stage

    @property
    def summary(self) -> str:
        """One line for /health: what the stage is worth on held-out rows, and its calibration."""
        if self.settings.calibration is None:
            return (
                f"{self.model_name} (confidence uncalibrated, temperature {self.settings.temperature:g}: "
                "fit it with python -m tools.llm_calibrate)"
            )
        report = self.settings.calibration_report or {}
        ece = report.get("ece_crossfit", report.get("ece_fit"))
        tail = f", cross-fitted ECE {ece:.3f}" if isinstance(ece, float) else ""
        return f"{self.model_name}: {verdict(self.settings)} (confidence calibrated{tail})"

    def close(self) -> None:
        """Free the model and its context."""
        with self._slot:
            self.engine.close()

    # --- the FallbackStage protocol ---------------------------------------------------------------

    def decide_fallback(self, canonical: Canonical, proposal: Decision) -> Decision:
        """Score the ranker's candidates; never waits or answers past the budget."""
        started = self.clock()
        deadline = started + self.budget_s
        with self._count_lock:
            if self._pending > self.queue:  # one scoring plus ``queue`` waiting
                return Decision.abstain(VIA, "llm_queue_full", {"queue": self.queue})
            self._pending += 1
        try:
            if not self._slot.acquire(timeout=max(0.0, deadline - self.clock())):
                return self._timeout(started, "waiting")
            try:
                candidates = self._candidates(proposal)
                scores = self._score(canonical.text, [n for n, _ in candidates], deadline)
            finally:
                self._slot.release()
        except _Timeout:
            return self._timeout(started, "scoring")
        except _TooLong:
            return Decision.abstain(
                VIA, "llm_prompt_too_long", {"max_request_tokens": self.settings.max_request_tokens}
            )
        except Exception as exc:  # noqa: BLE001 - a failed evaluation is an error decision, not a crash
            _LOGGER.exception("LLM scoring failed")
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
        return self._decide(scores, candidates, (self.clock() - started) * 1000.0)

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

    def request_tokens(self, text: str) -> list[int]:
        """The request's tokens as they follow the prefix (whose last line ends with ``END``)."""
        return self.engine.tokens_after(END, request_line(text))

    def _score(self, text: str, names: Sequence[str], deadline: float) -> Scores:
        """One scoring step: rewind to the prefix, evaluate the request and the candidates' trie."""
        names = (*names, NONE)
        request = self.request_tokens(text)
        if len(request) > self.settings.max_request_tokens:
            raise _TooLong
        plan = plan_batch(request, self.continuations(names), len(self.engine.prefix))
        if len(plan.tokens) > self.engine.n_batch or plan.logit_rows > self.engine.max_outputs:
            raise _TooLong

        def check() -> None:
            if self.clock() >= deadline:
                raise _Timeout

        self.engine.rewind(check)
        check()
        logliks = self.engine.score(plan)
        return Scores(names, tuple(logliks), len(request), len(plan.tokens), plan.logit_rows)

    def continuations(self, names: Sequence[str]) -> list[list[int]]:
        """The tokens each candidate is scored on.

        Without the line end when no candidate's label is a token prefix of another's: the end of a
        whole label is all but certain in this format, and reading it costs a logits row (the whole
        vocabulary) per candidate, about half of a request's rows.
        """
        bare = [self._bare[n] for n in names]
        for i, a in enumerate(bare):
            if any(i != j and b[: len(a)] == a for j, b in enumerate(bare)):
                return [self._conts[n] for n in names]
        return bare

    def score(self, text: str, names: Sequence[str]) -> Scores:
        """The log-likelihoods of ``names`` (and "none") for ``text``, without budget (tools, tests)."""
        with self._slot:
            return self._score(text, names, float("inf"))

    def _decide(self, scores: Scores, candidates: list[tuple[str, float]], ms: float) -> Decision:
        temp = self.settings.temperature
        shares = normalise(scores.logliks, temp)
        probs = {n: float(p) for n, p in zip(scores.names, shares, strict=True)}
        raw = dict(zip(scores.names, normalise(scores.logliks, 1.0), strict=True))
        ranker = dict(candidates)
        own = max(probs, key=probs.__getitem__)  # the model's own choice, "none" included
        intent = own
        q: dict[str, float] = {}
        if self._calibration is not None and candidates:
            q = combined(probs, candidates, self._calibration)
            intent = max(q, key=q.__getitem__)
        evidence: dict[str, Any] = {
            "candidates": [
                {"intent": n, "score": round(ranker.get(n, 0.0), 4), "loglik": round(ll, 3)}
                for n, ll in zip(scores.names, scores.logliks, strict=True)
            ],
            "chosen": intent,
            "llm_choice": own,
            "probability_raw": round(float(raw[own]), 4),
            "probability_tempered": probs[own],
            "llm_shares": dict(probs),
            "temperature": temp,
            "prompt_tokens": scores.request_tokens,
            "batch_tokens": scores.batch_tokens,
            "logit_rows": scores.logit_rows,
            "cached_prefix_tokens": len(self.engine.prefix),
            "ms": round(ms, 1),
            "model": self.model_name,
        }
        shown = dict(probs)
        evidence["calibrated"] = bool(q)
        if q:  # the others share what the chosen one's confidence leaves, like the ranker's alternatives
            shown = calibrated_shares(q, intent, q[intent])
            evidence["map"] = {n: round(v, 4) for n, v in q.items()}
        for cand in evidence["candidates"]:
            cand["llm"] = round(shown.get(cand["intent"], 0.0), 4)
        evidence["p_none"] = round(probs[NONE], 4)
        if intent == NONE:
            return Decision.abstain(VIA, "llm_none", evidence)
        alts = sorted(
            (Candidate(n, round(p, 4)) for n, p in shown.items() if n not in (intent, NONE)),
            key=lambda c: -c.confidence,
        )
        return Decision(
            intent=intent,
            confidence=round(shown[intent], 4),
            outcome=Outcome.ACCEPT,
            via=VIA,
            alternatives=tuple(alts[:4]),
            slots={},  # slots come from canonicalization and the tagger (the pipeline fills them)
            evidence=evidence,
        )


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def prefix_cache_path(model: Path, prefix: Sequence[int], engine: Engine, settings: LlmSettings) -> Path:
    """Where the evaluated prefix of this model file, context layout and prefix is kept between loads."""
    import llama_cpp  # noqa: PLC0415 - optional dependency, present once an Engine exists

    stat = model.stat()
    key = hashlib.sha256()
    key.update(f"{llama_cpp.__version__}|{model.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
    key.update(f"{engine.n_ctx}|{engine.n_seq}|{settings.n_batch}|".encode())
    key.update(np.asarray(prefix, dtype=np.int32).tobytes())
    root = Path(platformdirs.user_cache_dir(SERVICE_NAME)) / "llm-prefix"
    return root / f"{model.name}-{key.hexdigest()[:20]}.kv"


def verdict(settings: LlmSettings) -> str:
    """``LLM stage: rescues X %, accepted precision Y % on N held-out rows`` from the calibration report."""
    report = settings.calibration_report or {}
    held = report.get("held_out") or {}
    rows = held.get("rows_handed")
    if not isinstance(rows, int):
        return "LLM stage: not measured on held-out rows (refit with python -m tools.llm_calibrate)"
    rescue = held.get("rescue_rate") or 0.0
    precision = held.get("accepted_precision")
    shown = f"{100 * precision:.0f} %" if isinstance(precision, float) else "n/a (nothing accepted)"
    line = f"LLM stage: rescues {100 * rescue:.0f} %, accepted precision {shown} on {rows} held-out rows"
    if not settings.accept:
        line += (
            f"; below the {100 * settings.precision_target:.0f} % precision target, so the stage is off "
            "(refit after changing the model, the catalog or the ranker)"
        )
    return line
