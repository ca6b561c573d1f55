"""Model registry CLI: list, show, verify, import, promote (quality-gated), rollback, gc.

    python -m tools.models [--root DIR] list
    python -m tools.models show ID
    python -m tools.models verify [ID]
    python -m tools.models import DIR
    python -m tools.models promote ID [--force] [--why TEXT]
    python -m tools.models rollback [--why TEXT]
    python -m tools.models gc --keep N

Exit codes: 0 done, 1 refused (quality gate, damaged model, nothing to roll back to), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from skill.artifacts import ModelError, read_manifest, verify_model_dir
from skill.catalog import load_catalog
from skill.config import load_config
from skill.registry import list_versions, read_history, read_pointer, write_pointer

# Quality gate of `promote`.
MAX_ACCURACY_DROP = 0.005
MAX_ECE_GROWTH = 0.02


class Refused(RuntimeError):
    """The command was refused; the message says why."""


def default_root() -> Path:
    """The node's artifact root when it has versions, else the embedded ``models/``."""
    cfg = load_config()
    node = Path(cfg.models_dir)
    if read_pointer(node) is not None or list_versions(node):
        return node
    return Path(cfg.embedded_models_dir)


def cmd_list(root: Path, _: argparse.Namespace) -> int:
    pointer = read_pointer(root)
    active = pointer.model_id if pointer else None
    previous = pointer.previous if pointer else None
    print(f"root: {root}")
    for model_id in list_versions(root):
        mark = "*" if model_id == active else ("<" if model_id == previous else " ")
        try:
            man = read_manifest(root / model_id)
            acc = man.metrics.get("val_accuracy", man.metrics.get("accuracy"))
            extra = f"created {man.created}  val_accuracy {acc}"
        except ModelError as exc:
            extra = f"unreadable: {exc}"
        print(f"{mark} {model_id}  {extra}")
    return 0


def cmd_show(root: Path, args: argparse.Namespace) -> int:
    man = read_manifest(root / args.model_id)
    print(json.dumps(msgspec.to_builtins(man), indent=2, ensure_ascii=False))
    return 0


def cmd_verify(root: Path, args: argparse.Namespace) -> int:
    from tools._adaos_artifacts import readiness_gaps  # noqa: PLC0415 - loads faiss only here

    ids = [args.model_id] if args.model_id else list_versions(root)
    bad = 0
    for model_id in ids:
        try:
            verify_model_dir(root / model_id)
            # Folders from before AdaOS's files (faiss_negatives.index, no model.pt) still verify
            # and serve; the note says what AdaOS's readiness check would miss in them.
            gaps = readiness_gaps(root / model_id)
            print(f"ok       {model_id}" + (f"  (AdaOS readiness: {'; '.join(gaps)})" if gaps else ""))
        except ModelError as exc:
            bad += 1
            print(f"DAMAGED  {model_id}: {exc}")
    return 1 if bad else 0


def cmd_import(root: Path, args: argparse.Namespace) -> int:
    src = Path(args.source)
    man = verify_model_dir(src)
    dest = root / man.model_id
    if dest.exists():
        raise Refused(f"{man.model_id} already exists in {root}; versions are immutable")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        shutil.copytree(src, tmp / "m")
        verify_model_dir(tmp / "m")
        (tmp / "m").rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"imported {man.model_id} into {root}")
    return 0


def quality_gate(candidate: Any, current: Any | None) -> tuple[list[str], list[str]]:
    """Reasons to refuse and per-intent diff lines, comparing two EvalReports."""
    reasons: list[str] = []
    before_fail = {f.text for f in current.golden_failures} if current is not None else set()
    broken = [f for f in candidate.golden_failures if f.text not in before_fail]
    for f in broken:
        reasons.append(
            f"golden case breaks: {f.text!r} expected {f.expected_intent} {f.expected_slots}, "
            f"got {f.got_intent} {f.got_slots} ({f.decision})"
        )
    diff: list[str] = []
    if current is not None:
        if candidate.accuracy < current.accuracy - MAX_ACCURACY_DROP:
            reasons.append(
                f"accuracy drops {100 * (current.accuracy - candidate.accuracy):.2f} points "
                f"({current.accuracy:.4f} -> {candidate.accuracy:.4f}; "
                f"limit {100 * MAX_ACCURACY_DROP} points)"
            )
        if candidate.ece > current.ece + MAX_ECE_GROWTH:
            reasons.append(
                f"calibration error grows {current.ece:.4f} -> {candidate.ece:.4f} (limit +{MAX_ECE_GROWTH})"
            )
        for intent in sorted(set(candidate.per_intent) | set(current.per_intent)):
            a, b = current.per_intent.get(intent), candidate.per_intent.get(intent)
            if a != b:
                diff.append(f"  {intent:32s} {_pct(a)} -> {_pct(b)}")
    return reasons, diff


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:5.1f}%"


def gate_against_active(
    root: Path, target: Path, catalog: Any, candidate: Any | None = None
) -> tuple[Any, Any | None, list[str], list[str]]:
    """Evaluate ``target`` (unless its report is given) and the active version of ``root``, and gate:
    (candidate report, active report or None, reasons to refuse, per-intent diff lines)."""
    from tools.eval import evaluate_model  # noqa: PLC0415 - loads the ML runtime only when needed

    pointer = read_pointer(root)
    current = None
    if pointer is not None and pointer.model_id != target.name and (root / pointer.model_id).is_dir():
        try:
            current = evaluate_model(root / pointer.model_id, catalog)
        except ModelError as exc:
            print(f"warning: the active version cannot be evaluated ({exc}); gating on the candidate alone")
    if candidate is None:
        candidate = evaluate_model(target, catalog)
    reasons, diff = quality_gate(candidate, current)
    return candidate, current, reasons, diff


def cmd_promote(root: Path, args: argparse.Namespace) -> int:
    target = root / args.model_id
    if not target.is_dir():
        raise Refused(f"no version {args.model_id} in {root}")
    try:
        verify_model_dir(target)
    except ModelError as exc:
        raise Refused(f"{args.model_id} is damaged: {exc}") from exc  # --force never serves a damaged model
    catalog = load_catalog(args.catalog or load_config().catalog_dir)
    candidate, current, reasons, diff = gate_against_active(root, target, catalog)
    print(
        f"candidate {candidate.model_id}: accuracy {candidate.accuracy:.4f}, ECE {candidate.ece:.4f}, "
        f"golden {candidate.golden_total - len(candidate.golden_failures)}/{candidate.golden_total}"
    )
    if current is not None:
        print(
            f"active    {current.model_id}: accuracy {current.accuracy:.4f}, ECE {current.ece:.4f}, "
            f"golden {current.golden_total - len(current.golden_failures)}/{current.golden_total}"
        )
    if diff:
        print("per-intent recall (active -> candidate):")
        print("\n".join(diff))
    if reasons and not args.force:
        raise Refused("promotion refused:\n  " + "\n  ".join(reasons))
    why = args.why or ""
    if reasons:
        why = f"FORCED over: {'; '.join(reasons)}" + (f" | {why}" if why else "")
    write_pointer(root, args.model_id, why=why or "promote")
    print(f"active -> {args.model_id}" + (" (forced)" if reasons else ""))
    return 0


def cmd_rollback(root: Path, args: argparse.Namespace) -> int:
    pointer = read_pointer(root)
    if pointer is None or not pointer.previous:
        raise Refused("nothing to roll back to: the pointer has no previous version")
    try:
        verify_model_dir(root / pointer.previous)
    except ModelError as exc:
        raise Refused(f"previous version {pointer.previous} is damaged: {exc}") from exc
    write_pointer(root, pointer.previous, why=args.why or "rollback")
    print(f"active -> {pointer.previous} (rolled back from {pointer.model_id})")
    return 0


def cmd_gc(root: Path, args: argparse.Namespace) -> int:
    if args.keep < 1:
        raise Refused("--keep must be at least 1")
    pointer = read_pointer(root)
    protected = {pointer.model_id, pointer.previous} if pointer else set()
    versions = list_versions(root)
    keep = set(versions[-args.keep :]) | {p for p in protected if p}
    for model_id in versions:
        if model_id not in keep:
            shutil.rmtree(root / model_id)
            print(f"removed {model_id}")
    return 0


def cmd_history(root: Path, _: argparse.Namespace) -> int:
    for entry in read_history(root):
        print(json.dumps(entry, ensure_ascii=False))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", help="model artifact root (default: the node's, else the embedded models/)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list").set_defaults(func=cmd_list)
    p = sub.add_parser("show")
    p.add_argument("model_id")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("verify")
    p.add_argument("model_id", nargs="?")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("import")
    p.add_argument("source")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("promote")
    p.add_argument("model_id")
    p.add_argument("--force", action="store_true", help="promote despite a failed quality gate (recorded)")
    p.add_argument("--why", help="reason, written to the history")
    p.add_argument("--catalog", help="catalog directory for the evaluation")
    p.set_defaults(func=cmd_promote)
    p = sub.add_parser("rollback")
    p.add_argument("--why")
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("gc")
    p.add_argument("--keep", type=int, required=True)
    p.set_defaults(func=cmd_gc)
    sub.add_parser("history").set_defaults(func=cmd_history)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = _parser().parse_args(argv)
    root = Path(args.root) if args.root else default_root()
    try:
        return int(args.func(root, args))
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
