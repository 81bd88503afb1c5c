"""Neural-network building blocks shared by every architecture. Each is a Module of GGUF-named tensors plus a
`forward`. Shapes in comments are ggml order (dim 0 fastest)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ml.backend import Context, Tensor
from ml.module import Module, optional


@dataclass(kw_only=True)
class Linear(Module):
    """y = W x + b. weight [n_in, n_out], x [n_in, n_tokens] -> [n_out, n_tokens]."""

    weight: Tensor
    bias: Tensor | None = optional()

    def forward(self, ctx: Context, x: Tensor) -> Tensor:
        y = self.weight.matmul(ctx, x)
        return y if self.bias is None else y.add(ctx, self.bias)


@dataclass(kw_only=True)
class Embedding(Module):
    """Row lookup. weight [n_embd, n_vocab], ids I32 [n_tokens] -> [n_embd, n_tokens] (f32)."""

    weight: Tensor

    def forward(self, ctx: Context, ids: Tensor) -> Tensor:
        return self.weight.get_rows(ctx, ids)


@dataclass(kw_only=True)
class RMSNorm(Module):
    """x / rms(x) * weight over dim 0."""

    weight: Tensor

    def forward(self, ctx: Context, x: Tensor, eps: float) -> Tensor:
        return x.rms_norm(ctx, eps).mul(ctx, self.weight)


@dataclass(kw_only=True)
class LayerNorm(Module):
    """(x - mean) / std * weight + bias over dim 0."""

    weight: Tensor
    bias: Tensor | None = optional()

    def forward(self, ctx: Context, x: Tensor, eps: float) -> Tensor:
        y = x.layer_norm(ctx, eps).mul(ctx, self.weight)
        return y if self.bias is None else y.add(ctx, self.bias)


@dataclass(kw_only=True)
class Conv2D(Module):
    """2-D convolution. weight [KW, KH, C_in, C_out], x [W, H, C_in, N] -> [OW, OH, C_out, N]."""

    weight: Tensor
    bias: Tensor | None = optional()

    def forward(self, ctx: Context, x: Tensor, s0: int, s1: int, p0: int = 0, p1: int = 0) -> Tensor:
        y = x.conv2d(ctx, self.weight, s0, s1, p0, p1)
        if self.bias is not None:
            y = y.add(ctx, self.bias.reshape(ctx, 1, 1, self.bias.shape[0]))
        return y


class KVStore(Protocol):
    """The part of a KV cache attention uses (kvcache implements it)."""

    def put(self, ctx: Context, il: int, k: Tensor, v: Tensor) -> None: ...
    def get(self, ctx: Context, il: int) -> tuple[Tensor, Tensor, Tensor | None]: ...


def attention(ctx: Context, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, *,
              softcap: float = 0.0, flash: bool = False, gemm_queries: bool = False) -> Tensor:
    """Scaled dot-product attention over cached history.

    q [head_dim, n_head, n_tokens]; k, v [head_dim, n_kv, n_head_kv] (views of the cache); mask [n_kv, n_rows]
    with n_rows >= n_tokens (0 visible, -inf hidden). Returns [head_dim_v * n_head, n_tokens].
    The unfused path is the specification: softmax(k·q * scale (+softcap) + mask) · v; `flash` uses ggml's fused
    kernel (needs an F16 mask). `gemm_queries` (many queries, as a vision encoder has) copies the permuted queries
    into a contiguous tensor: ggml's tiled F32 GEMM (llamafile's tinyBLAS) only takes a contiguous right operand,
    and the row-by-row fallback is several times slower on the n x n scores.
    """
    _, n_head, n_tokens, _ = dims(q)
    q = q.permute(ctx, 0, 2, 1, 3)  # [head_dim, n_tokens, n_head]
    if gemm_queries:
        q = q.contiguous(ctx)
    if flash:
        out = q.flash_attn(ctx, k, v, mask, scale, softcap)  # [head_dim_v, n_head, n_tokens]
        return out.reshape(ctx, dims(v)[0] * n_head, n_tokens)
    kq = k.matmul_full(ctx, q)  # [n_kv, n_tokens, n_head]
    kq = kq.softmax(ctx, mask, scale, softcap)
    v_t = v.permute(ctx, 1, 0, 2, 3).contiguous(ctx)  # [n_kv, head_dim_v, n_head_kv]
    kqv = v_t.matmul(ctx, kq)  # [head_dim_v, n_tokens, n_head]
    kqv = kqv.permute(ctx, 0, 2, 1, 3).contiguous(ctx)  # [head_dim_v, n_head, n_tokens]
    return kqv.reshape(ctx, dims(kqv)[0] * n_head, n_tokens)


# llamafile's tinyBLAS (ggml's tiled F32 GEMM on x86) needs the inner size to be a multiple of its vector width:
# 16 floats with AVX-512 (8 with AVX2); a head size that is not goes to a row-by-row fallback, ~2x slower.
GEMM_INNER_MULTIPLE = 16


def encoder_attention(ctx: Context, q: Tensor, k: Tensor, v: Tensor, n_head: int) -> Tensor:
    """Unmasked self-attention over a whole sequence, as vision encoders run it: q, k, v [n_head * head_dim, n]
    (projections of the same n tokens) -> [n_head * head_dim, n]. Built for ggml's tiled GEMM: keys and queries
    contiguous, and heads zero-padded to a multiple of GEMM_INNER_MULTIPLE (a zero column adds nothing to a
    score); the scale is the unpadded head size's."""
    width, n = dims(q)[:2]
    head_dim = width // n_head
    q = q.reshape(ctx, head_dim, n_head, n)
    # keys and values as attention() reads a cache: [head_dim, n_kv, n_head]
    k = k.reshape(ctx, head_dim, n_head, n).permute(ctx, 0, 2, 1, 3).contiguous(ctx)
    v = v.reshape(ctx, head_dim, n_head, n).permute(ctx, 0, 2, 1, 3).contiguous(ctx)
    pad = -head_dim % GEMM_INNER_MULTIPLE
    if pad:
        q, k = q.pad(ctx, pad), k.pad(ctx, pad)
    return attention(ctx, q, k, v, None, default_scale(head_dim), gemm_queries=True)


def row_slice(ctx: Context, t: Tensor, start: int, count: int) -> Tensor:
    """Rows start .. start + count of dim 0 of t [n, n_tokens], contiguous: splits a fused projection (QKV,
    gate/up)."""
    n_tokens = dims(t)[1]
    return t.view(ctx, start * t.dtype.row_bytes(1), (count, n_tokens), (t.stride(1),)).contiguous(ctx)


def dims(t: Tensor) -> tuple[int, int, int, int]:
    """The tensor's shape padded with 1s to four dimensions."""
    s = tuple(t.shape) + (1, 1, 1, 1)
    return (s[0], s[1], s[2], s[3])


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
