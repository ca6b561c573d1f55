"""Registry with real models: pointer flips under load, damaged versions refused, promotion gate."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from skill.app import create_app
from skill.config import Config
from skill.registry import read_history, read_pointer, write_pointer
from skill.service import ServiceState
from tests.test_train import write_tiny_catalog
from tools import models as cli
from tools import train as trainer
from tools.eval import EvalReport, GoldenFailure

TEXTS = ["поставь таймер на 10 минут", "what's the weather in berlin", "turn the lights on", "как дела"]


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(catalog dir, version A, version B): two tiny models trained with different seeds."""
    base = tmp_path_factory.mktemp("versions")
    catalog = write_tiny_catalog(base / "catalog")
    ids = []
    for name in ("tiny-a", "tiny-b"):  # same data and seed, another name: two distinct versions
        args = ["--catalog", str(catalog), "--out", str(base / "models"), "--name", name, "--quiet"]
        assert trainer.main(args) == 0
        ids.append(next(p for p in (base / "models").iterdir() if p.name.startswith(name)))
    return catalog, ids[0], ids[1]


@pytest.fixture
def node(tmp_path: Path, two_versions: tuple[Path, Path, Path]) -> tuple[Path, Path, str, str]:
    """A node root holding both versions, the pointer on A."""
    catalog, a, b = two_versions
    root = tmp_path / "node"
    for v in (a, b):
        shutil.copytree(v, root / v.name)
    write_pointer(root, a.name, why="test setup")
    return catalog, root, a.name, b.name


async def _started(aiohttp_client: Any, cfg: Config) -> tuple[TestClient, ServiceState]:
    state = ServiceState(cfg)
    client = await aiohttp_client(create_app(state))
    for _ in range(500):
        if state.ready:
            break
        await asyncio.sleep(0.02)
    assert state.ready
    return client, state


async def _wait_model(client: TestClient, model_id: str, timeout: float = 20.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        body = await (await client.get("/health")).json()
        if body["model_id"] == model_id and body["last_reload"]["trigger"] == "pointer":
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"service did not switch to {model_id}")


async def test_flip_pointer_under_load(
    aiohttp_client: Any, node: tuple[Path, Path, str, str], make_config: Callable[..., Config]
) -> None:
    catalog, root, a, b = node
    client, _ = await _started(aiohttp_client, make_config(catalog_dir=str(catalog), models_dir=str(root)))
    stop = asyncio.Event()
    seen: list[str | None] = []
    failures: list[str] = []

    async def worker(i: int) -> None:
        n = 0
        while not stop.is_set() and n < 2000:
            resp = await client.post("/parse", json={"text": TEXTS[(i + n) % len(TEXTS)]})
            body = await resp.json()
            if resp.status != 200 or body.get("ok") is not True:
                failures.append(f"{resp.status}: {body}")
            seen.append(body.get("model_id"))
            n += 1

    workers = [asyncio.create_task(worker(i)) for i in range(20)]
    try:
        for flip in range(6):
            target = b if flip % 2 == 0 else a
            write_pointer(root, target, why=f"flip {flip}")
            await _wait_model(client, target)
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert not failures, failures[:3]
    assert set(seen) == {a, b}
    assert len(seen) > 100


async def test_damaged_version_is_refused_and_old_keeps_serving(
    aiohttp_client: Any,
    node: tuple[Path, Path, str, str],
    make_config: Callable[..., Config],
    capsys: pytest.CaptureFixture[str],
) -> None:
    catalog, root, a, b = node
    onnx = root / b / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    # Promotion refuses it, even with --force.
    assert cli.main(["--root", str(root), "promote", b, "--catalog", str(catalog)]) == 1
    assert cli.main(["--root", str(root), "promote", b, "--force", "--catalog", str(catalog)]) == 1
    assert "damaged" in capsys.readouterr().err
    pointer = read_pointer(root)
    assert pointer is not None and pointer.model_id == a
    # The service refuses to switch to it and keeps serving A.
    client, state = await _started(
        aiohttp_client, make_config(catalog_dir=str(catalog), models_dir=str(root))
    )
    write_pointer(root, b, why="operator error")
    for _ in range(400):
        if state.refusals:
            break
        await asyncio.sleep(0.05)
    health = await (await client.get("/health")).json()
    assert health["model_id"] == a and health["model_loaded"] is True
    assert health["last_refusal"]["trigger"] == "pointer"
    assert "damaged" in health["last_refusal"]["error"]
    assert health["refusals_total"] == 1
    body = await (await client.post("/parse", json={"text": TEXTS[0]})).json()
    assert body["ok"] is True and body["model_id"] == a
    # /reindex says the same.
    body = await (await client.post("/reindex", json={"purge_indexes": True})).json()
    assert body["ok"] is False and body["after"]["model_id"] == a and "damaged" in body["error"]


def test_promote_gate_refuses_a_broken_golden_case(
    two_versions: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog, _, b = two_versions
    root = tmp_path / "fresh-node"  # no active version: the candidate is gated on golden cases alone
    shutil.copytree(b, root / b.name)
    strict = tmp_path / "strict_catalog"
    shutil.copytree(catalog, strict)
    path = strict / "intents" / "tiny.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["intents"][0]["golden"] = [{"text": "what is the meaning of life", "locale": "en"}]
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    assert cli.main(["--root", str(root), "promote", b.name, "--catalog", str(strict)]) == 1
    err = capsys.readouterr().err
    assert "golden case breaks" in err and "meaning of life" in err
    assert read_pointer(root) is None
    # --force overrides and the history says so.
    args = ["--root", str(root), "promote", b.name, "--force", "--why", "hotfix", "--catalog", str(strict)]
    assert cli.main(args) == 0
    assert read_pointer(root).model_id == b.name  # type: ignore[union-attr]
    last = read_history(root)[-1]
    assert last["to"] == b.name and "FORCED" in str(last["why"]) and "hotfix" in str(last["why"])
    # With the golden case as the catalog has it, promotion passes the gate without --force.
    assert cli.main(["--root", str(root), "promote", b.name, "--catalog", str(catalog)]) == 0


def _report(acc: float, ece: float, failures: int = 0, per: dict[str, float] | None = None) -> EvalReport:
    fails = [GoldenFailure(f"t{i}", "x.y", {}, None, {}, "abstain") for i in range(failures)]
    return EvalReport("m", 100, acc, ece, per or {}, 10, fails)


@pytest.mark.parametrize(
    ("candidate", "current", "refused"),
    [
        (_report(0.950, 0.05), _report(0.950, 0.05), []),
        (_report(0.946, 0.05), _report(0.950, 0.05), []),  # 0.4 points: allowed
        (_report(0.944, 0.05), _report(0.950, 0.05), ["accuracy drops"]),
        (_report(0.950, 0.071), _report(0.950, 0.05), ["calibration error grows"]),
        (_report(0.950, 0.069), _report(0.950, 0.05), []),
        (_report(0.990, 0.01, failures=1), _report(0.950, 0.05), ["golden case breaks"]),
        (_report(0.990, 0.01, failures=1), _report(0.950, 0.05, failures=1), []),  # already broken before
        (_report(0.990, 0.01, failures=1), None, ["golden case breaks"]),
        (_report(0.5, 0.5), None, []),  # nothing to compare with: only golden cases gate
    ],
)
def test_quality_gate_table(candidate: EvalReport, current: EvalReport | None, refused: list[str]) -> None:
    reasons, _ = cli.quality_gate(candidate, current)
    assert len(reasons) == len(refused)
    for reason, expected in zip(reasons, refused, strict=True):
        assert expected in reason


def test_quality_gate_per_intent_diff() -> None:
    _, diff = cli.quality_gate(
        _report(0.9, 0.1, per={"a.b": 0.8, "c.d": 1.0}), _report(0.9, 0.1, per={"a.b": 0.9})
    )
    assert len(diff) == 2 and "a.b" in diff[0] and "90.0%" in diff[0] and "80.0%" in diff[0]


@pytest.mark.parametrize("enabled", [True, False])
def test_a_swap_hands_freed_memory_back(
    node: tuple[Path, Path, str, str],
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    enabled: bool,
) -> None:
    """After every load, the first one included (its temporaries), glibc's malloc_trim runs (unless
    memory_trim is off): measured with tools.bench_http, 2.3 MiB less resident memory after start."""
    from skill import memory  # noqa: PLC0415

    calls: list[int] = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1) or True)
    catalog, root, a, b = node
    state = ServiceState(make_config(catalog_dir=str(catalog), models_dir=str(root), memory_trim=enabled))
    state.load()
    assert calls == ([1] if enabled else [])
    write_pointer(root, b, why="test")
    assert state.load("pointer").ok and state.pipeline is not None and state.pipeline.model_id == b
    write_pointer(root, a, why="test")
    (root / a / "model.onnx").write_bytes(b"damaged")
    assert not state.load("pointer").ok  # a refused reload may have built and dropped stages too
    assert len(calls) == (3 if enabled else 0)


def test_allocator_calls_work_on_this_libc() -> None:
    from skill import memory  # noqa: PLC0415

    assert memory.limit_arenas(0) is False  # 0 keeps glibc's default
    if memory._libc() is None:  # noqa: SLF001 - not glibc: both are no-ops
        pytest.skip("not glibc")
    assert memory.limit_arenas(8) is True
    assert isinstance(memory.trim(), bool)


NEW_EXAMPLE = "квакни трижды погромче"  # no training row looks like it


def _add_to_catalog(catalog: Path, intent: str, text: str, *, new_intent: bool = False) -> None:
    path = catalog / "intents" / "tiny.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if new_intent:
        data["intents"].append(
            {"intent": intent, "description": {"ru": "Новое"}, "examples": {"ru": [text, text + " ещё"]}}
        )
    else:
        next(i for i in data["intents"] if i["intent"] == intent)["examples"]["ru"].append(text)
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")


async def test_reindex_adds_new_catalog_examples_without_retraining(
    aiohttp_client: Any, tmp_path: Path, node: tuple[Path, Path, str, str], make_config: Callable[..., Config]
) -> None:
    catalog_src, root, _a, _b = node
    catalog = tmp_path / "catalog"
    shutil.copytree(catalog_src, catalog)
    client, state = await _started(
        aiohttp_client, make_config(catalog_dir=str(catalog), models_dir=str(root))
    )
    before = await (await client.get("/health")).json()
    # the model's index lacks the held-out (val) examples: the service added them at start
    assert state.pipeline is not None and state.pipeline.ranker is not None
    added = state.pipeline.ranker.info()["catalog_rows_added"]
    assert added["examples"] > 0 and added["skipped_unknown_intent"] == 0

    first = await (await client.post("/parse", json={"text": NEW_EXAMPLE, "locale": "ru"})).json()
    assert first["evidence"]["nearest_example_similarity"] < 0.99

    _add_to_catalog(catalog, "music.play", NEW_EXAMPLE)
    _add_to_catalog(catalog, "lights.dance", "устрой световое шоу", new_intent=True)
    resp = await client.post("/reindex", json={})
    body = await resp.json()
    assert resp.status == 200 and body["ok"] is True
    assert body["after"]["examples_total"] == before["examples_total"] + 1
    added = state.pipeline.ranker.info()["catalog_rows_added"]
    assert added["skipped_unknown_intent"] == 2  # the model cannot score an intent it never saw

    parsed = await (await client.post("/parse", json={"text": NEW_EXAMPLE, "locale": "ru"})).json()
    assert parsed["evidence"]["nearest_example_similarity"] > 0.999  # the new example is its neighbour


def test_catalog_examples_can_be_turned_off(
    node: tuple[Path, Path, str, str], make_config: Callable[..., Config]
) -> None:
    catalog, root, _a, _b = node
    on = ServiceState(make_config(catalog_dir=str(catalog), models_dir=str(root)))
    off = ServiceState(make_config(catalog_dir=str(catalog), models_dir=str(root), catalog_examples=False))
    on.load()
    off.load()
    assert on.health()["examples_total"] > off.health()["examples_total"]
    assert off.pipeline is not None and off.pipeline.ranker is not None
    assert off.pipeline.ranker.info()["catalog_rows_added"] == {
        "examples": 0,
        "negatives": 0,
        "skipped_unknown_intent": 0,
    }
