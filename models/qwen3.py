"""qwen3 (qwen2 without QKV biases, with per-head q/k RMSNorm) and qwen3moe (the same attention, a routed
mixture-of-experts FFN; llama.cpp always renormalises its top-k weights, as Qwen3-MoE's norm_topk_prob does)."""
from __future__ import annotations

from dataclasses import dataclass

from ml.backend import Backend
from ml.errors import ModelLoadError
from ml.module import weight
from ml.nn import RMSNorm
from models.decoder import Block, Decoder, DecoderParams
from models.moe import MoeNormBlock
from models.registry import register


@dataclass(kw_only=True)
class Qwen3Block(Block):
    attn_q_norm: RMSNorm = weight(shape=lambda p: (p.head_dim_k,))
    attn_k_norm: RMSNorm = weight(shape=lambda p: (p.head_dim_k,))


@register("qwen3")
@dataclass(kw_only=True)
class Qwen3(Decoder):
    blk: list[Qwen3Block] = weight(count=lambda p: p.n_layer)  # type: ignore[assignment]

    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        return DecoderParams.read(backend, neox=True)


def read_moe(b: Backend, default_norm: bool, **overrides: object) -> DecoderParams:
    """The expert keys of a MoE decoder (llama.cpp's names), on top of DecoderParams.read."""
    n_expert, n_used = b.uint("expert_count", 0), b.uint("expert_used_count", 0)
    if not 0 < n_used <= n_expert:
        raise ModelLoadError(f"invalid {b.architecture}.expert_count / expert_used_count = {n_expert} / {n_used}: "
                             f"need 0 < used <= count")
    n_ff_exp = b.uint("expert_feed_forward_length", 0) or b.uint("feed_forward_length", 0) // n_used
    return DecoderParams.read(
        b, n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp,
        n_ff=b.uint("feed_forward_length", n_ff_exp),
        expert_weights_norm=b.bool("expert_weights_norm", default_norm),
        expert_weights_scale=b.float("expert_weights_scale", 0.0), **overrides)


@register("qwen3moe")
@dataclass(kw_only=True)
class Qwen3Moe(Decoder):
    blk: list[MoeNormBlock] = weight(count=lambda p: p.n_layer)  # type: ignore[assignment]

    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        return read_moe(backend, True, neox=True)
