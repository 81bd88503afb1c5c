"""The SigLIP vision tower and Gemma 3's multimodal projector, in either layout: Ollama's single file (the tower's
tensors under `v.`, the projector's under `mm.`, hyper-parameters under `<arch>.vision.*`) or llama.cpp's
projector file given with `--mmproj` (`general.architecture = clip`, keys under `clip.*`, the same prefixes with
clip.cpp's tensor names: `v.patch_embd`, `v.blk.N.ln1`, `attn_out`, `ffn_up`, `mm.input_projection`, ...). The
tensors are the same in both (convert_hf_to_gguf and Ollama's converter store every matrix, the projection too, in
the same orientation), so each field names its alternate and one model loads either.

Tower (SigLIP, Zhai et al. 2023; HF SiglipVisionModel): a patch_size-strided conv turns the image into patches,
learned position embeddings are added, pre-norm blocks (LayerNorm with bias, bidirectional multi-head attention,
tanh-GELU MLP) follow, then a final LayerNorm. Projector (HF Gemma3MultiModalProjector): the patch grid is
average-pooled to tokens_per_image tokens, RMS-normed and projected into the text embedding width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml.backend import Backend, Context, Tensor
from ml.errors import ShapeMismatch
from ml.module import Module, weight
from ml.nn import Conv2D, Embedding, LayerNorm, Linear, RMSNorm, encoder_attention



@dataclass(frozen=True)
class VisionParams:
    n_embd: int
    n_head: int
    n_layer: int
    n_ff: int
    image_size: int
    patch_size: int
    n_channels: int
    eps: float
    tokens_per_image: int
    n_text_embd: int
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def pool_kernel(self) -> int:
        """The average-pooling kernel (and stride) that leaves tokens_per_image tokens (64 / 16 = 4 in Gemma 3)."""
        return self.patches_per_side // math.isqrt(self.tokens_per_image)

    @staticmethod
    def read(b: Backend, n_text_embd: int) -> VisionParams | None:
        """From `<arch>.vision.*` and `<arch>.mm_tokens_per_image` (Ollama's names), or from a projector file's
        `clip.*` keys; None when there is no vision tower."""
        if "clip.has_vision_encoder" in b.metadata or "clip.projector_type" in b.metadata:
            return VisionParams._read_clip(b, n_text_embd)
        arch = b.architecture
        if f"{arch}.vision.block_count" not in b.metadata:
            return None
        v = "vision."
        p = VisionParams(
            n_embd=b.uint(v + "embedding_length"), n_head=b.uint(v + "attention.head_count"),
            n_layer=b.uint(v + "block_count"), n_ff=b.uint(v + "feed_forward_length"),
            image_size=b.uint(v + "image_size"), patch_size=b.uint(v + "patch_size"),
            n_channels=b.uint(v + "num_channels", 3), eps=b.float(v + "attention.layer_norm_epsilon", 1e-6),
            tokens_per_image=b.uint("mm_tokens_per_image", 256), n_text_embd=n_text_embd)
        p.check()
        return p

    @staticmethod
    def _read_clip(b: Backend, n_text_embd: int) -> VisionParams:
        """llama.cpp's projector keys (clip-impl.h). The pooling is `clip.vision.projector.scale_factor` patches
        per side (4 unless written, as clip.cpp assumes for Gemma 3), so tokens_per_image follows from it."""
        # a file with several encoders (vision + audio) names the vision one's type under clip.vision.
        kind = b.metadata.get("clip.vision.projector_type", b.metadata.get("clip.projector_type"))
        if kind != "gemma3":
            raise ValueError(f"projector type {kind!r} is not supported with a gemma3 model (expected 'gemma3')")
        if not b.bool("clip.has_vision_encoder", False):
            raise ValueError("the projector file has no vision encoder (clip.has_vision_encoder is not true)")
        v = "clip.vision."
        width = b.uint(v + "projection_dim", n_text_embd)
        if width != n_text_embd:
            raise ValueError(f"the projector's output width ({v}projection_dim {width}) does not match the "
                             f"model's embedding_length {n_text_embd}")
        image_size, patch_size = b.uint(v + "image_size"), b.uint(v + "patch_size")
        scale = b.uint(v + "projector.scale_factor", 4)
        per_side = image_size // patch_size if patch_size else 0
        if not scale or per_side % scale:
            raise ValueError(f"projector.scale_factor {scale} does not divide the {per_side} patches per side")
        side = per_side // scale
        mean, std = b.floats(v + "image_mean", (0.5,) * 3), b.floats(v + "image_std", (0.5,) * 3)
        if len(mean) != 3 or len(std) != 3 or not all(float(s) > 0 for s in std):
            raise ValueError(f"invalid image_mean {mean.tolist()} / image_std {std.tolist()}")
        p = VisionParams(
            n_embd=b.uint(v + "embedding_length"), n_head=b.uint(v + "attention.head_count"),
            n_layer=b.uint(v + "block_count"), n_ff=b.uint(v + "feed_forward_length"),
            image_size=image_size, patch_size=patch_size, n_channels=3,
            eps=b.float(v + "attention.layer_norm_epsilon", 1e-6), tokens_per_image=side * side,
            n_text_embd=n_text_embd, image_mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            image_std=(float(std[0]), float(std[1]), float(std[2])))
        p.check()
        return p

    def check(self) -> None:
        side = math.isqrt(self.tokens_per_image)
        problems = []
        if min(self.n_embd, self.n_head, self.n_layer, self.n_ff, self.patch_size, self.n_channels) <= 0:
            problems.append("a zero width, head count, depth or patch size")
        elif self.n_embd % self.n_head:
            problems.append(f"embedding_length {self.n_embd} is not a multiple of head_count {self.n_head}")
        elif self.image_size % self.patch_size or self.image_size <= 0:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        elif side * side != self.tokens_per_image or side == 0 or self.patches_per_side % side:
            problems.append(f"{self.tokens_per_image} tokens per image do not tile {self.patches_per_side}^2 "
                            "patches")
        if self.n_channels != 3:
            problems.append(f"num_channels {self.n_channels} (images are RGB)")
        if not (math.isfinite(self.eps) and self.eps > 0):
            problems.append(f"layer_norm_epsilon {self.eps}")
        if problems:
            raise ValueError("invalid vision hyper-parameters: " + "; ".join(problems))


def _v(p: Any) -> VisionParams:
    """The vision parameters of the model's params (shape functions); a tower without its keys is an error."""
    vision = getattr(p, "vision", None)
    if vision is None:
        raise ShapeMismatch("the file has vision tensors (v.*) but no vision.* hyper-parameters")
    assert isinstance(vision, VisionParams)
    return vision


@dataclass(kw_only=True)
class VisionBlock(Module):
    """Field names are Ollama's; the alternates are clip.cpp's (whose MLP sits directly in the block)."""

    layer_norm1: LayerNorm = weight(alt="ln1", shape=lambda p: (_v(p).n_embd,))
    attn_q: Linear = weight(shape=lambda p: (_v(p).n_embd, _v(p).n_embd))
    attn_k: Linear = weight(shape=lambda p: (_v(p).n_embd, _v(p).n_embd))
    attn_v: Linear = weight(shape=lambda p: (_v(p).n_embd, _v(p).n_embd))
    attn_output: Linear = weight(alt="attn_out", shape=lambda p: (_v(p).n_embd, _v(p).n_embd))
    layer_norm2: LayerNorm = weight(alt="ln2", shape=lambda p: (_v(p).n_embd,))
    fc1: Linear = weight(name="mlp.fc1", alt="ffn_up", shape=lambda p: (_v(p).n_embd, _v(p).n_ff))
    fc2: Linear = weight(name="mlp.fc2", alt="ffn_down", shape=lambda p: (_v(p).n_ff, _v(p).n_embd))

    def forward(self, ctx: Context, x: Tensor, p: VisionParams) -> Tensor:
        h = self.layer_norm1.forward(ctx, x, p.eps)
        a = encoder_attention(ctx, self.attn_q.forward(ctx, h), self.attn_k.forward(ctx, h),
                              self.attn_v.forward(ctx, h), p.n_head)
        x = x.add(ctx, self.attn_output.forward(ctx, a))  # every patch sees every patch: no mask
        h = self.layer_norm2.forward(ctx, x, p.eps)
        return x.add(ctx, self.fc2.forward(ctx, self.fc1.forward(ctx, h).gelu(ctx)))


@dataclass(kw_only=True)
class VisionTower(Module):
    """`v.*`: pixels [W, H, C] -> patch states [n_embd, n_patches] (patches in row-major order)."""

    patch_embedding: Conv2D = weight(
        alt="patch_embd", shape=lambda p: (_v(p).patch_size, _v(p).patch_size, _v(p).n_channels, _v(p).n_embd))
    position_embedding: Embedding = weight(alt="position_embd", shape=lambda p: (_v(p).n_embd, _v(p).n_patches))
    blk: list[VisionBlock] = weight(count=lambda p: _v(p).n_layer)
    post_layernorm: LayerNorm = weight(alt="post_ln", shape=lambda p: (_v(p).n_embd,))

    def forward(self, ctx: Context, pixels: Tensor, p: VisionParams) -> Tensor:
        ps = p.patch_size
        x = self.patch_embedding.forward(ctx, pixels, ps, ps)  # [side, side, n_embd, 1]
        x = x.reshape(ctx, p.n_patches, p.n_embd).transpose(ctx).contiguous(ctx)  # [n_embd, n_patches]
        ids = ctx.from_numpy(np.arange(p.n_patches, dtype=np.int32))
        x = x.add(ctx, self.position_embedding.forward(ctx, ids))
        for block in self.blk:
            x = block.forward(ctx, x, p)
        return self.post_layernorm.forward(ctx, x, p.eps)


@dataclass(kw_only=True)
class Gemma3Projector(Module):
    """`mm.*`: patch states -> tokens_per_image soft tokens [n_text_embd, tokens]. The projection is stored as
    Hugging Face's (vision, text) matrix, i.e. ggml [n_text, n_vision], used transposed (as Ollama does)."""

    mm_soft_emb_norm: RMSNorm = weight(alt="soft_emb_norm", shape=lambda p: (_v(p).n_embd,))
    mm_input_projection: Linear = weight(alt="input_projection", shape=lambda p: (_v(p).n_text_embd, _v(p).n_embd))

    def forward(self, ctx: Context, x: Tensor, p: VisionParams) -> Tensor:
        side, k = p.patches_per_side, p.pool_kernel
        grid = x.transpose(ctx).contiguous(ctx).reshape(ctx, side, side, p.n_embd)  # [col, row, n_embd]
        pooled = grid.pool2d(ctx, "avg", k, k, k, k)  # [side / k, side / k, n_embd]
        tokens = p.tokens_per_image
        x = pooled.reshape(ctx, tokens, p.n_embd).transpose(ctx).contiguous(ctx)  # [n_embd, tokens]
        x = self.mm_soft_emb_norm.forward(ctx, x, p.eps)
        w = self.mm_input_projection.weight.transpose(ctx).contiguous(ctx)  # [n_vision, n_text]
        return w.matmul(ctx, x)
