"""Registry without training: atomic pointer, history, pinning, verify, import, rollback, gc."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from skill.artifacts import ModelError, verify_model_dir, write_manifest
from skill.registry import read_history, read_pointer, resolve_model_dir, write_pointer
from tools import models as cli


def fake_version(root: Path, model_id: str, payload: str = "x") -> Path:
    """A hash-listed folder of inert files (enough for registry mechanics, not for serving)."""
    d = root / model_id
    d.mkdir(parents=True)
    (d / "ranker_config.json").write_text(json.dumps({"payload": payload}))
    (d / "examples_manifest.jsonl").write_text('{"text": "a"}\n')
    write_manifest(d, model_id=model_id, created="2026-11-24T00:00:00Z", seed=1)
    return d


def test_pointer_history_and_previous(tmp_path: Path) -> None:
    write_pointer(tmp_path, "m1", who="alice", why="first")
    p = write_pointer(tmp_path, "m2", who="bob", why="better")
    assert p.model_id == "m2" and p.previous == "m1"
    assert read_pointer(tmp_path) == p
    hist = read_history(tmp_path)
    assert [(h["from"], h["to"], h["who"], h["why"]) for h in hist] == [
        (None, "m1", "alice", "first"),
        ("m1", "m2", "bob", "better"),
    ]
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed into place


def test_damaged_pointer_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "active.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged pointer"):
        read_pointer(tmp_path)


def test_resolve_pin_wins_and_roots_in_order(tmp_path: Path) -> None:
    node, embedded = tmp_path / "node", tmp_path / "embedded"
    fake_version(embedded, "e1")
    fake_version(embedded, "e2")
    write_pointer(embedded, "e1")
    assert resolve_model_dir([node, embedded]) == embedded / "e1"
    assert resolve_model_dir([node, embedded], pinned="e2") == embedded / "e2"
    assert resolve_model_dir([node, embedded], pinned="nope") is None
    fake_version(node, "n1")
    write_pointer(node, "n1")
    assert resolve_model_dir([node, embedded]) == node / "n1"


@pytest.mark.parametrize("damage", ["flip_byte", "delete", "extra_file", "pickle"])
def test_verify_detects_damage(tmp_path: Path, damage: str) -> None:
    d = fake_version(tmp_path, "m1")
    verify_model_dir(d)
    if damage == "flip_byte":
        data = bytearray((d / "ranker_config.json").read_bytes())
        data[3] ^= 0x01
        (d / "ranker_config.json").write_bytes(bytes(data))
    elif damage == "delete":
        (d / "examples_manifest.jsonl").unlink()
    elif damage == "extra_file":
        (d / "notes.txt").write_text("sneaked in")
    else:
        (d / "model.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError):
        verify_model_dir(d)
    assert cli.main(["--root", str(tmp_path), "verify", "m1"]) == 1


def test_manifest_refuses_pickles(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "weights.pkl").write_bytes(b"\x80")
    with pytest.raises(ModelError, match="not allowed"):
        write_manifest(d, model_id="m")


def test_rollback_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path
    fake_version(root, "m1")
    fake_version(root, "m2")
    assert cli.main(["--root", str(root), "rollback"]) == 1  # no pointer yet
    write_pointer(root, "m1")
    assert cli.main(["--root", str(root), "rollback"]) == 1  # no previous
    write_pointer(root, "m2")
    assert cli.main(["--root", str(root), "rollback", "--why", "m2 misbehaves"]) == 0
    p = read_pointer(root)
    assert p is not None and p.model_id == "m1" and p.previous == "m2"
    assert read_history(root)[-1]["why"] == "m2 misbehaves"
    # A damaged previous version is never rolled back to.
    (root / "m2" / "ranker_config.json").write_text("tampered")
    assert cli.main(["--root", str(root), "rollback"]) == 1
    assert "damaged" in capsys.readouterr().err


def test_gc_keeps_active_and_previous(tmp_path: Path) -> None:
    for i in range(5):
        d = fake_version(tmp_path, f"m{i}")
        os.utime(d / "manifest.json", (1_000_000 + i, 1_000_000 + i))
    write_pointer(tmp_path, "m0")
    write_pointer(tmp_path, "m1")
    assert cli.main(["--root", str(tmp_path), "gc", "--keep", "1"]) == 0
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == ["m0", "m1", "m4"]
    assert cli.main(["--root", str(tmp_path), "gc", "--keep", "0"]) == 1


def test_import_is_verified_and_immutable(tmp_path: Path) -> None:
    src = fake_version(tmp_path / "elsewhere", "m9")
    root = tmp_path / "node"
    assert cli.main(["--root", str(root), "import", str(src)]) == 0
    verify_model_dir(root / "m9")
    assert cli.main(["--root", str(root), "import", str(src)]) == 1  # versions are immutable
    (src / "ranker_config.json").write_text("tampered")
    assert cli.main(["--root", str(tmp_path / "node2"), "import", str(src)]) == 1
    assert not (tmp_path / "node2" / "m9").exists()


def test_activation_mirrors_the_served_version_flat(tmp_path: Path) -> None:
    """AdaOS reads ``root/model.pt`` and friends: activation links the served version's files there."""
    versions = {"v1": ("model.onnx", "model.pt", "only_v1.json"), "v2": ("model.onnx", "model.pt")}
    for vid, files in versions.items():
        (tmp_path / vid).mkdir()
        for name in files:
            (tmp_path / vid / name).write_text(f"{vid}:{name}", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")  # a regular file is never touched
    (tmp_path / "v1" / "notes.txt").write_text("v1 notes", encoding="utf-8")

    write_pointer(tmp_path, "v1")
    assert (tmp_path / "model.pt").read_text(encoding="utf-8") == "v1:model.pt"
    assert os.readlink(tmp_path / "model.pt") == os.path.join("v1", "model.pt")  # relative: the root can move
    assert (tmp_path / "only_v1.json").is_symlink()
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"

    write_pointer(tmp_path, "v2")
    assert (tmp_path / "model.pt").read_text(encoding="utf-8") == "v2:model.pt"
    assert not (tmp_path / "only_v1.json").exists() and not (tmp_path / "only_v1.json").is_symlink()
    assert (tmp_path / "active.json").is_file() and not (tmp_path / "active.json").is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".link")]
    moved = tmp_path.parent / "moved-root"
    tmp_path.rename(moved)
    assert (moved / "model.onnx").read_text(encoding="utf-8") == "v2:model.onnx"
    moved.rename(tmp_path)
