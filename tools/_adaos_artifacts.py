"""The files AdaOS's own tooling reads in a model folder, written by training into every version.

AdaOS's ``diagnose_readiness`` (``adaos interpreter neural-readiness``) requires ``model.pt``,
``labels.json``, ``vocab.json``, ``examples_manifest.jsonl``, ``ranker_config.json`` and
``metrics.json``; it looks for ``faiss.index`` + ``faiss.index.json``, ``negative_faiss.index`` +
``negative_faiss.index.json`` and ``golden_report.json``, and reads ``model_id``, ``model_sha256``,
``examples_total``, ``labels_total``, ``created_at`` from ``metrics.json``. This module adds what the
training did not write already:

* ``labels.json``: the intent order of the classifier (``ranker_config.json`` ``intents``), a JSON list;
* ``model.pt``: the fp32 ``state_dict`` of the very network that was exported to ``model.onnx``, saved
  with ``torch.save`` as a plain dict of tensors, so ``torch.load(path, weights_only=True)`` reads it
  (for AdaOS's tooling and for fine-tuning; the service never loads it and needs no torch);
* ``faiss.index.json`` / ``negative_faiss.index.json``: what each index holds, in the fields AdaOS's
  own service checks before trusting an index (``backend``, ``metric``, ``schema_version``,
  ``index_role``, ``model_id``, ``model_sha256``, ``example_count``, ``examples_digest``);
* ``golden_report.json``: the catalog's golden cases through the real pipeline over this folder
  (the same regex stage, ranker and gates as ``/parse`` and ``tools.eval``);
* AdaOS's keys in ``metrics.json`` (next to the training's own): ``model_id``, ``model_sha256``,
  ``examples_total``, ``labels_total``, ``created_at``, ``vocab_size``, ``label_counts``,
  ``dev_accuracy``, ``dev_macro_f1``, ``gates``, ``artifact_files``.

``model_sha256`` is the sha256 of ``model.onnx``: that is the network that answers requests and whose
int8 embeddings fill both indexes (``model.pt``'s own digest is ``state_dict_sha256``).
``examples_digest`` is the sha256 over the index's rows in index order, each row
``intent \\0 text \\0 locale \\n`` as written in ``examples_manifest.jsonl``.

Called by ``tools.train.train_model`` once the folder's other files and its ``model_id`` exist and
before its manifest is written, so every file here is covered by the manifest's sha256 list.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import msgspec
import numpy as np

from skill.artifacts import MANIFEST_NAME, sha256_file, write_manifest
from skill.catalog import Catalog
from skill.ranker import ExampleRow

SCHEMA_VERSION = 1
LABELS_NAME = "labels.json"
STATE_DICT_NAME = "model.pt"
GOLDEN_NAME = "golden_report.json"
INDEXES = (("faiss.index", "positive_examples"), ("negative_faiss.index", "negative_examples"))

# What AdaOS's readiness check (neural_service_bridge._artifact_readiness) reads, restated here for
# `tools.models verify`; tests/test_adaos_dropin.py restates it again on its own, from AdaOS's code.
REQUIRED_FILES = (
    STATE_DICT_NAME,
    LABELS_NAME,
    "vocab.json",
    "examples_manifest.jsonl",
    "ranker_config.json",
    "metrics.json",
)
PAIRED_FILES = ("faiss.index", "faiss.index.json", "negative_faiss.index", "negative_faiss.index.json")
METRICS_KEYS = ("model_id", "model_sha256", "examples_total", "labels_total", "created_at")


def _dump(path: Path, obj: Any) -> None:
    path.write_bytes(json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True).encode() + b"\n")


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def examples_digest(rows: Sequence[ExampleRow]) -> str:
    """sha256 over index rows in order: ``intent \\0 text \\0 locale \\n`` each."""
    h = hashlib.sha256()
    for row in rows:
        h.update(f"{row.intent}\0{row.text}\0{row.locale}\n".encode())
    return h.hexdigest()


def macro_f1(gold: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray) -> float | None:
    """Mean F1 over the intents of the in-scope rows (``gold >= 0``), the rows ``dev_accuracy`` uses."""
    g, p = np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    inside = g >= 0
    g, p = g[inside], p[inside]
    labels = sorted({int(x) for x in g})
    if not labels:
        return None
    scores = []
    for label in labels:
        tp = int(((p == label) & (g == label)).sum())
        fp = int(((p == label) & (g != label)).sum())
        fn = int(((p != label) & (g == label)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


def save_state_dict(net: Any, path: Path) -> None:
    """``torch.save`` of the network's fp32 weights as a plain ``{name: tensor}`` dict."""
    import torch  # noqa: PLC0415 - training only; serving never imports torch

    state = {
        name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in net.state_dict().items()
    }
    torch.save(state, path)


def golden_report(model_dir: Path, catalog: Catalog, model_id: str) -> dict[str, Any]:
    """Every golden case of the catalog through the pipeline ``/parse`` serves for this folder."""
    from tools.eval import build_pipeline  # noqa: PLC0415 - keeps the import graph of tools.train small

    pipeline = build_pipeline(catalog, model_dir)
    cases = []
    for name, intent in catalog.intents.items():
        for case in intent.golden:
            d = pipeline.parse(case.text, case.locale).decision
            slots_ok = all(d.slots.get(k) == v for k, v in case.slots.items())
            cases.append(
                {
                    "text": case.text,
                    "locale": case.locale,
                    "expected_intent": name,
                    "expected_slots": dict(case.slots),
                    "got_intent": d.intent,
                    "got_slots": msgspec.to_builtins(d.slots),
                    "decision": d.outcome.value,
                    "confidence": round(float(d.confidence), 4),
                    "via": d.via,
                    "passed": d.intent == name and d.outcome.value == "accept" and slots_ok,
                }
            )
    passed = sum(c["passed"] for c in cases)
    return {
        "schema_version": SCHEMA_VERSION,
        "model_id": model_id,
        "total": len(cases),
        "passed": passed,
        "failed": len(cases) - passed,
        "accuracy": passed / len(cases) if cases else None,
        "cases": cases,
    }


def _index_meta(
    model_dir: Path, name: str, role: str, rows: list[ExampleRow], ident: dict[str, str]
) -> dict[str, Any]:
    index = faiss.read_index(str(model_dir / name))
    if index.ntotal != len(rows):
        raise ValueError(f"{name}: {index.ntotal} vectors for {len(rows)} rows of examples_manifest.jsonl")
    return {
        "schema_version": SCHEMA_VERSION,
        "backend": "faiss",
        "metric": "inner_product"
        if index.metric_type == faiss.METRIC_INNER_PRODUCT
        else str(index.metric_type),
        "index_role": role,
        "index_file": name,
        "index_type": type(index).__name__,
        "dim": int(index.d),
        "normalized": True,  # the embeddings are L2-normalized: inner product is cosine
        **ident,
        "example_count": len(rows),
        "examples_digest": examples_digest(rows),
        "examples_file": "examples_manifest.jsonl",
    }


def write_adaos_artifacts(
    work: Path,
    *,
    net: Any,
    catalog: Catalog,
    model_id: str,
    gold: Sequence[int] | np.ndarray,
    pred: Sequence[int] | np.ndarray,
    created_at: str | None = None,
) -> list[str]:
    """Write AdaOS's files into the unfinished model folder ``work``; return the folder's file list.

    ``gold`` / ``pred`` are the validation labels and the ranker's top label per row (-1 = out of
    scope), for ``dev_macro_f1``. The folder must hold the training's other files already, including
    ``metrics.json``; its manifest is written afterwards by the caller.
    """
    work = Path(work)
    cfg = _read(work / "ranker_config.json")
    intents: list[str] = list(cfg["intents"])
    _dump(work / LABELS_NAME, intents)
    save_state_dict(net, work / STATE_DICT_NAME)

    rows = [
        msgspec.json.decode(line, type=ExampleRow)
        for line in (work / "examples_manifest.jsonl").read_bytes().splitlines()
        if line.strip()
    ]
    positives = [r for r in rows if not r.negative]
    negatives = [r for r in rows if r.negative]
    ident = {"model_id": model_id, "model_sha256": sha256_file(work / cfg.get("model_file", "model.onnx"))}
    for (name, role), subset in zip(INDEXES, (positives, negatives), strict=True):
        if (work / name).is_file():
            _dump(work / f"{name}.json", _index_meta(work, name, role, subset, ident))

    # The golden run needs a loadable folder: a provisional manifest, replaced by the caller's.
    write_manifest(work, model_id=model_id)
    try:
        report = golden_report(work, catalog, model_id)
    finally:
        (work / MANIFEST_NAME).unlink(missing_ok=True)
    _dump(work / GOLDEN_NAME, report)

    metrics = _read(work / "metrics.json")
    vocab = _read(work / "vocab.json")
    agreement = metrics.get("int8_fp32_top1_agreement")
    from tools.export import MIN_AGREEMENT  # noqa: PLC0415 - torch-heavy module, already loaded by training
    from tools.models import MAX_ACCURACY_DROP, MAX_ECE_GROWTH  # noqa: PLC0415

    files = sorted({p.name for p in work.iterdir() if p.is_file()} | {"metrics.json", MANIFEST_NAME})
    metrics.update(
        {
            **ident,
            "model_file": cfg.get("model_file", "model.onnx"),
            "state_dict_file": STATE_DICT_NAME,
            "state_dict_sha256": sha256_file(work / STATE_DICT_NAME),
            "examples_total": len(positives),
            "negatives_total": len(negatives),
            "labels_total": len(intents),
            "created_at": created_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "vocab_size": len(vocab["words"]),
            "vocab_sizes": {k: len(vocab[k]) for k in ("chars", "words", "ngrams")},
            "label_counts": dict(sorted(Counter(r.intent for r in positives).items())),
            "dev_accuracy": metrics.get("val_accuracy"),
            "dev_macro_f1": macro_f1(gold, pred),
            "dev_rows": len(gold),
            "gates": {
                "thresholds": dict(cfg.get("thresholds", {})),
                "int8_fp32_top1_agreement": {
                    "value": agreement,
                    "min": MIN_AGREEMENT,
                    "passed": agreement is not None and agreement >= MIN_AGREEMENT,
                },
                "golden": {
                    "passed": report["passed"],
                    "total": report["total"],
                    "ok": report["passed"] == report["total"],
                },
                "promotion": {"max_accuracy_drop": MAX_ACCURACY_DROP, "max_ece_growth": MAX_ECE_GROWTH},
            },
            "artifact_files": files,
        }
    )
    _dump(work / "metrics.json", metrics)
    return files


def readiness_gaps(model_dir: Path) -> list[str]:
    """What AdaOS's readiness check would miss in ``model_dir`` (empty: nothing)."""
    model_dir = Path(model_dir)
    gaps = [f"missing {name}" for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    for index, meta in zip(PAIRED_FILES[::2], PAIRED_FILES[1::2], strict=True):
        if (model_dir / index).is_file() != (model_dir / meta).is_file():
            gaps.append(
                f"{index} without {meta}" if (model_dir / index).is_file() else f"{meta} without {index}"
            )
    if not (model_dir / "faiss.index").is_file():
        gaps.append("missing faiss.index")
    if not (model_dir / GOLDEN_NAME).is_file():
        gaps.append(f"missing {GOLDEN_NAME}")
    try:
        metrics = _read(model_dir / "metrics.json")
    except (OSError, ValueError):
        metrics = {}
    gaps += [f"metrics.json lacks {key}" for key in METRICS_KEYS if metrics.get(key) in (None, "")]
    return gaps
