"""Model artifact folders: manifest with sha256 of every file, verified before anything is loaded."""

from __future__ import annotations

import hashlib
import json
import os
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import msgspec

MANIFEST_NAME = "manifest.json"
# Only inert formats may live in a model folder: no code, and no pickle except a torch state_dict
# (``.pt``, for AdaOS's tooling and fine-tuning; the service never loads it), whose pickle may only
# rebuild tensors (``check_state_dict``): what torch's ``weights_only=True`` loader accepts.
ALLOWED_SUFFIXES = frozenset(
    {".onnx", ".json", ".jsonl", ".index", ".gguf", ".txt", ".npy", ".png", ".md", ".pt"}
)
_PT_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
    }
)
_PT_STORAGE = re.compile(r"[A-Z][A-Za-z0-9]*Storage")
_PICKLE_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})
_PICKLE_MEMO = frozenset({"BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"})


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


def check_state_dict(path: Path) -> None:
    """Refuse a ``.pt`` file that is not a torch zip whose one pickle only rebuilds tensors.

    Read with :mod:`pickletools` (nothing is unpickled, no torch needed): every global the pickle
    names must be a tensor rebuild function, a torch storage class or ``OrderedDict``.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith(".pkl")]
            if len(pickles) != 1:
                raise ModelError(f"{path.name}: expected one pickle in the archive, found {len(pickles)}")
            data = archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{path.name}: not a torch state_dict archive: {exc}") from exc
    last: list[tuple[str, Any]] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
            elif name == "STACK_GLOBAL":
                if len(last) < 2 or any(n not in _PICKLE_STRINGS for n, _ in last[-2:]):
                    raise ModelError(f"{path.name}: a global the pickle builds at run time")
                module, attr = str(last[-2][1]), str(last[-1][1])
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise ModelError(f"{path.name}: pickle extension codes are not allowed")
            else:
                if name not in _PICKLE_MEMO:  # storing into the memo leaves the stack as it is
                    last = [*last[-1:], (name, arg)]
                continue
            last = []
            if (module, attr) not in _PT_GLOBALS and not (module == "torch" and _PT_STORAGE.fullmatch(attr)):
                raise ModelError(f"{path.name}: the pickle names {module}.{attr}, not a tensor")
    except ValueError as exc:  # pickletools on a truncated or malformed stream
        raise ModelError(f"{path.name}: unreadable pickle: {exc}") from exc


def write_manifest(model_dir: Path, **fields: Any) -> ModelManifest:
    """Hash every file of ``model_dir`` (except the manifest) and write ``manifest.json``."""
    entries = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        if rel == MANIFEST_NAME:
            continue
        if path.suffix not in ALLOWED_SUFFIXES:
            raise ModelError(f"{rel}: format {path.suffix!r} is not allowed in a model folder")
        if path.suffix == ".pt":
            check_state_dict(path)
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
        if path.suffix == ".pt":
            check_state_dict(path)
    for path in model_dir.rglob("*"):
        rel = path.relative_to(model_dir).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and rel not in listed:
            raise ModelError(f"{model_dir}: {rel} is not listed in the manifest")
    return manifest
