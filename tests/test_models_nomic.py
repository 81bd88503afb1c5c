"""A tiny random-weight nomic-bert (fused QKV, NeoX RoPE instead of position embeddings, SwiGLU, mean pooling)
against a float64 numpy reference written from the model's definition (nomic-ai's NomicBertModel: post-LayerNorm
blocks, bidirectional attention within each sequence), alone and with two inputs in one batch."""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from arch_reference import inv_freq_plain, rope
from ggml import RuntimeOptions, load_backend
from ml.batch import Batch
from ml.errors import ModelLoadError
from models import load_model
from test_models_tiny import silu, softmax

N_EMBD, N_HEAD, N_FF, N_LAYER, N_VOCAB, EPS, BASE = 32, 4, 48, 2, 40, 1e-12, 1000.0
HEAD = N_EMBD // N_HEAD
TOL = 1e-4


def make_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def mat(n_in: int, n_out: int) -> np.ndarray:
        return np.asarray(rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), dtype=np.float32)

    def vec(n: int, mean: float = 0.0) -> np.ndarray:
        return (mean + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": rng.standard_normal((N_VOCAB, N_EMBD)).astype(np.float32),
         "token_types.weight": (0.5 * rng.standard_normal((2, N_EMBD))).astype(np.float32),
         "token_embd_norm.weight": vec(N_EMBD, 1.0), "token_embd_norm.bias": vec(N_EMBD)}
    for il in range(N_LAYER):
        p = f"blk.{il}."
        w[p + "attn_qkv.weight"] = mat(N_EMBD, 3 * N_EMBD) * 2.0
        w[p + "attn_output.weight"] = mat(N_EMBD, N_EMBD)
        w[p + "attn_output_norm.weight"], w[p + "attn_output_norm.bias"] = vec(N_EMBD, 1.0), vec(N_EMBD)
        w[p + "ffn_up.weight"], w[p + "ffn_gate.weight"] = mat(N_EMBD, N_FF), mat(N_EMBD, N_FF)
        w[p + "ffn_down.weight"] = mat(N_FF, N_EMBD)
        w[p + "layer_output_norm.weight"], w[p + "layer_output_norm.bias"] = vec(N_EMBD, 1.0), vec(N_EMBD)
    return w


def write(path: Path, w: dict[str, np.ndarray], rope_dim: int = HEAD) -> None:
    writer = gguf.GGUFWriter(str(path), "nomic-bert")
    a = "nomic-bert"
    for key, value in (("context_length", 64), ("embedding_length", N_EMBD), ("block_count", N_LAYER),
                       ("feed_forward_length", N_FF), ("attention.head_count", N_HEAD),
                       ("rope.dimension_count", rope_dim), ("pooling_type", 1)):
        writer.add_uint32(f"{a}.{key}", value)
    writer.add_float32(f"{a}.attention.layer_norm_epsilon", EPS)
    writer.add_float32(f"{a}.rope.freq_base", BASE)
    writer.add_bool(f"{a}.attention.causal", False)
    writer.add_uint32("tokenizer.ggml.token_type_count", 2)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(N_VOCAB - 4)])
    for name, arr in w.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    return np.asarray((x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + EPS) * w + b)


def reference(w: dict[str, np.ndarray], tokens: list[int], *, use_rope: bool = True) -> np.ndarray:
    """Mean-pooled embedding (n_embd,) of one input at positions 0.."""
    W = {k: v.astype(np.float64) for k, v in w.items()}
    n, pos = len(tokens), np.arange(len(tokens))
    x = W["token_embd.weight"][tokens] + W["token_types.weight"][0]
    x = layer_norm(x, W["token_embd_norm.weight"], W["token_embd_norm.bias"])
    inv = inv_freq_plain(BASE, HEAD)
    for il in range(N_LAYER):
        p = f"blk.{il}."
        qkv = x @ W[p + "attn_qkv.weight"].T
        q, k, v = (qkv[:, i * N_EMBD:(i + 1) * N_EMBD].reshape(n, N_HEAD, HEAD) for i in range(3))
        if use_rope:
            q, k = rope(q, pos, HEAD, inv, neox=True), rope(k, pos, HEAD, inv, neox=True)
        att = np.stack([softmax(q[:, h] @ k[:, h].T / math.sqrt(HEAD)) @ v[:, h] for h in range(N_HEAD)], axis=1)
        x = layer_norm(x + att.reshape(n, N_EMBD) @ W[p + "attn_output.weight"].T, W[p + "attn_output_norm.weight"],
                       W[p + "attn_output_norm.bias"])
        h = (silu(x @ W[p + "ffn_gate.weight"].T) * (x @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
        x = layer_norm(x + h, W[p + "layer_output_norm.weight"], W[p + "layer_output_norm.bias"])
    return np.asarray(x.mean(axis=0))


@pytest.fixture(scope="module")
def nomic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, dict[str, np.ndarray]]]:
    w = make_weights(7)
    path = tmp_path_factory.mktemp("nomic") / "nomic.gguf"
    write(path, w)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        yield backend, load_model(backend, strict=True), w
    finally:
        backend.close()


def embed(backend: Any, model: Any, batch: Batch) -> np.ndarray:
    ctx = backend.new_context()
    try:
        out = model.embed(ctx, batch)
        ctx.forward(out).compute(out)
        return np.array(out.numpy(), dtype=np.float64).reshape(-1, N_EMBD)
    finally:
        ctx.close()


A, B = [2, 11, 25, 7, 30, 18, 3], [2, 9, 33, 3]


def test_embedding_matches_reference(nomic: tuple[Any, Any, dict[str, np.ndarray]]) -> None:
    backend, model, w = nomic
    assert model.can_embed
    got = embed(backend, model, Batch.single(A))[0]
    want = reference(w, A)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < TOL
    unroped = reference(w, A, use_rope=False)  # the positions matter (else RoPE would be untested)
    assert np.max(np.abs(unroped - want)) / np.max(np.abs(want)) > 30 * TOL


def test_two_inputs_in_one_batch(nomic: tuple[Any, Any, dict[str, np.ndarray]]) -> None:
    backend, model, w = nomic
    toks = np.array(A + B, dtype=np.int32)
    pos = np.concatenate([np.arange(len(A)), np.arange(len(B))]).astype(np.int32)
    seqs = np.array([0] * len(A) + [1] * len(B), dtype=np.int32)
    got = embed(backend, model, Batch(toks, pos, seqs, np.arange(len(toks), dtype=np.int32)))
    for row, tokens in zip(got, (A, B)):
        want = reference(w, tokens)
        assert np.max(np.abs(row - want)) / np.max(np.abs(want)) < TOL


@pytest.mark.parametrize("rope_dim", [0, 7, 2 * HEAD])
def test_bad_rope_dimensions_are_load_errors(tmp_path: Path, rope_dim: int) -> None:
    path = tmp_path / "bad.gguf"
    write(path, make_weights(1), rope_dim=rope_dim)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        with pytest.raises(ModelLoadError, match="rope.dimension_count"):
            load_model(backend)
    finally:
        backend.close()
