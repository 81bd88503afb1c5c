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
import numpy.typing as npt

from kvcache.base import Cache
from kvcache.batch import BatchCache
from kvcache.causal import CausalCache
from kvcache.wrapper import WrapperCache
from ml.backend import Backend, Context, Tensor
from ml.batch import Batch
from ml.module import Module, hyper, weight
from ml.nn import Embedding, Linear, RMSNorm, attention
from models.pooling import Pooling, pool
from models.rope import RopeScaling
from models.validate import check_decoder_params


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
    rope_scaling: RopeScaling = RopeScaling()  # type, YaRN and attention factors (rope_scale is its freq_scale)
    rope_plain_swa: bool = False  # window layers use RoPE without YaRN (olmo2 with sliding windows)
    residual_scale: float = 1.0  # granite: each block's branch output is scaled before the residual add
    logit_scale: float = 1.0  # granite: logits are divided by it
    n_expert: int = 0  # sparse MoE FFN (models.moe)
    n_expert_used: int = 0
    n_ff_exp: int = 0
    expert_weights_norm: bool = False  # the top-k router weights are renormalised to sum to 1
    expert_weights_scale: float = 0.0  # multiplies the router weights when not 0 or 1
    # Query temperature (mistral3, llama4): q *= 1 + attn_temp_scale * ln(floor((pos + offset) / floor) + 1)
    attn_temp_scale: float = 0.0
    attn_temp_floor: int = 0
    attn_temp_offset: float = 0.0
    nope_layers: tuple[bool, ...] = ()  # llama4: layers without RoPE (the temperature applies on these only)
    chunk: int = 0  # llama4: chunked attention (a key is visible only within the query's chunk of positions)
    chunk_layers: tuple[bool, ...] = ()
    qk_rms_norm: bool = False  # llama4: weightless RMSNorm of q and k after RoPE (on RoPE layers)
    moe_sigmoid: bool = False  # llama4: sigmoid router weights on the expert input, a shared expert beside
    moe_layers: tuple[bool, ...] = ()  # which layers route to experts when not all do (llama4 interleaves)

    @staticmethod
    def read(b: Backend, **overrides: Any) -> DecoderParams:
        """Read the common keys (without the architecture prefix); `overrides` supply arch-specific values."""
        n_embd, n_head = b.uint("embedding_length"), b.uint("attention.head_count")
        head_dim_k = b.uint("attention.key_length", n_embd // n_head)
        n_vocab = b.uint("vocab_size", 0) or len(b.strings("tokenizer.ggml.tokens"))
        n_layer = b.uint("block_count")
        n_ctx_train = b.uint("context_length", 0)
        scaling = RopeScaling.read(b, n_ctx_train)
        kv = b.metadata.get(f"{b.architecture}.attention.head_count_kv", n_head)
        values: dict[str, Any] = dict(
            n_embd=n_embd, n_head=n_head, n_head_kv=int(np.max(kv)) if np.ndim(kv) else int(kv),
            head_dim_k=head_dim_k, head_dim_v=b.uint("attention.value_length", head_dim_k), n_layer=n_layer,
            n_ff=b.uint("feed_forward_length"), n_vocab=n_vocab, eps=b.float("attention.layer_norm_rms_epsilon"),
            rope_dim=b.uint("rope.dimension_count", head_dim_k), rope_base=b.float("rope.freq_base", 10000.0),
            rope_base_swa=b.float("rope.freq_base_swa", b.float("rope.local.freq_base", 10000.0)),
            rope_scale=scaling.freq_scale, rope_scaling=scaling,
            n_ctx_train=n_ctx_train, swa_layers=(False,) * n_layer, pooling=Pooling.read(b))
        values.update(overrides)
        params = DecoderParams(**values)
        check_decoder_params(params, b.architecture)
        return params

    @property
    def cache_window(self) -> int:
        """The window in the caches' terms (a cell stays visible while pos - cell_pos <= it): llama.cpp and the
        Hugging Face models hide a key once pos_q - pos_k >= window, so a token sees `window` positions, itself
        included (Ollama v0.6.8 let it see one more)."""
        return self.window - 1

    def temperature_for(self, il: int) -> bool:
        return bool(self.attn_temp_scale) and (not self.nope_layers or self.nope_layers[il])

    def temperatures(self, positions: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        """The per-token query scale [n, 1, 1] (numpy order) for the batch's positions."""
        steps = np.floor((positions.astype(np.float64) + self.attn_temp_offset) / max(self.attn_temp_floor, 1))
        return (1.0 + self.attn_temp_scale * np.log(steps + 1.0)).astype(np.float32).reshape(-1, 1, 1)

    def base_for(self, il: int) -> float:
        return self.rope_base_swa if self.swa_layers[il] else self.rope_base

    def scale_for(self, il: int) -> float:
        if self.swa_layers[il] and self.rope_scale_swa is not None:
            return self.rope_scale_swa
        return self.rope_scale


def gated_ffn(ctx: Context, h: Tensor, gate: Linear, up: Linear, down: Linear, gelu: bool) -> Tensor:
    """down(act(gate(h)) * up(h)), act SiLU or (gelu) GELU: the FFN of every decoder layer kind."""
    g, u = gate.forward(ctx, h), up.forward(ctx, h)
    return down.forward(ctx, g.geglu(ctx, u) if gelu else g.swiglu(ctx, u))


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

    def project_qkv(self, ctx: Context, h: Tensor, p: DecoderParams) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V projections, flat [n_head * head_dim, n] (phi3 overrides: one fused projection)."""
        return self.attn_q.forward(ctx, h), self.attn_k.forward(ctx, h), self.attn_v.forward(ctx, h)

    def norm_heads(self, ctx: Context, q: Tensor, k: Tensor, p: DecoderParams) -> tuple[Tensor, Tensor]:
        """Optional per-head q/k RMSNorm (gemma3, qwen3); olmo2 norms the whole projection instead."""
        if self.attn_q_norm is not None:
            q = self.attn_q_norm.forward(ctx, q, p.eps)
        if self.attn_k_norm is not None:
            k = self.attn_k_norm.forward(ctx, k, p.eps)
        return q, k

    def after_rope(self, ctx: Context, q: Tensor, k: Tensor, il: int, p: DecoderParams) -> tuple[Tensor, Tensor]:
        """A hook after RoPE (llama4: weightless q/k RMSNorm on RoPE layers)."""
        return q, k

    def ffn(self, ctx: Context, h: Tensor, p: DecoderParams) -> Tensor:
        """The gated FFN (phi3 fuses gate and up; models.moe routes to experts)."""
        return gated_ffn(ctx, h, self.ffn_gate, self.ffn_up, self.ffn_down, p.gelu)

    def forward(self, ctx: Context, x: Tensor, positions: Tensor, outputs: Tensor | None, cache: Cache,
                il: int, p: DecoderParams, rope_freqs: Tensor | None, flash: bool,
                q_scale: Tensor | None = None) -> Tensor:
        n = _n_tokens(x)
        h = x if self.attn_norm is None else self.attn_norm.forward(ctx, x, p.eps)  # olmo2: no pre-norm
        q, k, v = self.project_qkv(ctx, h, p)
        q = q.reshape(ctx, p.head_dim_k, p.n_head, n)  # [head_dim, n_head, n]
        k = k.reshape(ctx, p.head_dim_k, p.n_head_kv, n)
        v = v.reshape(ctx, p.head_dim_v, p.n_head_kv, n)
        q, k = self.norm_heads(ctx, q, k, p)
        if not (p.nope_layers and p.nope_layers[il]):
            q = rope(ctx, q, positions, il, p, rope_freqs)
            k = rope(ctx, k, positions, il, p, rope_freqs)
        q, k = self.after_rope(ctx, q, k, il, p)
        if q_scale is not None and p.temperature_for(il):
            q = q.mul(ctx, q_scale)
        cache.put(ctx, il, k, v)
        keys, values, mask = cache.get(ctx, il)
        a = attention(ctx, q, keys, values, mask, p.attn_scale or 1.0 / math.sqrt(p.head_dim_k),
                      softcap=p.attn_softcap, flash=flash)  # [head_dim_v * n_head, n]
        a = self.attn_output.forward(ctx, a)
        if outputs is not None:  # last layer: only the rows whose logits are wanted go on
            a, x = a.get_rows(ctx, outputs), x.get_rows(ctx, outputs)
        if self.post_attention_norm is not None:
            a = self.post_attention_norm.forward(ctx, a, p.eps)
        if p.residual_scale != 1.0:
            a = a.scale(ctx, p.residual_scale)
        x = x.add(ctx, a)
        h = self.ffn(ctx, x if self.ffn_norm is None else self.ffn_norm.forward(ctx, x, p.eps), p)
        if self.post_ffw_norm is not None:
            h = self.post_ffw_norm.forward(ctx, h, p.eps)
        if p.residual_scale != 1.0:
            h = h.scale(ctx, p.residual_scale)
        return x.add(ctx, h)


def rope(ctx: Context, t: Tensor, positions: Tensor, il: int, p: DecoderParams, freqs: Tensor | None,
         shift: bool = False) -> Tensor:
    """RoPE with layer il's settings; the cache's shift callback uses the same function (`shift`: a pure
    rotation, without the YaRN magnitude factor the keys already carry)."""
    s, freq_scale = p.rope_scaling, p.scale_for(il)
    if p.rope_plain_swa and p.swa_layers[il]:
        s = RopeScaling(n_ctx_orig=s.n_ctx_orig, beta_fast=s.beta_fast, beta_slow=s.beta_slow)
    return t.rope(ctx, positions, p.rope_dim, p.base_for(il), neox=p.neox, freq_factors=freqs,
                  freq_scale=freq_scale, n_ctx_orig=s.n_ctx_orig or p.n_ctx_train, ext_factor=s.ext_factor,
                  attn_factor=s.shift_attn_factor(freq_scale) if shift else s.attn_factor,
                  beta_fast=s.beta_fast, beta_slow=s.beta_slow)


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
    n_ctx_seq: int = field(default=0, init=False)  # context per sequence (new_cache): LongRoPE picks by it

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
        if p.logit_scale != 1.0:
            logits = logits.scale(ctx, 1.0 / p.logit_scale)
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
        if batch.embeds is not None and batch.is_embed is not None:
            # rows given as embeddings (an image's soft tokens, not scaled): x * keep + embeds, keep 0 or 1 per row
            keep = (~batch.is_embed).astype(np.float32).reshape(-1, 1)
            x = x.mul(ctx, ctx.from_numpy(keep)).add(ctx, ctx.from_numpy(batch.embeds * (1.0 - keep)))
        q_scale = ctx.from_numpy(p.temperatures(batch.positions)) if p.attn_temp_scale else None
        extra = self.layer_inputs(ctx, batch, cache)
        for il, block in enumerate(self.blk):
            last = il == p.n_layer - 1
            x = self.run_block(ctx, il, block, x, positions, outputs if last else None, cache, q_scale, extra)
        return self.output_norm.forward(ctx, x, p.eps)

    def layer_inputs(self, ctx: Context, batch: Batch, cache: Cache) -> Any:
        """Inputs some layers need besides the hidden state, made once per forward (mllama: the image's
        cross-attention states); None for none."""
        return None

    def run_block(self, ctx: Context, il: int, block: Module, x: Tensor, positions: Tensor, outputs: Tensor | None,
                  cache: Cache, q_scale: Tensor | None, extra: Any) -> Tensor:
        """Layer il (a subclass whose layers differ in kind routes them here)."""
        assert isinstance(block, Block)
        return block.forward(ctx, x, positions, outputs, cache, il, self.params, self.freq_factors(), self.flash,
                             q_scale)

    @property
    def can_embed(self) -> bool:
        return self.params.pooling != Pooling.NONE

    def embed(self, ctx: Context, batch: Batch) -> Tensor:
        """Pooled embeddings [n_embd, n_seqs] of the batch's sequences (in order of first appearance), each
        sequence attending causally to itself only; the KV cache is not touched."""
        p = self.params
        cache = BatchCache(window_for=lambda il: p.cache_window if p.swa_layers[il] else None, flash=self.flash)
        return pool(ctx, self.hidden(ctx, batch, cache, None), batch.seqs, p.pooling)

    def shift(self, ctx: Context, il: int, key: Tensor, delta: Tensor) -> Tensor:
        """Re-rotate cached keys by `delta` positions with layer il's RoPE settings (NoPE layers: unchanged)."""
        if self.params.nope_layers and self.params.nope_layers[il]:
            return key
        return rope(ctx, key, delta, il, self.params, self.freq_factors(), shift=True)

    def freq_factors(self) -> Tensor | None:
        """Per-dimension RoPE frequency divisors (llama3's rope_freqs; phi3 picks LongRoPE's long or short)."""
        return self.rope_freqs

    def new_cache(self, flash: bool = False, n_ctx_seq: int = 0) -> Cache:
        """A causal cache, or a wrapper of a sliding-window and a global cache when some layers use a window.
        `n_ctx_seq`: the context each sequence gets (0: unknown, taken as the training context's original)."""
        self.flash, self.n_ctx_seq = flash, n_ctx_seq
        p = self.params
        if p.window and any(p.swa_layers):
            swa = CausalCache(self.shift, window=p.cache_window, flash=flash)
            full = CausalCache(self.shift, flash=flash)
            return WrapperCache([swa, full], lambda il: 0 if p.swa_layers[il] else 1)
        return CausalCache(self.shift, flash=flash)


def _n_tokens(x: Tensor) -> int:
    s = tuple(x.shape) + (1,)
    return s[1]
