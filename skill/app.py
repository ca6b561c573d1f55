"""aiohttp application factory: /parse, /health, /reindex, /metrics, status page, error middleware."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
from aiohttp import web

from .audit import DecisionLog
from .contracts import BadRequest, ParseRequest, ReindexRequest, pick_locale
from .conversation import Conversation, SessionStore, audit_info, scope_of, to_wire
from .conversation import Request as ConversationRequest
from .openapi import openapi_document
from .security import authorize
from .service import ServiceState
from .telemetry import Telemetry
from .ui import StatusPage
from .watch import watch_pointer

_LOGGER = logging.getLogger(__name__)

STATE: web.AppKey[ServiceState] = web.AppKey("state", ServiceState)
EXECUTOR: web.AppKey[ThreadPoolExecutor] = web.AppKey("executor", ThreadPoolExecutor)
STOP: web.AppKey[asyncio.Event] = web.AppKey("stop", asyncio.Event)
TASKS: web.AppKey[list[asyncio.Task[None]]] = web.AppKey("tasks", list)
TELEMETRY: web.AppKey[Telemetry] = web.AppKey("telemetry", Telemetry)
DECISIONS: web.AppKey[DecisionLog] = web.AppKey("decisions", DecisionLog)
CONVERSATION: web.AppKey[Conversation] = web.AppKey("conversation", Conversation)
_encoder = msgspec.json.Encoder()


class NotReady(RuntimeError):
    """The pipeline is still loading."""


def json_response(body: Any, status: int = 200) -> web.Response:
    """Serialize with msgspec (fast, and handles structs)."""
    return web.Response(body=_encoder.encode(body), status=status, content_type="application/json")


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The one error shape: ``{"ok": false, "error", "message", "field"}``."""
    return {"ok": False, "error": code, "message": message, "field": field}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map error classes to statuses; bad input is never a 500 and never a silent "no match"."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return json_response(error_body(exc.code, str(exc), exc.field), exc.status)
    except NotReady as exc:
        return json_response(error_body("not_ready", str(exc)), 503)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_response(error_body("body_too_large", exc.text or "request body too large"), 413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response(
            error_body(exc.reason.lower().replace(" ", "_"), exc.text or exc.reason), exc.status
        )
    except Exception:  # noqa: BLE001 - last resort: a bug is a 500 with a logged trace
        _LOGGER.exception("unhandled error on %s %s", request.method, request.path)
        return json_response(error_body("internal_error", "internal error; see the service log"), 500)


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Bearer token when configured; model changes only from loopback otherwise."""
    denied = authorize(
        request.path,
        request.remote,
        request.headers.get("Authorization"),
        request.app[STATE].config.api_token,
    )
    if denied == "unauthorized":
        return json_response(
            error_body(denied, "a valid 'Authorization: Bearer <token>' header is required"), 401
        )
    if denied is not None:
        return json_response(error_body(denied, "only loopback callers may do this without a token"), 403)
    return await handler(request)


async def handle_openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``."""
    return json_response(openapi_document())


async def _read_json(request: web.Request, typ: type[Any], *, allow_empty: bool = False) -> Any:
    state = request.app[STATE]
    if request.content_length is not None and request.content_length > state.config.max_body_bytes:
        raise BadRequest("body_too_large", f"body over {state.config.max_body_bytes} bytes", status=413)
    body = await request.read()
    if not body.strip() and allow_empty:
        return typ()
    try:
        return msgspec.json.decode(body, type=typ)
    except msgspec.ValidationError as exc:
        text = str(exc)
        field = text.rsplit("at `$.", 1)[-1].rstrip("`") if "at `$." in text else None
        code = "invalid_field" if field else "invalid_body"
        raise BadRequest(code, text, field) from exc
    except msgspec.DecodeError as exc:
        raise BadRequest("invalid_json", f"malformed JSON: {exc}") from exc
    except UnicodeDecodeError as exc:  # invalid UTF-8 inside a string is not a DecodeError in msgspec
        raise BadRequest("invalid_json", f"malformed JSON: invalid UTF-8: {exc}") from exc
    except RecursionError as exc:  # msgspec gives up on very deep nesting: bad input, not a 500
        raise BadRequest("invalid_json", "malformed JSON: nested too deeply") from exc


async def handle_parse(request: web.Request) -> web.Response:
    """``POST /parse``: the contract's result at the top level and under ``result``."""
    started = time.perf_counter()
    state = request.app[STATE]
    req: ParseRequest = await _read_json(request, ParseRequest)
    text = req.text
    if text is None or not text.strip():
        raise BadRequest("text_required", "field 'text' is required and must not be empty", "text")
    if len(text) > state.config.max_text_chars:
        raise BadRequest(
            "text_too_long",
            f"text is {len(text)} characters; the limit is {state.config.max_text_chars}",
            "text",
        )
    locale = pick_locale(req)
    pipeline = state.pipeline  # one reference for the whole request: a reload cannot split it
    if pipeline is None:
        raise NotReady("the model is still loading")
    loop = asyncio.get_running_loop()
    hub = req.entities
    if req.canonicalized_text:  # the hub's canonicalized text goes with its entities (skill/canonicalize.py)
        hub = {**(req.entities or {}), "canonicalized_text": req.canonicalized_text}
    request_id = req.request_id or uuid.uuid4().hex
    # The conversation layer wraps the pipeline: segments, session follow-ups, clarification.
    turn = ConversationRequest(text, request_id, locale, hub, scope_of(req.session_id, req.webspace_id))
    answer = await loop.run_in_executor(
        request.app[EXECUTOR], request.app[CONVERSATION].answer, pipeline, turn
    )
    wire = to_wire(answer, pipeline.gate_config.accept, request_id)
    elapsed = time.perf_counter() - started
    result = answer.turns[0].result
    request.app[TELEMETRY].observe(pipeline, result, elapsed)
    for i, part in enumerate(answer.turns):  # one audit record per request; queued, written off the loop
        seg = wire["segments"][i] if answer.split else wire
        info = audit_info(answer, i, req.session_id)
        request.app[DECISIONS].add(part.result, seg, request_id, elapsed, info)
    _LOGGER.debug(
        "parse %s model=%s via=%s intent=%s conf=%.3f decision=%s",
        request_id,
        result.model_id,
        wire["via"],
        wire["top_intent"],
        wire["confidence"],
        wire["decision"],
    )
    return json_response({"ok": True, **wire, "result": wire})


async def handle_health(request: web.Request) -> web.Response:
    """``GET /health``: 200 once serving, 503 while loading."""
    state = request.app[STATE]
    body = state.health()
    body["conversation"] = request.app[CONVERSATION].store.stats()
    return json_response(body, 200 if body["ok"] else 503)


async def handle_reindex(request: web.Request) -> web.Response:
    """``POST /reindex``: reload the active model's artifacts and rebuild the indexes."""
    state = request.app[STATE]
    req: ReindexRequest = await _read_json(request, ReindexRequest, allow_empty=True)
    before = _index_summary(state)
    loop = asyncio.get_running_loop()
    event = await loop.run_in_executor(request.app[EXECUTOR], state.load, "reindex")
    after = _index_summary(state)
    return json_response(
        {
            "ok": event.ok,
            "purged_indexes": req.purge_indexes,
            "before": before,
            "after": after,
            "error": event.error,
            "health": state.health(),
        },
        200 if state.ready else 503,
    )


def _index_summary(state: ServiceState) -> dict[str, Any]:
    health = state.health()
    return {k: health[k] for k in ("model_id", "model_loaded", "examples_total", "negatives_total")}


async def _start_loading(app: web.Application) -> None:
    state = app[STATE]

    async def _load() -> None:
        loop = asyncio.get_running_loop()
        try:
            event = await loop.run_in_executor(app[EXECUTOR], state.load, "start")
        except Exception as exc:  # noqa: BLE001 - a broken catalog keeps /health at 503 with the reason
            state.load_error = f"{type(exc).__name__}: {exc}"
            _LOGGER.error("cannot load the pipeline: %s", state.load_error)
            return
        _LOGGER.info(
            "ready: model_id=%s model_loaded=%s%s",
            state.pipeline.model_id if state.pipeline else None,
            event.ok,
            f" ({event.error})" if event.error else "",
        )

    if not state.ready:
        app[TASKS].append(asyncio.create_task(_load()))
    if state.config.watch_pointer:
        app[TASKS].append(asyncio.create_task(watch_pointer(state, app[EXECUTOR], app[STOP])))


async def _start_sweeper(app: web.Application) -> None:
    """Drop session text past its TTL even when no request comes to trigger it."""
    store = app[CONVERSATION].store
    if store.ttl_s <= 0:
        return

    async def _sweep() -> None:
        interval = min(5.0, max(0.2, store.ttl_s / 4))
        while not app[STOP].is_set():
            try:
                await asyncio.wait_for(app[STOP].wait(), interval)
            except TimeoutError:
                store.sweep()

    app[TASKS].append(asyncio.create_task(_sweep()))


async def _shutdown(app: web.Application) -> None:
    app[STOP].set()
    for task in app[TASKS]:
        task.cancel()
    await asyncio.gather(*app[TASKS], return_exceptions=True)
    app[EXECUTOR].shutdown(wait=True, cancel_futures=False)


def create_app(state: ServiceState) -> web.Application:
    """The app owns the state and the executor; nothing lives in module globals."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=state.config.max_body_bytes
    )
    app[STATE] = state
    app[EXECUTOR] = ThreadPoolExecutor(max_workers=state.config.workers, thread_name_prefix="nlu")
    app[STOP] = asyncio.Event()
    app[TASKS] = []
    app[DECISIONS] = DecisionLog(state.config)
    app[TELEMETRY] = Telemetry(state, app[DECISIONS])
    cfg = state.config
    app[CONVERSATION] = Conversation(
        SessionStore(cfg.session_ttl_s, max_sessions=cfg.session_max, frames=cfg.session_frames),
        max_cuts=cfg.segment_max_cuts,
    )
    app.router.add_post("/parse", handle_parse)
    app.router.add_get("/health", handle_health)
    app.router.add_post("/reindex", handle_reindex)
    app.router.add_get("/openapi.json", handle_openapi)
    app.router.add_get("/metrics", app[TELEMETRY].handle_metrics)
    StatusPage(state, app[TELEMETRY], app[DECISIONS]).register(app.router)
    app.cleanup_ctx.append(app[DECISIONS].lifespan)
    app.on_startup.append(_start_loading)
    app.on_startup.append(_start_sweeper)
    app.on_cleanup.append(_shutdown)
    return app
