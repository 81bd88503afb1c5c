"""The Llama 3.2 Vision (mllama) image encoder and projector, in Ollama's single-file layout: tower tensors under
`v.`, the projector under `mm.0`, hyper-parameters under `mllama.vision.*`.

Tower (Hugging Face MllamaVisionModel): an image is cut into up to `max_num_tiles` tiles of image_size pixels
(models.vision.tiles); each tile's patches (a patch_size-strided conv, no bias) get a gated per-arrangement tile
embedding (`pre_tile_position_embd`, picked by the aspect-ratio id), a class token is put in front, then gated
position embeddings (`position_embd`, and per-arrangement `tile_position_embd`), LayerNorm; the token count of a
tile is padded to a multiple of 8. A local transformer (ungated pre-norm layers, GELU MLP) runs over every tile's
tokens together, keeping its input to the layers listed in `intermediate_layers_indices`; LayerNorm; a gated
post-tile embedding; a global transformer whose layers gate attention and MLP. The output of a token is the global
state followed by the kept intermediate states, interleaved as Hugging Face stacks them (feature-major, layer
fastest), with the padding dropped. The projector (`mm.0`, a linear layer with bias) maps it into the text width.

The converter stores the gates already through tanh (and `position_embd.gate` as 1 - tanh(g)), so they multiply
as stored. Tiles beyond the image's own are zero pixels; the tower runs over all `max_num_tiles` of them (as
Hugging Face and Ollama do) and only the image's own tiles leave it. Like Ollama, the tower's attention has no
mask (Hugging Face hides padding from padding only) and uses ggml's tanh GELU (Hugging Face: erf GELU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ml.backend import Backend, Context, Tensor
from ml.errors import ShapeMismatch
from ml import module
from ml.module import Module, optional, weight
from ml.nn import Conv2D, LayerNorm, Linear, encoder_attention
from models.vision.tiles import TileSpec, aspect_ratios

# CLIP's normalisation (Hugging Face's OPENAI_CLIP_MEAN / _STD), which Llama 3.2 Vision's processor uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class MllamaVisionParams:
    n_embd: int
    n_head: int
    n_layer: int
    n_global_layer: int
    n_ff: int
    image_size: int
    patch_size: int
    max_tiles: int
    eps: float
    intermediate: tuple[int, ...]  # local layers whose input is kept
    n_text_embd: int

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_positions(self) -> int:
        """Tokens per tile: the patches and the class token."""
        return self.n_patches + 1

    @property
    def n_padded(self) -> int:
        """Tokens per tile padded to a multiple of 8 (Hugging Face's (8 - n % 8) % 8)."""
        return self.n_positions + (8 - self.n_positions % 8) % 8

    @property
    def n_ratios(self) -> int:
        return len(aspect_ratios(self.max_tiles))

    @property
    def n_out(self) -> int:
        """Width of a token leaving the tower: the global state and one state per intermediate layer."""
        return (1 + len(self.intermediate)) * self.n_embd

    def tile_spec(self) -> TileSpec:
        return TileSpec(self.image_size, self.max_tiles, CLIP_MEAN, CLIP_STD)

    @staticmethod
    def read(b: Backend, n_text_embd: int) -> MllamaVisionParams | None:
        """From `mllama.vision.*`; None when the file has no vision tower (block_count absent or 0)."""
        if b.uint("vision.block_count", 0) == 0:
            return None
        v = "vision."
        p = MllamaVisionParams(
            n_embd=b.uint(v + "embedding_length"), n_head=b.uint(v + "attention.head_count"),
            n_layer=b.uint(v + "block_count"), n_global_layer=b.uint(v + "global.block_count"),
            n_ff=b.uint(v + "feed_forward_length"), image_size=b.uint(v + "image_size"),
            patch_size=b.uint(v + "patch_size"), max_tiles=b.uint(v + "max_num_tiles", 4),
            eps=b.float(v + "attention.layer_norm_epsilon", 1e-5),
            intermediate=tuple(int(i) for i in b.ints(v + "intermediate_layers_indices"))
            if f"{b.architecture}.{v}intermediate_layers_indices" in b.metadata else (),
            n_text_embd=n_text_embd)
        channels = b.uint(v + "num_channels", 3)
        p.check(channels)
        return p

    def check(self, channels: int = 3) -> None:
        problems = []
        if min(self.n_embd, self.n_head, self.n_layer, self.n_global_layer, self.n_ff, self.patch_size,
               self.max_tiles) <= 0:
            problems.append("a zero width, head count, depth, patch size or tile count")
        elif self.n_embd % self.n_head:
            problems.append(f"embedding_length {self.n_embd} is not a multiple of head_count {self.n_head}")
        elif self.image_size <= 0 or self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.max_tiles > 16 or self.image_size > 4096:  # a request's tiles are max_tiles * 3 * image_size^2 floats
            problems.append(f"max_num_tiles {self.max_tiles} or image_size {self.image_size} (at most 16 and 4096)")
        if any(not 0 <= i < self.n_layer for i in self.intermediate) or len(set(self.intermediate)) != len(
                self.intermediate):
            problems.append(f"intermediate_layers_indices {list(self.intermediate)} for {self.n_layer} layers")
        if channels != 3:
            problems.append(f"num_channels {channels} (images are RGB)")
        if not (math.isfinite(self.eps) and 0 < self.eps < 1):
            problems.append(f"layer_norm_epsilon {self.eps}")
        if problems:
            raise ValueError("invalid mllama vision hyper-parameters: " + "; ".join(problems))


def _v(p: Any) -> MllamaVisionParams:
    vision = getattr(p, "vision", None)
    if vision is None:
        raise ShapeMismatch("the file has vision tensors (v.*) but no mllama.vision.* hyper-parameters")
    assert isinstance(vision, MllamaVisionParams)
    return vision


def _d(p: Any) -> int:
    return _v(p).n_embd


@dataclass(kw_only=True)
class GatedEmbedding(Module):
    """`<name>.weight` and its gate `<name>.gate` (one value, stored through tanh)."""

    weight: Tensor
    gate: Tensor = module.weight(shape=lambda p: (1,))  # (`weight` is the field above in this body)

    def gated(self, ctx: Context, ids: Tensor | None) -> Tensor:
        rows = self.weight if ids is None else self.weight.get_rows(ctx, ids)
        return rows.mul(ctx, self.gate)


@dataclass(kw_only=True)
class VisionLayer(Module):
    """A local layer: pre-norm attention (no biases needed) and a GELU MLP, ungated."""

    attn_norm: LayerNorm = weight(shape=lambda p: (_d(p),))
    attn_q: Linear = weight(shape=lambda p: (_d(p), _d(p)))
    attn_k: Linear = weight(shape=lambda p: (_d(p), _d(p)))
    attn_v: Linear = weight(shape=lambda p: (_d(p), _d(p)))
    attn_output: Linear = weight(shape=lambda p: (_d(p), _d(p)))
    attn_gate: Tensor | None = optional(shape=lambda p: (1,))
    ffn_norm: LayerNorm = weight(shape=lambda p: (_d(p),))
    ffn_up: Linear = weight(shape=lambda p: (_d(p), _v(p).n_ff))
    ffn_down: Linear = weight(shape=lambda p: (_v(p).n_ff, _d(p)))
    ffn_gate: Tensor | None = optional(shape=lambda p: (1,))

    def forward(self, ctx: Context, x: Tensor, p: MllamaVisionParams) -> Tensor:
        h = self.attn_norm.forward(ctx, x, p.eps)
        a = encoder_attention(ctx, self.attn_q.forward(ctx, h), self.attn_k.forward(ctx, h),
                              self.attn_v.forward(ctx, h), p.n_head)
        a = self.attn_output.forward(ctx, a)
        if self.attn_gate is not None:
            a = a.mul(ctx, self.attn_gate)
        x = x.add(ctx, a)
        h = self.ffn_down.forward(ctx, self.ffn_up.forward(ctx, self.ffn_norm.forward(ctx, x, p.eps)).gelu(ctx))
        if self.ffn_gate is not None:
            h = h.mul(ctx, self.ffn_gate)
        return x.add(ctx, h)


@dataclass(kw_only=True)
class GlobalVisionLayer(VisionLayer):
    """A global layer: the same, with both gates required."""

    attn_gate: Tensor = weight(shape=lambda p: (1,))
    ffn_gate: Tensor = weight(shape=lambda p: (1,))


@dataclass(kw_only=True)
class MllamaVisionTower(Module):
    """`v.*`: tiles [S, S, 3, max_tiles] (ggml order) and the aspect-ratio id -> tokens [n_out, n_positions *
    n_tiles] of the image's own tiles (tile-major, class token first in each tile)."""

    patch_embd: Conv2D = weight(shape=lambda p: (_v(p).patch_size, _v(p).patch_size, 3, _d(p)))
    class_embd: Tensor = weight(shape=lambda p: (_d(p),))
    pre_tile_position_embd: GatedEmbedding = weight(
        shape=lambda p: (_v(p).max_tiles * _d(p), _v(p).n_ratios + 1))
    position_embd: GatedEmbedding = weight(shape=lambda p: (_d(p), _v(p).n_positions))
    tile_position_embd: GatedEmbedding = weight(
        shape=lambda p: (_v(p).max_tiles * _v(p).n_positions * _d(p), _v(p).n_ratios + 1))
    pre_ln: LayerNorm = weight(shape=lambda p: (_d(p),))
    blk: list[VisionLayer] = weight(count=lambda p: _v(p).n_layer)
    post_ln: LayerNorm = weight(shape=lambda p: (_d(p),))
    post_tile_position_embd: GatedEmbedding = weight(
        shape=lambda p: (_v(p).max_tiles * _d(p), _v(p).n_ratios + 1))
    global_blk: list[GlobalVisionLayer] = weight(name="global.blk", count=lambda p: _v(p).n_global_layer)

    def forward(self, ctx: Context, tiles: Tensor, ratio: Tensor, n_tiles: int, p: MllamaVisionParams) -> Tensor:
        d, t, ps = p.n_embd, p.max_tiles, p.patch_size
        x = self.patch_embd.forward(ctx, tiles, ps, ps)  # [side, side, d, t]
        x = x.reshape(ctx, p.n_patches, d, t).permute(ctx, 1, 0, 2, 3).contiguous(ctx)  # [d, n_patches, t]
        x = x.add(ctx, self.pre_tile_position_embd.gated(ctx, ratio).reshape(ctx, d, 1, t))
        first = x.view(ctx, 0, (d, 1, t), (x.stride(1), x.stride(2)))  # only its shape is used
        x = self.class_embd.reshape(ctx, d, 1, 1).repeat(ctx, first).concat(ctx, x, 1)  # [d, n_positions, t]
        x = x.add(ctx, self.position_embd.gated(ctx, None))
        x = x.add(ctx, self.tile_position_embd.gated(ctx, ratio).reshape(ctx, d, p.n_positions, t))
        x = self.pre_ln.forward(ctx, x, p.eps)
        x = x.pad(ctx, 0, p.n_padded - p.n_positions).reshape(ctx, d, p.n_padded * t)
        kept: list[Tensor] = []
        for il, layer in enumerate(self.blk):
            if il in p.intermediate:
                kept.append(x.reshape(ctx, 1, d, p.n_padded * t))
            x = layer.forward(ctx, x, p)
        x = self.post_ln.forward(ctx, x, p.eps).reshape(ctx, d, p.n_padded, t)
        x = x.add(ctx, self.post_tile_position_embd.gated(ctx, ratio).reshape(ctx, d, 1, t))
        x = x.reshape(ctx, d, p.n_padded * t)
        for layer in self.global_blk:
            x = layer.forward(ctx, x, p)
        # Hugging Face stacks the kept states on a last axis: a token's features run (dim 0: all layers, dim 1: ...)
        kept_order = [kept[sorted(p.intermediate).index(i)] for i in p.intermediate]
        for extra in _stacked(ctx, kept_order, d, p.n_padded * t):
            x = x.concat(ctx, extra, 0)
        x = x.reshape(ctx, p.n_out, p.n_padded, t)
        own = x.view(ctx, 0, (p.n_out, p.n_positions, n_tiles), (x.stride(1), x.stride(2))).contiguous(ctx)
        return own.reshape(ctx, p.n_out, p.n_positions * n_tiles)


def _stacked(ctx: Context, kept: list[Tensor], d: int, n: int) -> list[Tensor]:
    """The kept states [1, d, n] each, interleaved into one [len(kept) * d, n] (none when nothing is kept)."""
    if not kept:
        return []
    s = kept[0]
    for k in kept[1:]:
        s = s.concat(ctx, k, 0)  # [k, d, n]
    return [s.reshape(ctx, len(kept) * d, n)]


def tiles_input(pixels: npt.NDArray[np.float32], max_tiles: int) -> npt.NDArray[np.float32]:
    """The image's tiles (n_tiles, 3, S, S) padded with zero tiles to max_tiles (numpy order of the ggml
    [S, S, 3, max_tiles] input)."""
    n, c, h, w = pixels.shape
    out = np.zeros((max_tiles, c, h, w), dtype=np.float32)
    out[:n] = pixels
    return out
