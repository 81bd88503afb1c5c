"""The decoder-only transformer that llama, qwen2, gemma2 and gemma3 share; architectures differ in flags
(DecoderParams) and in which optional tensors they require (Block subclasses), never in copied code.

Mirrors llama.cpp src/models/{llama,qwen2,gemma2,gemma3}.cpp: pre-norm attention with RoPE, gated FFN, optional
q/k norms and post-norms, soft-capping, sliding-window layers with their own RoPE base. A GGUF with
`<arch>.pooling_type` (an embedding model built on a decoder) also embeds: the final-normed hidden states of one
in-batch causal forward, pooled, as llama.cpp computes embeddings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kvcache.base import Cache
from kvcache.batch import BatchCache
from kvcache.causal import CausalCache
from kvcache.wrapper import WrapperCache
from ml.backend import Backend, Context, Tensor
from ml.batch import Batch
from ml.module import Module, hyper, weight
from ml.nn import Embedding, Linear, RMSNorm, attention
from models.pooling import Pooling, pool


@dataclass(frozen=True)
class DecoderParams:
    """Hyper-parameters, llama.cpp names. `swa_layers[il]` says whether layer il uses the sliding window."""

    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_layer: int
    n_ff: int
    n_vocab: int
    eps: float
    rope_dim: int
    rope_base: float
    rope_base_swa: float
    rope_scale: float = 1.0
    rope_scale_swa: float | None = None  # window layers' RoPE freq scale; None: rope_scale (llama.cpp default)
    neox: bool = False
    window: int = 0
    swa_layers: tuple[bool, ...] = ()
    attn_scale: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    embed_scale: float = 1.0
    gelu: bool = False
    n_ctx_train: int = 0
    pooling: Pooling = Pooling.NONE

    @staticmethod
    def read(b: Backend, **overrides: Any) -> DecoderParams:
        """Read the common keys (without the architecture prefix); `overrides` supply arch-specific values."""
        n_embd, n_head = b.uint("embedding_length"), b.uint("attention.head_count")
        head_dim_k = b.uint("attention.key_length", n_embd // n_head)
        n_vocab = b.uint("vocab_size", 0) or len(b.strings("tokenizer.ggml.tokens"))
        n_layer = b.uint("block_count")
        kv = b.metadata.get(f"{b.architecture}.attention.head_count_kv", n_head)
        values: dict[str, Any] = dict(
            n_embd=n_embd, n_head=n_head, n_head_kv=int(np.max(kv)) if np.ndim(kv) else int(kv),
            head_dim_k=head_dim_k, head_dim_v=b.uint("attention.value_length", head_dim_k), n_layer=n_layer,
            n_ff=b.uint("feed_forward_length"), n_vocab=n_vocab, eps=b.float("attention.layer_norm_rms_epsilon"),
            rope_dim=b.uint("rope.dimension_count", head_dim_k), rope_base=b.float("rope.freq_base", 10000.0),
            rope_base_swa=b.float("rope.freq_base_swa", b.float("rope.local.freq_base", 10000.0)),
            rope_scale=1.0 / b.float("rope.scaling.factor", 1.0) if b.float("rope.scaling.factor", 0.0) else 1.0,
            n_ctx_train=b.uint("context_length", 0), swa_layers=(False,) * n_layer, pooling=Pooling.read(b))
        values.update(overrides)
        return DecoderParams(**values)

    def base_for(self, il: int) -> float:
        return self.rope_base_swa if self.swa_layers[il] else self.rope_base

    def scale_for(self, il: int) -> float:
        if self.swa_layers[il] and self.rope_scale_swa is not None:
            return self.rope_scale_swa
        return self.rope_scale


@dataclass(kw_only=True)
class Block(Module):
    attn_norm: RMSNorm = weight(shape=lambda p: (p.n_embd,))
    attn_q: Linear = weight(shape=lambda p: (p.n_embd, p.n_head * p.head_dim_k))
    attn_k: Linear = weight(shape=lambda p: (p.n_embd, p.n_head_kv * p.head_dim_k))
    attn_v: Linear = weight(shape=lambda p: (p.n_embd, p.n_head_kv * p.head_dim_v))
    attn_output: Linear = weight(shape=lambda p: (p.n_head * p.head_dim_v, p.n_embd))
    attn_q_norm: RMSNorm | None = weight(optional=True, shape=lambda p: (p.head_dim_k,))
    attn_k_norm: RMSNorm | None = weight(optional=True, shape=lambda p: (p.head_dim_k,))
    post_attention_norm: RMSNorm | None = weight(optional=True, shape=lambda p: (p.n_embd,))
    ffn_norm: RMSNorm = weight(shape=lambda p: (p.n_embd,))
    ffn_gate: Linear = weight(shape=lambda p: (p.n_embd, p.n_ff))
    ffn_up: Linear = weight(shape=lambda p: (p.n_embd, p.n_ff))
    ffn_down: Linear = weight(shape=lambda p: (p.n_ff, p.n_embd))
    post_ffw_norm: RMSNorm | None = weight(optional=True, shape=lambda p: (p.n_embd,))

    def forward(self, ctx: Context, x: Tensor, positions: Tensor, outputs: Tensor | None, cache: Cache,
                il: int, p: DecoderParams, rope_freqs: Tensor | None, flash: bool) -> Tensor:
        n = _n_tokens(x)
        h = self.attn_norm.forward(ctx, x, p.eps)
        q = self.attn_q.forward(ctx, h).reshape(ctx, p.head_dim_k, p.n_head, n)  # [head_dim, n_head, n]
        k = self.attn_k.forward(ctx, h).reshape(ctx, p.head_dim_k, p.n_head_kv, n)
        v = self.attn_v.forward(ctx, h).reshape(ctx, p.head_dim_v, p.n_head_kv, n)
        if self.attn_q_norm is not None:
            q = self.attn_q_norm.forward(ctx, q, p.eps)
        if self.attn_k_norm is not None:
            k = self.attn_k_norm.forward(ctx, k, p.eps)
        q = rope(ctx, q, positions, il, p, rope_freqs)
        k = rope(ctx, k, positions, il, p, rope_freqs)
        cache.put(ctx, il, k, v)
        keys, values, mask = cache.get(ctx, il)
        a = attention(ctx, q, keys, values, mask, p.attn_scale or 1.0 / math.sqrt(p.head_dim_k),
                      softcap=p.attn_softcap, flash=flash)  # [head_dim_v * n_head, n]
        a = self.attn_output.forward(ctx, a)
        if outputs is not None:  # last layer: only the rows whose logits are wanted go on
            a, x = a.get_rows(ctx, outputs), x.get_rows(ctx, outputs)
        if self.post_attention_norm is not None:
            a = self.post_attention_norm.forward(ctx, a, p.eps)
        x = x.add(ctx, a)
        h = self.ffn_norm.forward(ctx, x, p.eps)
        gate, up = self.ffn_gate.forward(ctx, h), self.ffn_up.forward(ctx, h)
        h = self.ffn_down.forward(ctx, gate.geglu(ctx, up) if p.gelu else gate.swiglu(ctx, up))
        if self.post_ffw_norm is not None:
            h = self.post_ffw_norm.forward(ctx, h, p.eps)
        return x.add(ctx, h)


def rope(ctx: Context, t: Tensor, positions: Tensor, il: int, p: DecoderParams, freqs: Tensor | None) -> Tensor:
    """RoPE with layer il's settings; the cache's shift callback uses the same function."""
    return t.rope(ctx, positions, p.rope_dim, p.base_for(il), neox=p.neox, freq_factors=freqs,
                  freq_scale=p.scale_for(il), n_ctx_orig=p.n_ctx_train)


@dataclass(kw_only=True)
class Decoder(Module):
    """token_embd -> blocks -> output_norm -> output (tied to token_embd when absent)."""

    params: DecoderParams = hyper()
    token_embd: Embedding = weight(shape=lambda p: (p.n_embd, p.n_vocab))
    rope_freqs: Tensor | None = weight(optional=True, shape=lambda p: (p.rope_dim // 2,))
    blk: list[Block] = weight(count=lambda p: p.n_layer)
    output_norm: RMSNorm = weight(shape=lambda p: (p.n_embd,))
    output: Linear = weight(alt="token_embd", shape=lambda p: (p.n_embd, p.n_vocab))
    flash: bool = field(default=False, init=False)

    block_class: ClassVar[type[Block]] = Block
    reusable_graphs: ClassVar[bool] = True  # the graph depends on the batch's shape and the cache layout only

    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        return DecoderParams.read(backend)

    def forward(self, ctx: Context, batch: Batch, cache: Cache) -> Tensor:
        """Logits [n_vocab, n_outputs] for batch.outputs, in that order."""
        p = self.params
        x = self.hidden(ctx, batch, cache, ctx.from_numpy(batch.outputs))
        logits = self.output.forward(ctx, x)
        if p.final_softcap:
            logits = logits.scale(ctx, 1.0 / p.final_softcap).tanh(ctx).scale(ctx, p.final_softcap)
        return logits

    def hidden(self, ctx: Context, batch: Batch, cache: Cache, outputs: Tensor | None) -> Tensor:
        """Final-normed hidden states [n_embd, n]: of the `outputs` rows, or of every token when None."""
        p = self.params
        cache.start_forward(ctx, batch)
        ids = ctx.from_numpy(batch.tokens)
        positions = ctx.from_numpy(batch.positions)
        x = self.token_embd.forward(ctx, ids)  # [n_embd, n_tokens]
        if p.embed_scale != 1.0:
            x = x.scale(ctx, p.embed_scale)
        for il, block in enumerate(self.blk):
            last = il == p.n_layer - 1
            x = block.forward(ctx, x, positions, outputs if last else None, cache, il, p, self.rope_freqs,
                              self.flash)
        return self.output_norm.forward(ctx, x, p.eps)

    @property
    def can_embed(self) -> bool:
        return self.params.pooling != Pooling.NONE

    def embed(self, ctx: Context, batch: Batch) -> Tensor:
        """Pooled embeddings [n_embd, n_seqs] of the batch's sequences (in order of first appearance), each
        sequence attending causally to itself only; the KV cache is not touched."""
        p = self.params
        cache = BatchCache(window_for=lambda il: p.window if p.swa_layers[il] else None, flash=self.flash)
        return pool(ctx, self.hidden(ctx, batch, cache, None), batch.seqs, p.pooling)

    def shift(self, ctx: Context, il: int, key: Tensor, delta: Tensor) -> Tensor:
        """Re-rotate cached keys by `delta` positions with layer il's RoPE settings."""
        return rope(ctx, key, delta, il, self.params, self.rope_freqs)

    def new_cache(self, flash: bool = False) -> Cache:
        """A causal cache, or a wrapper of a sliding-window and a global cache when some layers use a window."""
        self.flash = flash
        p = self.params
        if p.window and any(p.swa_layers):
            swa = CausalCache(self.shift, window=p.window, flash=flash)
            full = CausalCache(self.shift, flash=flash)
            return WrapperCache([swa, full], lambda il: 0 if p.swa_layers[il] else 1)
        return CausalCache(self.shift, flash=flash)


def _n_tokens(x: Tensor) -> int:
    s = tuple(x.shape) + (1,)
    return s[1]
