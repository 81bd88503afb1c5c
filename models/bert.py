"""bert: an encoder for embeddings. Absolute position and token-type embeddings, post-LayerNorm blocks, non-causal
attention within each sequence, and pooling per `pooling_type` (mirrors llama.cpp src/models/bert.cpp)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ml.backend import Backend, Context, Tensor
from ml.batch import Batch
from ml.dtype import DType
from ml.module import Module, hyper, weight
from ml.nn import LayerNorm, Linear, attention
from models.pooling import Pooling, pool
from models.registry import register
from models.validate import check_encoder_params


@dataclass(frozen=True)
class BertParams:
    n_embd: int
    n_head: int
    n_layer: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    eps: float
    pooling: Pooling
    n_token_types: int
    rope_dim: int = 0  # nomic-bert: NeoX RoPE on q and k instead of position embeddings (0: none)
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(kw_only=True)
class BertBlock(Module):
    attn_q: Linear = weight(shape=lambda p: (p.n_embd, p.n_embd))
    attn_k: Linear = weight(shape=lambda p: (p.n_embd, p.n_embd))
    attn_v: Linear = weight(shape=lambda p: (p.n_embd, p.n_embd))
    attn_output: Linear = weight(shape=lambda p: (p.n_embd, p.n_embd))
    attn_output_norm: LayerNorm = weight(shape=lambda p: (p.n_embd,))
    ffn_up: Linear = weight(shape=lambda p: (p.n_embd, p.n_ff))
    ffn_down: Linear = weight(shape=lambda p: (p.n_ff, p.n_embd))
    layer_output_norm: LayerNorm = weight(shape=lambda p: (p.n_embd,))

    def project_qkv(self, ctx: Context, x: Tensor, p: BertParams) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V, each [n_embd, n] (nomic-bert overrides: one fused projection)."""
        return self.attn_q.forward(ctx, x), self.attn_k.forward(ctx, x), self.attn_v.forward(ctx, x)

    def ffn(self, ctx: Context, x: Tensor, p: BertParams) -> Tensor:
        """GeLU FFN (nomic-bert overrides: SwiGLU)."""
        return self.ffn_down.forward(ctx, self.ffn_up.forward(ctx, x).gelu(ctx))

    def forward(self, ctx: Context, x: Tensor, mask: Tensor, p: BertParams, n: int,
                positions: Tensor | None = None) -> Tensor:
        q, k, v = self.project_qkv(ctx, x, p)
        q = q.reshape(ctx, p.head_dim, p.n_head, n)
        k = k.reshape(ctx, p.head_dim, p.n_head, n)
        if p.rope_dim and positions is not None:
            q = q.rope(ctx, positions, p.rope_dim, p.rope_base, neox=True)
            k = k.rope(ctx, positions, p.rope_dim, p.rope_base, neox=True)
        k = k.permute(ctx, 0, 2, 1, 3)  # [head_dim, n, n_head]
        v = v.reshape(ctx, p.head_dim, p.n_head, n).permute(ctx, 0, 2, 1, 3)
        a = attention(ctx, q, k, v, mask, 1.0 / math.sqrt(p.head_dim))
        x = self.attn_output_norm.forward(ctx, x.add(ctx, self.attn_output.forward(ctx, a)), p.eps)
        return self.layer_output_norm.forward(ctx, x.add(ctx, self.ffn(ctx, x, p)), p.eps)


@register("bert")
@dataclass(kw_only=True)
class Bert(Module):
    params: BertParams = hyper()
    token_embd: Tensor = weight(shape=lambda p: (p.n_embd, p.n_vocab))
    token_types: Tensor = weight(shape=lambda p: (p.n_embd, p.n_token_types))
    position_embd: Tensor = weight(shape=lambda p: (p.n_embd, p.n_ctx_train))
    token_embd_norm: LayerNorm = weight(shape=lambda p: (p.n_embd,))
    blk: list[BertBlock] = weight(count=lambda p: p.n_layer)

    # Quantized weights are held as F16: ggml rounds activations to 8 bits before a quantized mat-mul, and with
    # a q8_0 MiniLM that costs the empty input ([CLS] [SEP], a mean over two tokens) 0.0017 of cosine to the
    # float32 reference (0.9983); at F16 it keeps 0.9996. An encoder this size barely grows (MiniLM: +21 MB).
    # (Q8_1 and Q8_K are activation types; no file stores weights in them.)
    widen_weights: ClassVar[Mapping[DType, DType]] = {
        t: DType.F16 for t in DType if t.is_quantized and t not in (DType.Q8_1, DType.Q8_K)}

    @classmethod
    def read_params(cls, b: Backend) -> BertParams:
        n_vocab = len(b.strings("tokenizer.ggml.tokens"))
        params = BertParams(
            n_embd=b.uint("embedding_length"), n_head=b.uint("attention.head_count"), n_layer=b.uint("block_count"),
            n_ff=b.uint("feed_forward_length"), n_vocab=n_vocab, n_ctx_train=b.uint("context_length"),
            eps=b.float("attention.layer_norm_epsilon"), pooling=Pooling.read(b),
            n_token_types=b.uint("tokenizer.ggml.token_type_count", 2))
        check_encoder_params(b.architecture, n_embd=params.n_embd, n_head=params.n_head, n_layer=params.n_layer,
                             n_ff=params.n_ff, n_vocab=params.n_vocab, n_ctx_train=params.n_ctx_train,
                             eps=params.eps)
        return params

    @property
    def can_embed(self) -> bool:
        return self.params.pooling != Pooling.NONE

    def embed(self, ctx: Context, batch: Batch) -> Tensor:
        """Pooled embeddings [n_embd, n_seqs] of the batch's sequences (in order of first appearance); every
        token attends to every token of its own sequence."""
        p = self.params
        n = batch.n_tokens
        if n < 1:  # ggml aborts the process on the empty tensors that would follow
            raise ValueError("empty batch")
        same = batch.seqs[None, :] == batch.seqs[:, None]  # [query, key]
        mask = ctx.from_numpy(np.where(same, 0.0, -np.inf).astype(np.float32))
        ids = ctx.from_numpy(batch.tokens)
        x = self.token_embd.get_rows(ctx, ids)
        if self.token_types is not None:  # optional in nomic-bert
            x = x.add(ctx, self.token_types.get_rows(ctx, ctx.from_numpy(np.zeros(n, dtype=np.int32))))
        positions = ctx.from_numpy(batch.positions)
        if self.position_embd is not None:  # absent when RoPE places the tokens (nomic-bert)
            x = x.add(ctx, self.position_embd.get_rows(ctx, positions))
        x = self.token_embd_norm.forward(ctx, x, p.eps)  # [n_embd, n]
        for block in self.blk:
            x = block.forward(ctx, x, mask, p, n, positions)
        return pool(ctx, x, batch.seqs, p.pooling)
