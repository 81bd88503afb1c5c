"""nomic-bert (nomic-embed-text v1 / v1.5): the BERT encoder with a fused QKV projection (`attn_qkv`), NeoX RoPE on
q and k instead of position embeddings, a SwiGLU FFN without biases, optional token types, and mean pooling from
the metadata (llama.cpp bert.cpp's nomic-bert path)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ml.backend import Backend, Context, Tensor
from ml.errors import MissingWeight, ModelLoadError
from ml.module import weight
from ml.nn import Linear, row_slice
from models.bert import Bert, BertBlock, BertParams
from models.registry import register


@dataclass(kw_only=True)
class NomicBertBlock(BertBlock):
    attn_qkv: Linear | None = weight(optional=True, shape=lambda p: (p.n_embd, 3 * p.n_embd))
    attn_q: Linear | None = weight(optional=True, shape=lambda p: (p.n_embd, p.n_embd))  # type: ignore[assignment]
    attn_k: Linear | None = weight(optional=True, shape=lambda p: (p.n_embd, p.n_embd))  # type: ignore[assignment]
    attn_v: Linear | None = weight(optional=True, shape=lambda p: (p.n_embd, p.n_embd))  # type: ignore[assignment]
    ffn_gate: Linear = weight(shape=lambda p: (p.n_embd, p.n_ff))

    def __post_init__(self) -> None:
        if self.attn_qkv is None and (self.attn_q is None or self.attn_k is None or self.attn_v is None):
            raise MissingWeight("nomic-bert needs attn_qkv or all of attn_q, attn_k, attn_v")

    def project_qkv(self, ctx: Context, x: Tensor, p: BertParams) -> tuple[Tensor, Tensor, Tensor]:
        if self.attn_qkv is None:
            return super().project_qkv(ctx, x, p)
        qkv = self.attn_qkv.forward(ctx, x)
        return (row_slice(ctx, qkv, 0, p.n_embd), row_slice(ctx, qkv, p.n_embd, p.n_embd),
                row_slice(ctx, qkv, 2 * p.n_embd, p.n_embd))

    def ffn(self, ctx: Context, x: Tensor, p: BertParams) -> Tensor:
        return self.ffn_down.forward(ctx, self.ffn_gate.forward(ctx, x).swiglu(ctx, self.ffn_up.forward(ctx, x)))


@register("nomic-bert")
@dataclass(kw_only=True)
class NomicBert(Bert):
    token_types: Tensor | None = weight(  # type: ignore[assignment]
        optional=True, shape=lambda p: (p.n_embd, p.n_token_types))
    position_embd: Tensor | None = weight(optional=True)  # type: ignore[assignment]
    blk: list[NomicBertBlock] = weight(count=lambda p: p.n_layer)  # type: ignore[assignment]

    @classmethod
    def read_params(cls, b: Backend) -> BertParams:
        p = Bert.read_params(b)
        rope_dim, base = b.uint("rope.dimension_count", p.head_dim), b.float("rope.freq_base", 10000.0)
        if rope_dim <= 0 or rope_dim % 2 or rope_dim > p.head_dim:  # ggml would abort the process
            raise ModelLoadError(f"invalid hyper-parameter {b.architecture}.rope.dimension_count = {rope_dim}: "
                                 f"must be even, positive and at most the head size {p.head_dim}")
        if not (math.isfinite(base) and base > 0.0):
            raise ModelLoadError(f"invalid hyper-parameter {b.architecture}.rope.freq_base = {base}: must be a "
                                 f"finite positive number")
        return replace(p, rope_dim=rope_dim, rope_base=base)
