"""Tiny llama-architecture GGUF models with a byte-level vocabulary (tests and `tools.bench_llm --tiny`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

SPECIAL = ["<unk>", "<s>", "</s>"]
N_SPECIAL = len(SPECIAL)


def byte_token(byte: int) -> int:
    """The token id of a raw byte in these models."""
    return N_SPECIAL + byte


def write_tiny_gguf(
    path: Path,
    *,
    seed: int = 0,
    prefer: Mapping[str, float] | None = None,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_ff: int = 64,
    n_ctx: int = 16384,
    chat_template: str | None = None,
) -> Path:
    """Write a random llama model (SentencePiece vocab of 256 byte tokens + 3 specials) to ``path``.

    ``prefer`` steers it: the residual stream is just the token embedding with a constant first
    component, and the output matrix reads only that component, so the logit of each preferred
    character is its weight times a positive constant and every other logit is zero, whatever the
    prompt. Without ``prefer`` all weights are random and the output depends on the prompt.
    """
    import gguf  # noqa: PLC0415 - test-only dependency

    rng = np.random.default_rng(seed)
    n_vocab = N_SPECIAL + 256
    head_dim = n_embd // n_head
    tokens = SPECIAL + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def rand(*shape: int, scale: float = 0.5) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    steered = prefer is not None
    embd = rand(n_vocab, n_embd, scale=0.02 if steered else 1.0)
    output = rand(n_vocab, n_embd)
    if prefer is not None:
        embd[:, 0] = 1.0
        output[:] = 0.0
        for char, weight in prefer.items():
            output[byte_token(ord(char)), 0] = weight
    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for i in range(n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{blk}.attn_q.weight", rand(n_embd, n_embd))
        writer.add_tensor(f"{blk}.attn_k.weight", rand(n_embd, n_embd))
        writer.add_tensor(f"{blk}.attn_v.weight", rand(n_embd, n_embd))
        writer.add_tensor(f"{blk}.attn_output.weight", rand(n_embd, n_embd) * (0.0 if steered else 1.0))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{blk}.ffn_gate.weight", rand(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_up.weight", rand(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_down.weight", rand(n_embd, n_ff) * (0.0 if steered else 1.0))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
