"""Model artifact folders: manifest with sha256 of every file, verified before anything is loaded."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import msgspec

MANIFEST_NAME = "manifest.json"
# Only inert formats may live in a model folder: no pickles, no code.
ALLOWED_SUFFIXES = frozenset({".onnx", ".json", ".jsonl", ".index", ".gguf", ".txt", ".npy", ".png", ".md"})


class ModelError(RuntimeError):
    """A model folder is missing, damaged, or holds something it must not."""


class FileEntry(msgspec.Struct, frozen=True):
    """One artifact file and its digest."""

    path: str
    sha256: str
    bytes: int


class ModelManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """``manifest.json`` of a model version."""

    model_id: str
    files: list[FileEntry]
    created: str = ""
    data_digest: str = ""
    seed: int = 0
    code_version: str = ""
    parent: str | None = None
    metrics: dict[str, Any] = msgspec.field(default_factory=dict)
    thresholds: dict[str, float] = msgspec.field(default_factory=dict)
    kind: str = "neural-ranker"
    schema_version: int = 1


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(model_dir: Path, **fields: Any) -> ModelManifest:
    """Hash every file of ``model_dir`` (except the manifest) and write ``manifest.json``."""
    entries = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        if rel == MANIFEST_NAME:
            continue
        if path.suffix not in ALLOWED_SUFFIXES:
            raise ModelError(f"{rel}: format {path.suffix!r} is not allowed in a model folder")
        entries.append(FileEntry(rel, sha256_file(path), path.stat().st_size))
    manifest = ModelManifest(files=entries, **fields)
    tmp = model_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_bytes(json.dumps(msgspec.to_builtins(manifest), indent=2, ensure_ascii=False).encode())
    os.replace(tmp, model_dir / MANIFEST_NAME)
    return manifest


def read_manifest(model_dir: Path) -> ModelManifest:
    """Parse ``manifest.json`` without checking hashes."""
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ModelError(f"{model_dir}: no {MANIFEST_NAME}")
    try:
        return msgspec.json.decode(path.read_bytes(), type=ModelManifest)
    except msgspec.DecodeError as exc:
        raise ModelError(f"{path}: {exc}") from exc


def verify_model_dir(model_dir: Path) -> ModelManifest:
    """Check that every listed file exists with its sha256 and that no unlisted file is present."""
    manifest = read_manifest(model_dir)
    listed = set()
    for entry in manifest.files:
        path = model_dir / entry.path
        listed.add(entry.path)
        if Path(entry.path).is_absolute() or ".." in Path(entry.path).parts:
            raise ModelError(f"{model_dir}: manifest path {entry.path!r} escapes the folder")
        if path.suffix not in ALLOWED_SUFFIXES:
            raise ModelError(f"{model_dir}: {entry.path}: format not allowed")
        if not path.is_file():
            raise ModelError(f"{model_dir}: {entry.path} is missing")
        if sha256_file(path) != entry.sha256:
            raise ModelError(f"{model_dir}: {entry.path} is damaged (sha256 mismatch)")
    for path in model_dir.rglob("*"):
        rel = path.relative_to(model_dir).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and rel not in listed:
            raise ModelError(f"{model_dir}: {rel} is not listed in the manifest")
    return manifest
