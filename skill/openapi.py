"""The service's OpenAPI 3.1 document, built from the same msgspec structs the handlers decode."""

from __future__ import annotations

from typing import Any

import msgspec

from . import SERVICE_NAME, __version__
from .contracts import ParseRequest, ParseResponseResult, ReindexRequest


class ErrorBody(msgspec.Struct):
    """Every error answer."""

    ok: bool
    error: str
    message: str
    field: str | None


def _json(ref: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, **_json("ErrorBody")}


def openapi_document() -> dict[str, Any]:
    """OpenAPI for /parse, /health, /reindex (schemathesis and clients can be driven by it)."""
    _, components = msgspec.json.schema_components(
        [ParseRequest, ParseResponseResult, ReindexRequest, ErrorBody],
        ref_template="#/components/schemas/{name}",
    )
    object_body = {"type": "object", "additionalProperties": True}
    return {
        "openapi": "3.1.0",
        "info": {"title": SERVICE_NAME, "version": __version__},
        "paths": {
            "/parse": {
                "post": {
                    "summary": "Detect the intent of one utterance",
                    "description": (
                        "The result fields (ParseResponseResult) at the top level and under `result`. "
                        "With `session_id` (else `webspace_id`) as the scope, follow-ups lean on the "
                        "session's last accepted frames; the answer adds `context`, `segments` when the "
                        "utterance held several requests, and `clarify` for a close abstention."
                    ),
                    "requestBody": {"required": True, **_json("ParseRequest")},
                    "responses": {
                        "200": {
                            "description": "a decision (accept / abstain / reject)",
                            "content": {"application/json": {"schema": object_body}},
                        },
                        "400": _err("bad input"),
                        "401": _err("missing or wrong bearer token"),
                        "413": _err("body over the limit"),
                        "503": _err("the model is still loading"),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Readiness and the active model",
                    "responses": {
                        "200": {
                            "description": "serving",
                            "content": {"application/json": {"schema": object_body}},
                        },
                        "503": {
                            "description": "loading",
                            "content": {"application/json": {"schema": object_body}},
                        },
                    },
                }
            },
            "/reindex": {
                "post": {
                    "summary": "Reload the active model's artifacts and rebuild the indexes",
                    "requestBody": {"required": False, **_json("ReindexRequest")},
                    "responses": {
                        "200": {
                            "description": "reloaded (or refused, see ok)",
                            "content": {"application/json": {"schema": object_body}},
                        },
                        "400": _err("bad input"),
                        "401": _err("missing or wrong bearer token"),
                        "403": _err("not from loopback and no token configured"),
                    },
                }
            },
        },
        "components": {"schemas": components},
    }
