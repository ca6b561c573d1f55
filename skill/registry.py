"""Model versions and the active pointer: one small JSON file replaced atomically."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import msgspec

from .fsutil import atomic_write

POINTER_NAME = "active.json"
HISTORY_NAME = "history.jsonl"


class Pointer(msgspec.Struct, frozen=True):
    """``active.json``: which version serves, and which one served before it."""

    model_id: str
    previous: str | None = None
    updated: str = ""


def read_pointer(root: Path) -> Pointer | None:
    """The pointer in ``root``, or None when there is none (a damaged pointer is an error)."""
    path = root / POINTER_NAME
    if not path.is_file():
        return None
    try:
        return msgspec.json.decode(path.read_bytes(), type=Pointer)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path}: damaged pointer: {exc}") from exc


def write_pointer(root: Path, model_id: str, *, who: str = "", why: str = "") -> Pointer:
    """Point ``root`` at ``model_id`` (atomically) and append the change to the history."""
    root.mkdir(parents=True, exist_ok=True)
    old = read_pointer(root)
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    pointer = Pointer(model_id=model_id, previous=old.model_id if old else None, updated=now)
    atomic_write(root / POINTER_NAME, json.dumps(msgspec.to_builtins(pointer), indent=2).encode() + b"\n")
    entry = {
        "ts": now,
        "who": who or os.environ.get("USER", ""),
        "from": pointer.previous,
        "to": model_id,
        "why": why,
    }
    with (root / HISTORY_NAME).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
    mirror_active(root, model_id)
    return pointer


def mirror_active(root: Path, model_id: str) -> list[str]:
    """Relative symlinks ``root/<file>`` → ``<model_id>/<file>`` for every file of the active version.

    AdaOS's readiness check (``adaos interpreter neural-readiness``) reads the artifact root flat
    (``$ADAOS_STATE_DIR/nlu/neural/model.pt``); the service keeps immutable versions behind
    ``active.json``. The mirror gives AdaOS the served version's files where it looks, in a few
    bytes. Each link is swapped atomically; links into older versions that the new one lacks are
    removed; regular files in ``root`` are never touched. Where symlinks cannot be made (some
    Windows setups) the mirror is skipped: serving does not depend on it. Returns the mirrored names.
    """
    version = root / model_id
    if not version.is_dir():
        return []
    names = sorted(p.name for p in version.iterdir() if p.is_file() and not p.name.startswith("."))
    reserved = {POINTER_NAME, HISTORY_NAME}
    done: list[str] = []
    for name in names:
        link = root / name
        if name in reserved or (link.exists() and not link.is_symlink()):
            continue
        tmp = root / f".{name}.{os.getpid()}.link"
        try:
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(Path(model_id) / name)
            os.replace(tmp, link)
        except OSError:
            tmp.unlink(missing_ok=True)
            return done
        done.append(name)
    for link in root.iterdir():
        if link.is_symlink() and link.name not in names:
            target = os.readlink(link)
            if not os.path.isabs(target) and Path(target).parts[:1] != (model_id,):
                link.unlink()  # a file of the version served before
    return done


def resolve_model_dir(roots: list[Path], pinned: str | None = None) -> Path | None:
    """The folder of the model to serve: a pinned id wins, else the first root with a pointer."""
    for root in roots:
        if pinned:
            if (root / pinned).is_dir():
                return root / pinned
            continue
        pointer = read_pointer(root)
        if pointer is not None:
            return root / pointer.model_id
    return None


def list_versions(root: Path) -> list[str]:
    """Model ids (folders with a manifest) under ``root``, oldest first by manifest time."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p / "manifest.json").is_file()]
    return [p.name for p in sorted(found, key=lambda p: ((p / "manifest.json").stat().st_mtime, p.name))]


def read_history(root: Path) -> list[dict[str, object]]:
    """The pointer's audit trail (append-only JSON lines)."""
    path = root / HISTORY_NAME
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out
