"""Multi-turn evaluation of the conversation layer: frames per turn, segment recall, false splits.

``python -m tools.multiturn [--data tests/data/multiturn.jsonl] [--probe ../shared/bench/home_probe.jsonl]
[--no-heldout] [--models-dir DIR] [--catalog DIR] [--json] [--out FILE]``

The data: one session per line, ``{"session", "locale", "turns": [{"text", "action", "expect":
[{"intent", "slots"}, ...]}]}``: the frames a turn should yield, in order (one per request of a
multi-request turn; ``{"intent": null}`` = nothing should be accepted) and the context action of
its first request. The sessions run through :class:`skill.conversation.Conversation` on the served
pipeline (the service's own loader: the active model and the catalog rows it adds at load).

* frame accuracy: a turn is right when its accepted requests are exactly the expected frames, in
  order (intent equal, every expected slot equal; slots not listed are not judged); per turn
  position, overall, and for follow-ups (turns whose expected action is update or cancel);
* action accuracy: the first request's ``context.action``;
* segment recall: expected requests an accepted request of the answer covers (same intent, in
  order): no request lost;
* false splits: single-request utterances answered with segments, on the file's single-request
  turns, on a probe file (every row is one request) and on the catalog's held-out split.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec

from skill.config import REPO_ROOT, load_config
from skill.conversation import Conversation, Request, SessionStore, to_wire
from skill.pipeline import Pipeline
from skill.service import ServiceState

DEFAULT_DATA = REPO_ROOT / "tests" / "data" / "multiturn.jsonl"
DEFAULT_PROBE = REPO_ROOT.parent / "shared" / "bench" / "home_probe.jsonl"


class Frame(msgspec.Struct, frozen=True):
    """An expected request: ``intent`` None means "nothing accepted"."""

    intent: str | None
    slots: dict[str, Any] = msgspec.field(default_factory=dict)


class Turn(msgspec.Struct, frozen=True):
    """One turn of a session."""

    text: str
    expect: list[Frame]
    action: str | None = None


class Session(msgspec.Struct, frozen=True):
    """One conversation."""

    session: str
    turns: list[Turn]
    locale: str | None = None
    split: str = "dev"  # "dev": written with the code; "fresh": written after it, run once


def read_sessions(path: Path) -> list[Session]:
    """The sessions of a JSONL file (a bad line is an error naming the line)."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(msgspec.json.decode(line, type=Session))
        except msgspec.DecodeError as exc:
            raise SystemExit(f"{path}:{n}: {exc}") from exc
    return out


def _accepted(wire: dict[str, Any]) -> list[dict[str, Any]]:
    parts = wire.get("segments") or [wire]
    return [p for p in parts if p["decision"] == "accept" and p["top_intent"]]


def _matches(got: dict[str, Any], want: Frame) -> bool:
    return got["top_intent"] == want.intent and all(got["slots"].get(k) == v for k, v in want.slots.items())


def score_turn(wire: dict[str, Any], turn: Turn) -> dict[str, Any]:
    """Right frames, covered requests, the action."""
    got = _accepted(wire)
    wanted = [f for f in turn.expect if f.intent is not None]
    frames_ok = len(got) == len(wanted) and all(_matches(g, w) for g, w in zip(got, wanted, strict=False))
    covered, pos = 0, 0
    for w in wanted:  # in order: each expected request needs its own accepted request
        while pos < len(got) and got[pos]["top_intent"] != w.intent:
            pos += 1
        if pos < len(got):
            covered += 1
            pos += 1
    action = wire.get("context", {}).get("action")
    return {
        "frames_ok": frames_ok,
        "expected_requests": len(wanted),
        "covered": covered,
        "action_ok": turn.action is None or action == turn.action,
        "split": "segments" in wire,
        "got": [(g["top_intent"], g["slots"]) for g in got],
        "action": action,
    }


def evaluate_sessions(pipeline: Pipeline, sessions: list[Session]) -> dict[str, Any]:
    """Every session in its own scope, turns in order."""
    conv = Conversation(SessionStore(3600.0))
    per_pos: dict[int, list[bool]] = defaultdict(list)
    follow: list[bool] = []
    actions: list[bool] = []
    expected = covered = 0
    single_turns = single_splits = 0
    failures = []
    by_locale: dict[str, list[bool]] = defaultdict(list)
    by_split: dict[str, list[bool]] = defaultdict(list)
    follow_by_split: dict[str, list[bool]] = defaultdict(list)
    for s in sessions:
        for i, turn in enumerate(s.turns):
            rid = f"{s.session}-{i}"
            answer = conv.answer(pipeline, Request(turn.text, rid, s.locale, None, f"eval:{s.session}"))
            res = score_turn(to_wire(answer, pipeline.gate_config.accept, rid), turn)
            per_pos[i + 1].append(res["frames_ok"])
            by_locale[s.locale or "?"].append(res["frames_ok"])
            by_split[s.split].append(res["frames_ok"])
            actions.append(res["action_ok"])
            if turn.action in ("update", "cancel"):
                follow.append(res["frames_ok"] and res["action_ok"])
                follow_by_split[s.split].append(res["frames_ok"] and res["action_ok"])
            expected += res["expected_requests"]
            covered += res["covered"]
            if res["expected_requests"] <= 1:
                single_turns += 1
                single_splits += res["split"]
            if not (res["frames_ok"] and res["action_ok"]):
                failures.append({"session": s.session, "turn": i + 1, "text": turn.text, **res})
    every = [ok for oks in per_pos.values() for ok in oks]
    return {
        "sessions": len(sessions),
        "turns": len(every),
        "frame_accuracy": _rate(every),
        "frame_accuracy_per_turn": {str(k): _rate(v) | {"n": len(v)} for k, v in sorted(per_pos.items())},
        "frame_accuracy_per_locale": {k: _rate(v) | {"n": len(v)} for k, v in sorted(by_locale.items())},
        "frame_accuracy_per_split": {k: _rate(v) | {"n": len(v)} for k, v in sorted(by_split.items())},
        "follow_up_frames": _rate(follow) | {"n": len(follow)},
        "follow_up_frames_per_split": {
            k: _rate(v) | {"n": len(v)} for k, v in sorted(follow_by_split.items())
        },
        "action_accuracy": _rate(actions),
        "segment_recall": {
            "covered": covered,
            "expected": expected,
            "rate": round(covered / max(1, expected), 4),
        },
        "false_splits_in_file": {"split": single_splits, "single_request_turns": single_turns},
        "failures": failures,
    }


def _rate(oks: list[bool]) -> dict[str, Any]:
    return {"right": sum(oks), "rate": round(sum(oks) / max(1, len(oks)), 4)}


def false_splits(pipeline: Pipeline, rows: list[tuple[str, str | None, str]]) -> dict[str, Any]:
    """Single-request utterances (text, locale, label) that came back split; no text in the report."""
    conv = Conversation(SessionStore(0.0))  # no context: every row stands alone
    split: dict[str, int] = defaultdict(int)
    n = 0
    for text, locale, label in rows:
        n += 1
        if conv.answer(pipeline, Request(text, "fs", locale, None, None)).split:
            split[label] += 1
    total = sum(split.values())
    return {"rows": n, "split": total, "rate": round(total / max(1, n), 4), "by_label": dict(split)}


def probe_rows(path: Path) -> list[tuple[str, str | None, str]]:
    """Every row of a bench-style JSONL (``text``, ``lang``, ``intent``): each one request."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            rows.append(
                (
                    rec["text"],
                    rec.get("lang") or rec.get("locale"),
                    str(rec.get("category") or rec.get("intent")),
                )
            )
    return rows


def heldout_rows(pipeline: Pipeline) -> list[tuple[str, str | None, str]]:
    """The catalog's held-out split (the 20 % training kept for calibration)."""
    from tools._data import rows_from_catalog  # noqa: PLC0415 - training helpers, no torch

    _, val = rows_from_catalog(pipeline.catalog)
    return [(r.text, r.locale or None, r.intent) for r in val]


def load_pipeline(models_dir: str | None, catalog: str | None) -> Pipeline:
    """The pipeline the service would serve (its own loader)."""
    overrides = {
        "audit_enabled": False,
        "watch_pointer": False,
        "models_dir": models_dir,
        "catalog_dir": catalog,
    }
    state = ServiceState(load_config(overrides=overrides))
    state.load()
    assert state.pipeline is not None
    return state.pipeline


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m tools.multiturn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="multi-turn sessions (JSONL)")
    parser.add_argument(
        "--probe", type=Path, default=DEFAULT_PROBE, help="single-request rows for false splits"
    )
    parser.add_argument("--no-probe", action="store_true", help="skip the probe file")
    parser.add_argument("--no-heldout", action="store_true", help="skip the catalog's held-out split")
    parser.add_argument("--models-dir", help="model artifact root (default: the service's)")
    parser.add_argument("--catalog", help="catalog directory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    pipeline = load_pipeline(args.models_dir, args.catalog)
    report: dict[str, Any] = {"model_id": pipeline.model_id, "data": str(args.data)}
    report.update(evaluate_sessions(pipeline, read_sessions(args.data)))
    if not args.no_probe and args.probe.is_file():
        report["false_splits_probe"] = {
            "file": str(args.probe),
            **false_splits(pipeline, probe_rows(args.probe)),
        }
    if not args.no_heldout:
        report["false_splits_heldout"] = false_splits(pipeline, heldout_rows(pipeline))
    text = json.dumps(report, ensure_ascii=False, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    if args.json:
        print(text)
    else:
        print(_summary(report))
    return 0


def _summary(r: dict[str, Any]) -> str:
    lines = [
        f"model {r['model_id']}: {r['sessions']} sessions, {r['turns']} turns",
        f"frame accuracy {r['frame_accuracy']['rate'] * 100:.1f} % "
        f"({r['frame_accuracy']['right']}/{r['turns']}); "
        + ", ".join(
            f"turn {k}: {v['rate'] * 100:.1f} % of {v['n']}" for k, v in r["frame_accuracy_per_turn"].items()
        ),
        f"follow-up frames {r['follow_up_frames']['rate'] * 100:.1f} % of {r['follow_up_frames']['n']}; "
        f"actions {r['action_accuracy']['rate'] * 100:.1f} %",
        "per split: "
        + "; ".join(
            f"{k}: frames {v['rate'] * 100:.1f} % of {v['n']}, follow-ups "
            f"{r['follow_up_frames_per_split'].get(k, {}).get('rate', 0) * 100:.1f} % of "
            f"{r['follow_up_frames_per_split'].get(k, {}).get('n', 0)}"
            for k, v in r["frame_accuracy_per_split"].items()
        ),
        f"segment recall {r['segment_recall']['rate'] * 100:.1f} % "
        f"({r['segment_recall']['covered']}/{r['segment_recall']['expected']})",
        f"false splits in the file: {r['false_splits_in_file']['split']} of "
        f"{r['false_splits_in_file']['single_request_turns']} single-request turns",
    ]
    for key in ("false_splits_probe", "false_splits_heldout"):
        if key in r:
            fs = r[key]
            lines.append(f"{key}: {fs['split']} of {fs['rows']} ({fs['rate'] * 100:.2f} %)")
    for f in r["failures"]:
        lines.append(
            f"  FAIL {f['session']} turn {f['turn']}: {f['text']!r} got {f['got']} action {f['action']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
