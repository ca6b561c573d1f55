"""ONNX export (TorchScript exporter), dynamic int8 quantization, and the int8-vs-fp32 agreement check."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from skill.features import Featurizer

from ._loop import _batches
from ._model import Net, ServingNet

_LOGGER = logging.getLogger(__name__)

MIN_AGREEMENT = 0.99
# Rows whose fp32 top-2 probability margin is under this are near-ties that any rounding may flip;
# the agreement gate counts the rows fp32 decides (a tiny test model's 7 val rows failed the gate by
# one row at a 0.006 margin after a dependency update).
TIE_MARGIN = 0.02
TORCH_CHECK_TEXTS = 32  # texts whose every output (probs, emb, tags) is compared with torch, one at a time
OPSET = 17


class ExportError(RuntimeError):
    """Export or quantization produced a model that must not be served."""


def export_onnx(net: Net, feat: Featurizer, path: Path) -> None:
    """Write the fp32 graph: inputs chars [B,W,L], words [B,W], ngrams [B,N]; outputs probs, emb."""
    enc = feat.encode(["export sample text"])
    args = (torch.from_numpy(enc.chars), torch.from_numpy(enc.words), torch.from_numpy(enc.ngrams))
    net.eval()
    with warnings.catch_warnings():
        # The tracer warns about Python-side shape checks in nn.LSTM and about batch sizes; every
        # batch the graph sees has one word count, and export_int8 compares the outputs with torch.
        warnings.simplefilter("ignore")
        _export(ServingNet(net).eval(), args, path, tags=net.head_tag is not None)
    drop_zero_lstm_state(path)


def drop_zero_lstm_state(path: Path) -> int:
    """Remove the all-zero initial states the exporter builds for each LSTM (ONNX's default is zeros).

    The exporter computes them from the input's shape (Shape, Gather, Unsqueeze, Concat,
    ConstantOfShape) on every run; without them the LSTM starts from zeros all the same. Only a
    state made by a ConstantOfShape whose value is zero is dropped. Returns how many were.
    """
    import onnx  # noqa: PLC0415 - a training dependency, like torch
    from onnx import numpy_helper  # noqa: PLC0415

    model = onnx.load(str(path))
    graph = model.graph
    zeros = set()
    for node in graph.node:
        if node.op_type == "ConstantOfShape":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is None or not np.any(numpy_helper.to_array(value)):
                zeros.add(node.output[0])
    dropped = 0
    for node in graph.node:
        if node.op_type != "LSTM":
            continue
        inputs = list(node.input)
        for i in (5, 6):  # initial_h, initial_c
            if len(inputs) > i and inputs[i] in zeros:
                inputs[i] = ""
                dropped += 1
        while inputs and not inputs[-1]:
            inputs.pop()
        del node.input[:]
        node.input.extend(inputs)
    if not dropped:
        return 0
    wanted = {o.name for o in graph.output}
    while True:  # prune what nothing reads any more
        read = wanted | {i for n in graph.node for i in n.input}
        keep = [n for n in graph.node if any(o in read for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return dropped


def _export(net: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, *, tags: bool) -> None:
    outputs = ["probs", "emb"] + (["tags"] if tags else [])
    torch.onnx.export(
        net,
        args,
        str(path),
        dynamo=False,
        input_names=["chars", "words", "ngrams"],
        output_names=outputs,
        dynamic_axes={
            "chars": {0: "batch", 1: "words"},
            "words": {0: "batch", 1: "words"},
            "ngrams": {0: "batch", 1: "ngrams"},
            "probs": {0: "batch"},
            "emb": {0: "batch"},
            "tags": {0: "batch", 1: "words"},
        },
        opset_version=OPSET,
    )


def quantize(fp32: Path, int8: Path) -> None:
    """Dynamic int8 quantization of MatMul and Gather (the embedding tables, most of the bytes).

    The BiLSTM stays fp32: measured on the embedded model, its int8 form (DynamicQuantizeLSTM) was the
    slower one (one-thread session p50 0.141 vs 0.125 ms, p90 0.252 vs 0.187 ms) for 0.5 MB saved, with
    the same top-1 on 800 catalog texts.
    """
    quantize_dynamic(
        str(fp32),
        str(int8),
        op_types_to_quantize=["MatMul", "Gather"],
        weight_type=QuantType.QInt8,
        per_channel=False,
    )


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with a fixed thread count."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_batched(
    sess: ort.InferenceSession, feat: Featurizer, texts: Sequence[str], batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and embeddings for many texts (equal-length batches, as in training)."""
    probs: np.ndarray | None = None
    embs: np.ndarray | None = None
    for batch in _batches(feat, texts, batch_size, None):
        p, e = sess.run(None, feat.encode([texts[i] for i in batch]).feeds())[:2]
        if probs is None or embs is None:
            probs = np.zeros((len(texts), p.shape[1]), dtype=np.float32)
            embs = np.zeros((len(texts), e.shape[1]), dtype=np.float32)
        probs[batch] = p
        embs[batch] = e
    if probs is None or embs is None:
        raise ExportError("no texts to run")
    return probs, embs


def top1_agreement(p32: np.ndarray, p8: np.ndarray, tie: float = TIE_MARGIN) -> tuple[float, float, int]:
    """(agreement on the rows whose fp32 top-2 margin is at least ``tie``, agreement on every row, the
    number of near-tie rows left out of the first); 1.0 where there is no row to count."""
    same = p32.argmax(axis=1) == p8.argmax(axis=1)
    top2 = np.sort(p32, axis=1)[:, -2:]
    decided = (top2[:, -1] - top2[:, 0]) >= tie if p32.shape[1] > 1 else np.ones(len(p32), dtype=bool)
    agreement = float(same[decided].mean()) if decided.any() else 1.0
    return agreement, float(same.mean()) if len(same) else 1.0, int((~decided).sum())


def export_int8(
    net: Net, feat: Featurizer, out: Path, check_texts: Sequence[str], threads: int = 2
) -> dict[str, float]:
    """Export fp32 to a temp dir, quantize into ``out``, and check top-1 agreement on ``check_texts``."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.fp32.onnx"
        export_onnx(net, feat, fp32)
        quantize(fp32, out)
        texts = list(check_texts) or ["export sample text"]
        fp32_session = session(fp32, threads)
        p32, _ = run_batched(fp32_session, feat, texts)
        p8, _ = run_batched(session(out, threads), feat, texts)
        torch_gap = 0.0
        with torch.no_grad():  # the graph is ServingNet's; the reference is the network as trained
            for text in texts[:TORCH_CHECK_TEXTS]:
                enc = feat.encode([text])
                ref = net(
                    torch.from_numpy(enc.chars), torch.from_numpy(enc.words), torch.from_numpy(enc.ngrams)
                )
                got = fp32_session.run(None, enc.feeds())
                torch_gap = max(
                    torch_gap, *(float(np.abs(r.numpy() - g).max()) for r, g in zip(ref, got, strict=True))
                )
        fp32_bytes = os.path.getsize(fp32)
    agreement, agreement_all, ties = top1_agreement(p32, p8)
    report = {
        "int8_fp32_top1_agreement": agreement,
        "int8_fp32_top1_agreement_all": agreement_all,
        "agreement_rows": float(len(texts)),
        "agreement_ties": float(ties),
        "torch_onnx_max_abs_diff": torch_gap,
        "fp32_bytes": float(fp32_bytes),
        "int8_bytes": float(os.path.getsize(out)),
    }
    _LOGGER.info("int8 vs fp32 top-1 agreement %.4f on %d rows", agreement, len(texts))
    if torch_gap > 1e-3:
        raise ExportError(f"ONNX fp32 output differs from torch by {torch_gap:.2e}")
    if agreement < MIN_AGREEMENT:
        raise ExportError(
            f"int8 and fp32 agree on top-1 for only {agreement:.2%} of the {len(texts) - ties} rows fp32 "
            f"decides (< 99%; {ties} near-ties left out)"
        )
    return report
