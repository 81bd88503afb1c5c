"""gemma2 and gemma3 (text): embeddings scaled by sqrt(n_embd), GeGLU, post-norms, sliding-window layers;
gemma2 adds attention/final soft-capping, gemma3 adds q/k RMSNorm and a local RoPE base for window layers."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ml.backend import Backend
from ml.module import weight
from ml.nn import RMSNorm
from models.decoder import Block, Decoder, DecoderParams
from models.registry import register


@dataclass(kw_only=True)
class GemmaBlock(Block):
    """Post-norms are required in gemma."""

    post_attention_norm: RMSNorm = weight(shape=lambda p: (p.n_embd,))
    post_ffw_norm: RMSNorm = weight(shape=lambda p: (p.n_embd,))


@dataclass(kw_only=True)
class Gemma3Block(GemmaBlock):
    attn_q_norm: RMSNorm = weight(shape=lambda p: (p.head_dim_k,))
    attn_k_norm: RMSNorm = weight(shape=lambda p: (p.head_dim_k,))


def _common(b: Backend) -> dict[str, object]:
    n_embd = b.uint("embedding_length")
    return dict(neox=True, gelu=True, embed_scale=math.sqrt(n_embd))


@register("gemma2")
@dataclass(kw_only=True)
class Gemma2(Decoder):
    blk: list[GemmaBlock] = weight(count=lambda p: p.n_layer)  # type: ignore[assignment]

    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        n_layer = backend.uint("block_count")
        base = backend.float("rope.freq_base", 10000.0)
        return DecoderParams.read(
            backend, **_common(backend), window=backend.uint("attention.sliding_window", 4096),
            swa_layers=tuple(il % 2 == 0 for il in range(n_layer)), rope_base_swa=base,
            attn_softcap=backend.float("attn_logit_softcapping", 50.0),
            final_softcap=backend.float("final_logit_softcapping", 30.0))


@register("gemma3")
@dataclass(kw_only=True)
class Gemma3(Decoder):
    blk: list[Gemma3Block] = weight(count=lambda p: p.n_layer)  # type: ignore[assignment]

    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        n_layer = backend.uint("block_count")
        n_embd, n_head = backend.uint("embedding_length"), backend.uint("attention.head_count")
        head_dim = backend.uint("attention.key_length", n_embd // n_head)
        # gemma_pytorch: the 27B model (62 layers) scales queries by n_embd / n_head, the others by head_dim.
        scale = 1.0 / math.sqrt(n_embd // n_head if n_layer == 62 else head_dim)
        window = backend.uint("attention.sliding_window", 0)
        # llama.cpp (rope_freq_scale_train_swa = 1) and HF: local layers are never RoPE-scaled, only global ones.
        return DecoderParams.read(
            backend, **_common(backend), window=window, attn_scale=scale, rope_scale_swa=1.0,
            swa_layers=tuple(bool(window) and il % 6 < 5 for il in range(n_layer)),
            final_softcap=backend.float("final_logit_softcapping", 0.0))
