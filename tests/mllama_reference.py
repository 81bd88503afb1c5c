"""A float64 numpy reference of Llama 3.2 Vision (mllama), written from Hugging Face's MllamaVisionModel,
MllamaForConditionalGeneration / MllamaCrossAttentionDecoderLayer and MllamaImageProcessor definitions and the
layout Ollama's converter writes (not from models/):

* tower: patch conv (no bias), gated pre-tile embedding per aspect ratio, class token, gated position and tile
  position embeddings, pre LayerNorm, tokens per tile padded to a multiple of 8, local layers (attention over all
  tiles' tokens, no mask; GELU MLP) keeping their inputs at the intermediate indices, post LayerNorm, gated
  post-tile embedding, global gated layers; output = global state ++ intermediate states stacked on a last axis
  (feature-major), padding and padded tiles dropped; projector = linear with bias.
* text: llama self-attention layers (normal RoPE, causal); cross-attention layers: per-head RMS-normed q (from the
  text) and k (from the image), no RoPE, full attention, tanh-gated attention and MLP, for rows at or after the
  image's position only (no image: the layer leaves x unchanged).

As in vision_reference.py, the patch conv's f16 im2col is modelled (pixels and kernel rounded to f16), and GELU is
ggml-cpu's tanh GELU table (the model uses ggml's GELU, as Ollama does).
`off` switches one feature off or changes it, to prove a test is sensitive to it.
"""
from __future__ import annotations

import math

import numpy as np

from mllama_tiny import CROSS, MllamaVisionSpec
from test_models_tiny import gelu_ggml_cpu, rms_norm, rope, silu, softmax
from tiny_gguf import TinySpec
from vision_reference import layer_norm


def _full_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """q (n, H, D), k/v (m, H_kv, D): every query sees every key; query head h reads KV head h // (H / H_kv)."""
    group = q.shape[1] // k.shape[1]
    out = np.empty((q.shape[0], q.shape[1], v.shape[2]))
    for h in range(q.shape[1]):
        out[:, h] = softmax(q[:, h] @ k[:, h // group].T * scale) @ v[:, h // group]
    return out.reshape(q.shape[0], -1)


def tower(vs: MllamaVisionSpec, w: dict[str, np.ndarray], tiles: np.ndarray, ratio_id: int,
          *off: str) -> np.ndarray:
    """tiles (n_tiles, 3, S, S), the aspect-ratio id -> tokens (n_tiles * n_positions, n_out) of the own tiles."""
    W = {k: v.astype(np.float64) for k, v in w.items()}
    t, d, ps = vs.max_tiles, vs.n_embd, vs.patch_size
    side = vs.image_size // ps
    n_tiles = tiles.shape[0]
    padded_tiles = np.zeros((t,) + tiles.shape[1:], dtype=np.float32)
    padded_tiles[:n_tiles] = tiles
    pix = padded_tiles.astype(np.float16).astype(np.float64)
    kernel = W["v.patch_embd.weight"].astype(np.float16).astype(np.float64).reshape(d, -1)
    patches = pix.reshape(t, 3, side, ps, side, ps).transpose(0, 2, 4, 1, 3, 5).reshape(t, side * side, -1)
    x = patches @ kernel.T  # (t, n_patches, d)

    def gated(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(W[f"v.{name}.weight"][ratio_id].reshape(shape) * W[f"v.{name}.gate"][0])

    if "no_pre_tile" not in off:
        x = x + gated("pre_tile_position_embd", (t, 1, d))
    x = np.concatenate([np.broadcast_to(W["v.class_embd"], (t, 1, d)), x], axis=1)
    x = x + W["v.position_embd.weight"] * W["v.position_embd.gate"][0]
    if "no_tile_position" not in off:
        x = x + gated("tile_position_embd", (t, vs.n_positions, d))
    x = layer_norm(x, W["v.pre_ln.weight"], W["v.pre_ln.bias"], vs.eps)
    n_pad = (8 - vs.n_positions % 8) % 8
    if "no_padding" in off:
        n_pad = 0
    x = np.concatenate([x, np.zeros((t, n_pad, d))], axis=1).reshape(-1, d)
    kept = []
    for il in range(vs.n_layer):
        if il in vs.intermediate:
            kept.append(x)
        x = _layer(vs, W, f"v.blk.{il}.", x, gated=False)
    x = layer_norm(x, W["v.post_ln.weight"], W["v.post_ln.bias"], vs.eps).reshape(t, -1, d)
    x = (x + gated("post_tile_position_embd", (t, 1, d))).reshape(-1, d)
    for il in range(vs.n_global_layer):
        x = _layer(vs, W, f"v.global.blk.{il}.", x, gated="no_gates" not in off)
    inter = np.stack([kept[sorted(vs.intermediate).index(i)] for i in vs.intermediate], axis=-1)
    if "concat_layers" in off:  # layer-major instead of Hugging Face's stacking
        inter = np.concatenate([kept[sorted(vs.intermediate).index(i)] for i in vs.intermediate], axis=-1)
    out = np.concatenate([x, inter.reshape(x.shape[0], -1)], axis=-1).reshape(t, vs.n_positions + n_pad, -1)
    keep = t if "all_tiles" in off else n_tiles
    return np.asarray(out[:keep, :vs.n_positions].reshape(keep * vs.n_positions, -1))


def _layer(vs: MllamaVisionSpec, W: dict[str, np.ndarray], p: str, x: np.ndarray, gated: bool) -> np.ndarray:
    n, d, hd = x.shape[0], vs.n_embd, vs.n_embd // vs.n_head

    def lin(name: str, h: np.ndarray) -> np.ndarray:
        y = h @ W[p + name + ".weight"].T
        return y + W[p + name + ".bias"] if p + name + ".bias" in W else y

    h = layer_norm(x, W[p + "attn_norm.weight"], W[p + "attn_norm.bias"], vs.eps)
    q, k, v = (lin(name, h).reshape(n, vs.n_head, hd) for name in ("attn_q", "attn_k", "attn_v"))
    a = lin("attn_output", _full_attention(q, k, v, 1.0 / math.sqrt(hd)))
    x = x + (W[p + "attn_gate"][0] if gated else 1.0) * a
    h = layer_norm(x, W[p + "ffn_norm.weight"], W[p + "ffn_norm.bias"], vs.eps)
    m = lin("ffn_down", gelu_ggml_cpu(lin("ffn_up", h)))
    return np.asarray(x + (W[p + "ffn_gate"][0] if gated else 1.0) * m)


def project(w: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    return np.asarray(tokens @ w["mm.0.weight"].astype(np.float64).T + w["mm.0.bias"].astype(np.float64))


def text_logits(spec: TinySpec, w: dict[str, np.ndarray], tokens: list[int], states: np.ndarray | None = None,
                image_pos: int = 0, *off: str) -> np.ndarray:
    """Logits (n_tokens, n_text_vocab) of `tokens` at positions 0..; `states` (n_image, n_embd): the image's
    projected tokens, seen by the rows at or after `image_pos`."""
    W = {k: v.astype(np.float64) for k, v in w.items()}
    s = spec
    n = len(tokens)
    pos = np.arange(n)
    x = W["token_embd.weight"][np.asarray(tokens)]
    for il in range(s.n_layer):
        p = f"blk.{il}."
        if il in CROSS:
            if states is None:
                continue
            h = rms_norm(x, W[p + "attn_norm.weight"], s.eps)
            q = (h @ W[p + "cross_attn_q_proj.weight"].T).reshape(n, s.n_head, s.head_dim)
            k = (states @ W[p + "cross_attn_k_proj.weight"].T).reshape(-1, s.n_head_kv, s.head_dim)
            v = (states @ W[p + "cross_attn_v_proj.weight"].T).reshape(-1, s.n_head_kv, s.head_dim)
            if "no_qk_norm" not in off:
                q = rms_norm(q, W[p + "cross_attn_q_norm.weight"], s.eps)
                k = rms_norm(k, W[p + "cross_attn_k_norm.weight"], s.eps)
            a = _full_attention(q, k, v, 1.0 / math.sqrt(s.head_dim)) @ W[p + "cross_attn_o_proj.weight"].T
            seen = np.ones((n, 1)) if "all_rows" in off else (pos >= image_pos).astype(np.float64)[:, None]
            gate = W[p + "cross_attn_attn_gate"][0]
            g_attn = gate if "no_tanh" in off else math.tanh(gate)
            x = x + g_attn * a * seen
            h = rms_norm(x, W[p + "ffn_norm.weight"], s.eps)
            m = (silu(h @ W[p + "ffn_gate.weight"].T) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
            x = x + math.tanh(W[p + "cross_attn_mlp_gate"][0]) * m * seen
            continue
        h = rms_norm(x, W[p + "attn_norm.weight"], s.eps)
        q = (h @ W[p + "attn_q.weight"].T).reshape(n, s.n_head, s.head_dim)
        k = (h @ W[p + "attn_k.weight"].T).reshape(n, s.n_head_kv, s.head_dim)
        v = (h @ W[p + "attn_v.weight"].T).reshape(n, s.n_head_kv, s.head_dim)
        q, k = rope(q, pos, s.head_dim, s.rope_base, neox=False), rope(k, pos, s.head_dim, s.rope_base, neox=False)
        group = s.n_head // s.n_head_kv
        att = np.empty((n, s.n_head, s.head_dim))
        for hh in range(s.n_head):
            sc = q[:, hh] @ k[:, hh // group].T / math.sqrt(s.head_dim)
            att[:, hh] = softmax(np.where(pos[:, None] >= pos[None, :], sc, -np.inf)) @ v[:, hh // group]
        x = x + att.reshape(n, -1) @ W[p + "attn_output.weight"].T
        h = rms_norm(x, W[p + "ffn_norm.weight"], s.eps)
        x = x + (silu(h @ W[p + "ffn_gate.weight"].T) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
    return np.asarray(rms_norm(x, W["output_norm.weight"], s.eps) @ W["output.weight"].T)
