"""``tools.multiturn``: the data file's shape, and the measures on a pipeline whose answers we know."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conversation_kit import scripted_pipeline, write_conv_catalog
from tools import multiturn

DATA = Path(__file__).resolve().parent / "data" / "multiturn.jsonl"
TODAY = {
    "alarm.set", "alarm.cancel", "device.turn_on", "device.turn_off", "voice.timer.start",
    "voice.timer.cancel", "music.play", "music.stop", "music.volume",
}  # fmt: skip


def test_the_data_file() -> None:
    sessions = multiturn.read_sessions(DATA)
    assert len(sessions) >= 40
    assert {s.locale for s in sessions} == {"ru", "en"} and {s.split for s in sessions} == {"dev", "fresh"}
    assert all(2 <= len(s.turns) <= 5 for s in sessions)
    assert len({s.session for s in sessions}) == len(sessions)
    for s in sessions:
        for t in s.turns:
            assert t.action in ("start", "update", "cancel", "noop")
            assert t.expect and all(f.intent is None or f.intent in TODAY for f in t.expect), t.text
            assert (t.action == "noop") == (t.expect[0].intent is None), t.text
    multi = [t for s in sessions for t in s.turns if len(t.expect) > 1]
    assert len(multi) >= 20  # multi-request turns


def test_measures(tmp_path: Path) -> None:
    pipe = scripted_pipeline(write_conv_catalog(tmp_path / "catalog"))
    data = tmp_path / "mt.jsonl"
    rows = [
        {"session": "a", "locale": "ru", "turns": [
            {"text": "поставь будильник на 7:30", "action": "start",
             "expect": [{"intent": "alarm.set", "slots": {"time": "07:30"}}]},
            {"text": "сделай на 8:15", "action": "update",
             "expect": [{"intent": "alarm.set", "slots": {"time": "08:15"}}]},
            {"text": "отмени", "action": "cancel", "expect": [{"intent": "alarm.cancel"}]},
        ]},
        {"session": "b", "locale": "en", "turns": [
            {"text": "turn off the kitchen light and set an alarm for 7:30", "action": "start",
             "expect": [{"intent": "device.turn_off"}, {"intent": "alarm.set", "slots": {"time": "07:30"}}]},
            {"text": "and the bedroom too", "action": "update",
             "expect": [{"intent": "device.turn_on"}]},  # wrong on purpose: the light was turned off
        ]},
        {"session": "c", "locale": "ru", "turns": [
            {"text": "выключи свет на кухне и узнай погоду на даче", "action": "start",  # the second abstains
             "expect": [{"intent": "device.turn_off"}, {"intent": "weather.get"}]},
        ]},
    ]  # fmt: skip
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    report = multiturn.evaluate_sessions(pipe, multiturn.read_sessions(data))
    assert report["turns"] == 6
    assert report["frame_accuracy"]["right"] == 4  # not b/2 (expected turn_on), not c/1 (weather abstains)
    assert report["frame_accuracy_per_turn"]["1"] == {"right": 2, "rate": 0.6667, "n": 3}
    assert report["follow_up_frames"] == {"right": 2, "rate": 0.6667, "n": 3}
    assert report["segment_recall"] == {"covered": 6, "expected": 8, "rate": 0.75}
    assert report["false_splits_in_file"] == {"split": 0, "single_request_turns": 4}
    assert {(f["session"], f["turn"]) for f in report["failures"]} == {("b", 2), ("c", 1)}

    fs = multiturn.false_splits(
        pipe,
        [("play simon and garfunkel", "en", "x"), ("поставь будильник на 7:30", "ru", "y"),
         ("выключи свет на кухне и поставь будильник на 7:30", "ru", "z")],
    )  # fmt: skip
    assert fs == {"rows": 3, "split": 1, "rate": 0.3333, "by_label": {"z": 1}}


@pytest.mark.parametrize("bad", ['{"session": "x"}', '{"session": "x", "turns": [{"text": 1}]}'])
def test_bad_lines_name_the_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"session": "ok", "turns": []}\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2"):
        multiturn.read_sessions(path)
