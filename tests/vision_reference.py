"""A float64 numpy reference of the SigLIP vision tower and Gemma 3's multimodal projector, written from the SigLIP
paper and Hugging Face's SiglipVisionModel / Gemma3MultiModalProjector definitions (not from models/):
conv patch embedding (a patch_size-strided conv = a matmul over flattened (channel, row, col) patches), learned
position embeddings, pre-norm blocks (LayerNorm with bias, full bidirectional softmax attention, tanh-GELU MLP),
final LayerNorm, k x k average pooling of the row-major patch grid, RMSNorm (the stored weight multiplies: the
converter folds Gemma's 1 + w in) and the (vision, text) projection.

One ggml quirk is modelled, as the text references model the f16 GeLU table: ggml_conv_2d builds its im2col
columns in F16 (for any kernel type but BF16) and multiplies them as the matmul's first operand, so pixels and
kernel are both rounded to f16 before the patch matmul (f32 sums); Ollama and llama.cpp's clip run the same op.
Without the rounding the encoder differs by ~3e-4 relative.

`off` switches one feature off or changes it, to prove a test is sensitive to it.
"""
from __future__ import annotations

import math

import numpy as np

from test_models_tiny import gelu_ggml_cpu, rms_norm, softmax
from tiny_gguf import VisionSpec


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def tower(vs: VisionSpec, w: dict[str, np.ndarray], pixels: np.ndarray, *off: str) -> np.ndarray:
    """pixels (3, H, W) -> patch states (n_patches, n_embd), patches in row-major order."""
    W = {k: v.astype(np.float64) for k, v in w.items()}
    ps, d = vs.patch_size, vs.n_embd
    side = vs.image_size // ps
    if "no_f16_pixels" not in off:
        pixels = pixels.astype(np.float16)
    patches = pixels.astype(np.float64).reshape(3, side, ps, side, ps).transpose(1, 3, 0, 2, 4)
    kernel = W["v.patch_embedding.weight"]
    if "no_f16_pixels" not in off:
        kernel = kernel.astype(np.float16).astype(np.float64)
    x = patches.reshape(side * side, 3 * ps * ps) @ kernel.reshape(d, -1).T
    x = x + W["v.patch_embedding.bias"]
    if "no_pos" not in off:
        x = x + W["v.position_embedding.weight"]
    hd = d // vs.n_head
    n = side * side
    for il in range(vs.n_layer):
        p = f"v.blk.{il}."

        def lin(name: str, h: np.ndarray) -> np.ndarray:
            return h @ W[p + name + ".weight"].T + W[p + name + ".bias"]

        h = layer_norm(x, W[p + "layer_norm1.weight"], W[p + "layer_norm1.bias"], vs.eps)
        q, k, v = (lin(name, h).reshape(n, vs.n_head, hd) for name in ("attn_q", "attn_k", "attn_v"))
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        if "causal" in off:
            scores = scores + np.triu(np.full((n, n), -np.inf), 1)
        a = np.einsum("hqk,khd->qhd", softmax(scores), v).reshape(n, d)
        x = x + lin("attn_output", a)
        h = layer_norm(x, W[p + "layer_norm2.weight"], W[p + "layer_norm2.bias"], vs.eps)
        x = x + lin("mlp.fc2", gelu_ggml_cpu(lin("mlp.fc1", h)))
    return layer_norm(x, W["v.post_layernorm.weight"], W["v.post_layernorm.bias"], vs.eps)


def project(vs: VisionSpec, w: dict[str, np.ndarray], states: np.ndarray, *off: str) -> np.ndarray:
    """patch states (n_patches, n_embd) -> soft tokens (tokens_per_image, n_text_embd)."""
    side = vs.image_size // vs.patch_size
    k = side // math.isqrt(vs.tokens_per_image)
    grid = states.reshape(side, side, -1)  # (row, col, d)
    if "pool_transposed" in off:
        grid = grid.transpose(1, 0, 2)
    pooled = grid.reshape(side // k, k, side // k, k, -1).mean(axis=(1, 3)).reshape(vs.tokens_per_image, -1)
    normed = rms_norm(pooled, w["mm.mm_soft_emb_norm.weight"].astype(np.float64), vs.eps)
    return np.asarray(normed @ w["mm.mm_input_projection.weight"].astype(np.float64))


def soft_tokens(vs: VisionSpec, w: dict[str, np.ndarray], pixels: np.ndarray, *off: str) -> np.ndarray:
    return project(vs, w, tower(vs, w, pixels, *off), *off)
