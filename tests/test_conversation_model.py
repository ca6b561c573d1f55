"""End to end on the repo's embedded default model and catalog, over HTTP on loopback.

Only intents that exist in the catalog today: alarm.set / alarm.cancel, device.turn_on / turn_off,
voice.timer.start / cancel, music.play, music.volume.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from skill.config import REPO_ROOT, load_config
from tests.test_bridge_support import ServiceThread


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceThread]:
    root = tmp_path_factory.mktemp("model-svc")
    cfg = load_config(
        env={},
        overrides={
            "models_dir": str(root / "node-models"),  # empty: the embedded default model serves
            "embedded_models_dir": str(REPO_ROOT / "models"),
            "audit_dir": str(root / "logs"),
            "watch_pointer": False,
        },
    )
    svc = ServiceThread(cfg).start()
    assert svc.state is not None and svc.state.pipeline is not None and svc.state.pipeline.ranker is not None
    yield svc
    svc.stop()


@pytest.fixture
async def http(service: ServiceThread) -> AsyncIterator[Any]:
    async with aiohttp.ClientSession() as session:

        async def parse(text: str, **body: Any) -> dict[str, Any]:
            async with session.post(f"{service.url}/parse", json={"text": text, **body}) as resp:
                assert resp.status == 200
                data: dict[str, Any] = await resp.json()
                return data

        yield parse


@pytest.mark.parametrize(
    ("text", "intents"),
    [
        ("выключи свет на кухне и поставь будильник на семь", ["device.turn_off", "alarm.set"]),
        ("turn off the kitchen light and set an alarm for seven", ["device.turn_off", "alarm.set"]),
        ("поставь таймер на пять минут и включи музыку", ["voice.timer.start", "music.play"]),
        (
            "set a timer for ten minutes and turn on the kitchen light",
            ["voice.timer.start", "device.turn_on"],
        ),
        ("сделай музыку погромче и выключи свет на кухне", ["music.volume", "device.turn_off"]),
    ],
)
async def test_two_requests_on_the_default_model(http: Any, text: str, intents: list[str]) -> None:
    body = await http(text)
    assert [s["top_intent"] for s in body["segments"]] == intents
    assert all(s["decision"] == "accept" for s in body["segments"])
    assert body["top_intent"] == intents[0]


@pytest.mark.parametrize(
    "text",
    [
        "поставь мне будильник на 5:30, пожалуйста",
        "включи свет в гостиной, пожалуйста",
        "set an alarm for 7:30",
    ],
)
async def test_single_requests_stay_whole(http: Any, text: str) -> None:
    body = await http(text)
    assert "segments" not in body and body["decision"] == "accept"


@pytest.mark.parametrize(
    "turns",
    [
        [
            ("поставь будильник на семь", "alarm.set", {"time": "07:00"}, "start"),
            ("сделай на восемь", "alarm.set", {"time": "08:00"}, "update"),
            ("отмени", "alarm.cancel", {"time": "08:00"}, "cancel"),
        ],
        [
            ("set an alarm for seven", "alarm.set", {"time": "07:00"}, "start"),
            ("make it eight instead", "alarm.set", {"time": "08:00"}, "update"),
            ("cancel that", "alarm.cancel", {"time": "08:00"}, "cancel"),
        ],
        [
            ("поставь таймер на 10 минут", "voice.timer.start", {"duration": "PT10M"}, "start"),
            ("а на пятнадцать?", "voice.timer.start", {"duration": "PT15M"}, "update"),
            ("отмени", "voice.timer.cancel", {"duration": "PT15M"}, "cancel"),
        ],
    ],
)
async def test_follow_ups_on_the_default_model(
    http: Any, turns: list[tuple[str, str, dict[str, str], str]]
) -> None:
    session = f"m-{turns[0][0]}"
    previous = None
    for i, (text, intent, slots, action) in enumerate(turns):
        body = await http(text, session_id=session, request_id=f"{session}-{i}")
        assert (body["decision"], body["top_intent"], body["slots"]) == ("accept", intent, slots), text
        assert body["context"]["action"] == action, text
        assert body["context"]["refers_to"] == (previous if action != "start" else None), text
        previous = body["request_id"]


async def test_room_follow_up_on_the_default_model(http: Any) -> None:
    first = await http("выключи свет на кухне", webspace_id="model-ws", request_id="k1")
    assert first["top_intent"] == "device.turn_off"
    body = await http("а в спальне?", webspace_id="model-ws")
    assert body["top_intent"] == "device.turn_off" and body["context"]["refers_to"] == "k1"
    assert body["slots"]["device"].startswith("device:light:") and body["slots"] != first["slots"]
    alone = await http("а в спальне?")  # no scope: not a request on its own words
    assert alone["decision"] != "accept" and alone["context"]["action"] == "noop"


@pytest.mark.parametrize(
    ("text", "numbers"),
    [("сколько будет 15 процентов от 200", ["15", "200"]), ("what is 250 divided by 5", ["250", "5"])],
)
async def test_calculator_answers_every_operand_over_http(http: Any, text: str, numbers: list[str]) -> None:
    body = await http(text)
    assert body["top_intent"] == "calculator.compute"
    assert body["slots"]["number"] == numbers and body["result"]["slots"]["number"] == numbers
