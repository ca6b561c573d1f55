"""What the teacher gets for a miss: the record, its idempotency key, and optional redaction."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import yaml

from .client import ServiceReply
from .gates import Verdict
from .intake import IntentRequest

SCHEMA_VERSION = 1
_DIGITS = re.compile(r"\d")


def idempotency_key(request_id: str, text: str) -> str:
    """Stable across restarts and replays of the same request; differs if an id is reused for new text."""
    digest = hashlib.sha256(f"{request_id}\n{text}".encode()).hexdigest()
    return f"nlu-miss-{digest[:32]}"


def placeholder_for(kind: str) -> str:
    """Entity kind → its placeholder (``device.light`` → ``device``)."""
    return kind.split(".", 1)[0] if kind else "entity"


def registry_names(catalog_dir: Path | str) -> list[tuple[str, str]]:
    """(alias, placeholder) for every alias in ``catalog/entities/*.yaml``."""
    out: list[tuple[str, str]] = []
    for path in sorted((Path(catalog_dir) / "entities").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for kind, items in (raw.get("kinds") or {}).items():
            for item in items or []:
                for aliases in (item.get("aliases") or {}).values():
                    out.extend((str(a), placeholder_for(kind)) for a in aliases or [] if str(a).strip())
    return out


class Redactor:
    """Replaces digits by ``#`` and registry names by their placeholder, before anything is stored."""

    def __init__(
        self, *, digits: bool = False, names: bool = False, registry: Iterable[tuple[str, str]] = ()
    ):
        self.digits = digits
        self.names = names
        self.registry = sorted({(a.lower(), p) for a, p in registry}, key=lambda ap: -len(ap[0]))

    @property
    def active(self) -> bool:
        """Whether anything is redacted."""
        return self.digits or self.names

    def redact(self, text: str, spans: Iterable[tuple[str, str]] = ()) -> str:
        """``spans``: (surface text, placeholder) the service or the hub found in this request."""
        out = text
        if self.names:
            found = sorted({(s, p) for s, p in spans if s.strip()}, key=lambda sp: -len(sp[0]))
            for surface, placeholder in [*found, *self.registry]:
                out = re.sub(
                    rf"(?<!\w){re.escape(surface)}(?!\w)", f"{{{placeholder}}}", out, flags=re.IGNORECASE
                )
        if self.digits:
            out = _DIGITS.sub("#", out)
        return out


def entity_spans(reply: ServiceReply | None, req: IntentRequest) -> list[tuple[str, str]]:
    """Registry spans from the service's ``evidence.entities`` and the hub's ``resolved_entities``."""
    spans: list[tuple[str, str]] = []
    if reply is not None:
        for ent in reply.evidence.get("entities") or []:
            if isinstance(ent, dict) and ent.get("ref") and isinstance(ent.get("text"), str):
                spans.append(
                    (ent["text"], str(ent.get("placeholder") or placeholder_for(str(ent.get("kind", "")))))
                )
    for ent in (req.entities or {}).get("resolved_entities") or []:
        if isinstance(ent, dict) and isinstance(ent.get("text"), str):
            spans.append((ent["text"], placeholder_for(str(ent.get("kind", "")))))
    return spans


def miss_record(
    req: IntentRequest, reply: ServiceReply, verdict: Verdict, redactor: Redactor, *, now: float | None = None
) -> dict[str, Any]:
    """The JSON the teacher receives for one teachable miss."""
    spans = entity_spans(reply, req)
    canon = reply.evidence.get("canonicalized_text")
    return {
        "schema_version": SCHEMA_VERSION,
        "idempotency_key": idempotency_key(req.request_id, req.text),
        "request_id": req.request_id,
        "text": redactor.redact(req.text, spans),
        "redacted": redactor.active,
        "reason": verdict.reason,
        "status": verdict.status.value,
        "intent": verdict.intent,
        "confidence": verdict.confidence,
        "alternatives": [msgspec.to_builtins(a) for a in reply.alternatives],
        "decision": reply.decision,
        "service_reason": reply.reason,
        "via": reply.via,
        "model_id": reply.model_id,
        "locale": reply.locale or req.locale,
        "webspace_id": req.webspace_id,
        "canonicalized_text": redactor.redact(canon, spans) if isinstance(canon, str) else None,
        "ts": time.time() if now is None else now,
        "source": "adaos_bridge",
    }
