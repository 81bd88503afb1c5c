"""olmo2 (OLMo 2, and OLMo 3 with sliding windows): no pre-norms; RMSNorm after attention and after the FFN
(before each residual add), and RMSNorm over the whole q and k projections before they are split into heads;
NeoX RoPE; llama.cpp olmo2.cpp."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ml.backend import Backend, Context, Tensor
from ml.module import weight
from ml.nn import RMSNorm
from models.decoder import Block, Decoder, DecoderParams
from models.registry import register


@dataclass(kw_only=True)
class Olmo2Block(Block):
    attn_norm: RMSNorm | None = weight(optional=True)  # type: ignore[assignment]
    ffn_norm: RMSNorm | None = weight(optional=True)  # type: ignore[assignment]
    attn_q_norm: RMSNorm = weight(shape=lambda p: (p.n_head * p.head_dim_k,))
    attn_k_norm: RMSNorm = weight(shape=lambda p: (p.n_head_kv * p.head_dim_k,))
    post_attention_norm: RMSNorm = weight(shape=lambda p: (p.n_embd,))
    post_ffw_norm: RMSNorm = weight(shape=lambda p: (p.n_embd,))

    def project_qkv(self, ctx: Context, h: Tensor, p: DecoderParams) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = super().project_qkv(ctx, h, p)
        return self.attn_q_norm.forward(ctx, q, p.eps), self.attn_k_norm.forward(ctx, k, p.eps), v

    def norm_heads(self, ctx: Context, q: Tensor, k: Tensor, p: DecoderParams) -> tuple[Tensor, Tensor]:
        return q, k  # normed over the whole projection already


@register("olmo2")
@dataclass(kw_only=True)
class Olmo2(Decoder):
    blk: list[Olmo2Block] = weight(count=lambda p: p.n_layer)  # type: ignore[assignment]

    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        n_layer = backend.uint("block_count")
        window = backend.uint("attention.sliding_window", 0)
        raw = backend.metadata.get(f"{backend.architecture}.attention.sliding_window_pattern", 4)
        if np.ndim(raw):  # one flag per layer
            swa = tuple(bool(window) and bool(f) for f in np.asarray(raw).reshape(-1)[:n_layer])
        else:  # llama.cpp set_swa_pattern: layer il slides iff il % n < n - 1
            n = max(int(raw), 1)
            swa = tuple(bool(window) and il % n < n - 1 for il in range(n_layer))
        # window layers use the plain base RoPE (no scaling, no YaRN), as llama.cpp's olmo2 graph does
        return DecoderParams.read(
            backend, neox=True, window=window, rope_scale_swa=1.0, rope_plain_swa=True, swa_layers=swa,
            rope_base_swa=backend.float("rope.freq_base_swa", backend.float("rope.freq_base", 10000.0)))
