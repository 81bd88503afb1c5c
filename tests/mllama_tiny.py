"""A tiny random-weight mllama GGUF in Ollama's single-file layout (keys and tensor names as Ollama's
convert_mllama.go writes them): llama text layers, cross-attention layers at `CROSS`, the vision tower under `v.*`
(gates stored through tanh, as the converter stores them) and the projector under `mm.0`.

As in the real model, token_embd has one row more than the output (the image token, last in the vocabulary).
Nothing here imports the project's `models` or `ml` packages.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tiny_gguf import TinySpec, make_weights, write_gguf

CROSS = (1, 3)  # the last layer is one: its output-row selection is exercised too
TEXT = TinySpec(arch="mllama", n_layer=4, tied=False, image_tokens=True, q_gain=2.0)
N_TEXT_VOCAB = TEXT.n_vocab - 1  # output rows; the image token is the last embedding row
IMAGE_TOKEN = TEXT.n_vocab - 1


@dataclass(frozen=True)
class MllamaVisionSpec:
    n_embd: int = 16
    n_head: int = 2
    n_layer: int = 3
    n_global_layer: int = 2
    n_ff: int = 24
    image_size: int = 8
    patch_size: int = 4
    max_tiles: int = 4
    intermediate: tuple[int, ...] = (0, 2)
    eps: float = 1e-5

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_positions(self) -> int:
        return self.n_patches + 1

    @property
    def n_ratios(self) -> int:
        return sum(1 for a in range(1, self.max_tiles + 1) for b in range(1, self.max_tiles + 1)
                   if a * b <= self.max_tiles)

    def kv(self) -> dict[str, Any]:
        v = "mllama.vision."
        return {v + "block_count": self.n_layer, v + "global.block_count": self.n_global_layer,
                v + "embedding_length": self.n_embd, v + "feed_forward_length": self.n_ff,
                v + "attention.head_count": self.n_head, v + "attention.layer_norm_epsilon": self.eps,
                v + "image_size": self.image_size, v + "patch_size": self.patch_size,
                v + "max_num_tiles": self.max_tiles, v + "num_channels": 3,
                v + "intermediate_layers_indices": list(self.intermediate)}


VS = MllamaVisionSpec()


def make_text_weights(spec: TinySpec = TEXT, seed: int = 0) -> dict[str, np.ndarray]:
    """Llama layers, with the layers in CROSS replaced by cross-attention layers (numpy order)."""
    w = make_weights(spec, seed)
    rng = np.random.default_rng(seed + 100)
    s = spec

    def mat(n_in: int, n_out: int, gain: float = 1.0) -> np.ndarray:
        return np.asarray(rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in), dtype=np.float32)

    for il in CROSS:
        p = f"blk.{il}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            del w[p + name + ".weight"]
        q_out, kv_out = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        w[p + "cross_attn_q_proj.weight"] = mat(s.n_embd, q_out, 2.0)
        w[p + "cross_attn_k_proj.weight"] = mat(s.n_embd, kv_out)
        w[p + "cross_attn_v_proj.weight"] = mat(s.n_embd, kv_out)
        w[p + "cross_attn_o_proj.weight"] = mat(q_out, s.n_embd)
        w[p + "cross_attn_q_norm.weight"] = (1.0 + 0.2 * rng.standard_normal(s.head_dim)).astype(np.float32)
        w[p + "cross_attn_k_norm.weight"] = (1.0 + 0.2 * rng.standard_normal(s.head_dim)).astype(np.float32)
        # raw gates (the text side applies tanh); large enough that the image moves the logits clearly
        w[p + "cross_attn_attn_gate"] = np.array([0.9 if il == CROSS[0] else -0.7], dtype=np.float32)
        w[p + "cross_attn_mlp_gate"] = np.array([0.6 if il == CROSS[0] else 1.1], dtype=np.float32)
    w["output.weight"] = w["output.weight"][:N_TEXT_VOCAB]
    return w


def make_vision_weights(vs: MllamaVisionSpec = VS, n_text_embd: int = TEXT.n_embd,
                        seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, ps, t = vs.n_embd, vs.patch_size, vs.max_tiles

    def mat(n_in: int, n_out: int, gain: float = 1.0) -> np.ndarray:
        return np.asarray(rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in), dtype=np.float32)

    def vec(n: int, scale: float = 0.3, mean: float = 0.0) -> np.ndarray:
        return (mean + scale * rng.standard_normal(n)).astype(np.float32)

    def gate(value: float) -> np.ndarray:
        return np.array([value], dtype=np.float32)

    w: dict[str, np.ndarray] = {
        "v.patch_embd.weight": (rng.standard_normal((d, 3, ps, ps)) / np.sqrt(3 * ps * ps)).astype(np.float32),
        "v.class_embd": vec(d, 0.5),
        "v.pre_tile_position_embd.weight": (0.5 * rng.standard_normal((vs.n_ratios + 1, t * d))).astype(np.float32),
        "v.pre_tile_position_embd.gate": gate(0.8),
        "v.position_embd.weight": (0.5 * rng.standard_normal((vs.n_positions, d))).astype(np.float32),
        "v.position_embd.gate": gate(0.7),  # 1 - tanh(g), as the converter stores it
        "v.tile_position_embd.weight": (0.5 * rng.standard_normal((vs.n_ratios + 1, t * vs.n_positions * d))
                                        ).astype(np.float32),
        "v.tile_position_embd.gate": gate(0.6),
        "v.post_tile_position_embd.weight": (0.5 * rng.standard_normal((vs.n_ratios + 1, t * d))).astype(np.float32),
        "v.post_tile_position_embd.gate": gate(-0.5),
    }
    for name in ("pre_ln", "post_ln"):
        w[f"v.{name}.weight"], w[f"v.{name}.bias"] = vec(d, 0.2, 1.0), vec(d, 0.2)
    layers = [f"v.blk.{i}." for i in range(vs.n_layer)] + [f"v.global.blk.{i}." for i in range(vs.n_global_layer)]
    for p in layers:
        for norm in ("attn_norm", "ffn_norm"):
            w[p + norm + ".weight"], w[p + norm + ".bias"] = vec(d, 0.2, 1.0), vec(d, 0.2)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w[p + name + ".weight"] = mat(d, d, 2.0 if name == "attn_q" else 1.0)
        w[p + "ffn_up.weight"], w[p + "ffn_up.bias"] = mat(d, vs.n_ff), vec(vs.n_ff)
        w[p + "ffn_down.weight"], w[p + "ffn_down.bias"] = mat(vs.n_ff, d), vec(d)
        if p.startswith("v.global."):
            w[p + "attn_gate"], w[p + "ffn_gate"] = gate(0.8), gate(-0.6)  # tanh(g) as stored
    n_out = (1 + len(vs.intermediate)) * d
    w["mm.0.weight"], w["mm.0.bias"] = mat(n_out, n_text_embd, 2.0), vec(n_text_embd)
    return w


def write_mllama(path: Path, *, vision: bool = True, seed: int = 0, **edits: Any) -> dict[str, np.ndarray]:
    """Write the tiny mllama (text only when `vision` is False); returns its tensors (numpy order)."""
    kv = {"mllama.attention.cross_attention_layers": list(CROSS), "mllama.vocab_size": N_TEXT_VOCAB}
    if vision:
        kv.update(VS.kv())
    kv.update(edits.pop("kv", {}))
    tensors = make_text_weights(TEXT, seed)
    if vision:
        tensors.update(make_vision_weights(VS, TEXT.n_embd, seed + 1))
    return write_gguf(path, TEXT.with_(extra_kv=kv, write_vocab_size=False), tensors, **edits)
