"""phi3 (Phi-3 / Phi-3.5 / Phi-4 mini): one fused QKV projection (`attn_qkv`, rows q | k | v; separate q/k/v also
load), one fused gate/up projection (`ffn_up`, [n_embd, 2 * n_ff], gate rows first), NeoX RoPE with LongRoPE's
per-dimension factors (`rope_factors_long` when a sequence's context exceeds rope.scaling.original_context_length,
else `rope_factors_short`) and its attention factor (`rope.scaling.attn_factor`, on every position), and an
optional sliding window on every layer (`attention.sliding_window`, as the Hugging Face model applies it;
llama.cpp currently ignores it).
"""
from __future__ import annotations

from dataclasses import dataclass

from ml.backend import Backend, Context, Tensor
from ml.errors import MissingWeight
from ml.module import weight
from ml.nn import Linear, row_slice
from models.decoder import Block, Decoder, DecoderParams
from models.registry import register


@dataclass(kw_only=True)
class Phi3Block(Block):
    attn_qkv: Linear | None = weight(optional=True, shape=lambda p: (
        p.n_embd, p.n_head * p.head_dim_k + p.n_head_kv * (p.head_dim_k + p.head_dim_v)))
    attn_q: Linear | None = weight(  # type: ignore[assignment]
        optional=True, shape=lambda p: (p.n_embd, p.n_head * p.head_dim_k))
    attn_k: Linear | None = weight(  # type: ignore[assignment]
        optional=True, shape=lambda p: (p.n_embd, p.n_head_kv * p.head_dim_k))
    attn_v: Linear | None = weight(  # type: ignore[assignment]
        optional=True, shape=lambda p: (p.n_embd, p.n_head_kv * p.head_dim_v))
    ffn_gate: Linear | None = weight(optional=True)  # type: ignore[assignment]
    ffn_up: Linear = weight(shape=lambda p: (p.n_embd, 2 * p.n_ff))

    def __post_init__(self) -> None:
        if self.attn_qkv is None and (self.attn_q is None or self.attn_k is None or self.attn_v is None):
            raise MissingWeight("phi3 needs attn_qkv or all of attn_q, attn_k, attn_v")

    def project_qkv(self, ctx: Context, h: Tensor, p: DecoderParams) -> tuple[Tensor, Tensor, Tensor]:
        if self.attn_qkv is None:
            return super().project_qkv(ctx, h, p)
        qkv = self.attn_qkv.forward(ctx, h)
        nq, nk, nv = p.n_head * p.head_dim_k, p.n_head_kv * p.head_dim_k, p.n_head_kv * p.head_dim_v
        return row_slice(ctx, qkv, 0, nq), row_slice(ctx, qkv, nq, nk), row_slice(ctx, qkv, nq + nk, nv)

    def ffn(self, ctx: Context, h: Tensor, p: DecoderParams) -> Tensor:
        gate_up = self.ffn_up.forward(ctx, h)
        gate, up = row_slice(ctx, gate_up, 0, p.n_ff), row_slice(ctx, gate_up, p.n_ff, p.n_ff)
        return self.ffn_down.forward(ctx, gate.swiglu(ctx, up))


@register("phi3")
@dataclass(kw_only=True)
class Phi3(Decoder):
    blk: list[Phi3Block] = weight(count=lambda p: p.n_layer)  # type: ignore[assignment]
    rope_factors_long: Tensor | None = weight(optional=True, shape=lambda p: (p.rope_dim // 2,))
    rope_factors_short: Tensor | None = weight(optional=True, shape=lambda p: (p.rope_dim // 2,))

    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        n_layer = backend.uint("block_count")
        window = backend.uint("attention.sliding_window", 0)
        return DecoderParams.read(backend, neox=True, window=window, swa_layers=(bool(window),) * n_layer,
                                  rope_base_swa=backend.float("rope.freq_base", 10000.0))

    def freq_factors(self) -> Tensor | None:
        if self.rope_freqs is not None:
            return self.rope_freqs
        p = self.params
        n_ctx = self.n_ctx_seq or p.n_ctx_train
        return self.rope_factors_long if n_ctx > (p.rope_scaling.n_ctx_orig or p.n_ctx_train) else \
            self.rope_factors_short
