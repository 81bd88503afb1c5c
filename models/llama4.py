"""llama4 (text decoder of Llama 4 Scout / Maverick; llama.cpp llama4.cpp): every fourth layer has no RoPE and
full attention with a per-position query temperature, the other three use RoPE, chunked attention (a key is
visible only inside the query's chunk of `attention.chunk_size` positions, 8192 by default) and a weightless q/k
RMSNorm after RoPE (except the 128-expert model, as in llama.cpp); every `interleave_moe_layer_step`-th layer's FFN
is a mixture of experts with sigmoid router weights on the expert input plus a shared expert.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvcache.base import Cache
from kvcache.causal import CausalCache
from kvcache.wrapper import WrapperCache
from ml.backend import Backend, Context, Tensor
from ml.module import weight
from models.decoder import Block, Decoder, DecoderParams
from models.moe import MoeBlock
from models.qwen3 import read_moe
from models.registry import register

DEFAULT_CHUNK = 8192  # llama.cpp's n_swa and n_attn_temp_floor_scale for llama4


def _qk_rms(ctx: Context, q: Tensor, k: Tensor, il: int, p: DecoderParams) -> tuple[Tensor, Tensor]:
    if p.qk_rms_norm and not p.nope_layers[il]:
        return q.rms_norm(ctx, p.eps), k.rms_norm(ctx, p.eps)
    return q, k


@dataclass(kw_only=True)
class Llama4Block(Block):
    def after_rope(self, ctx: Context, q: Tensor, k: Tensor, il: int, p: DecoderParams) -> tuple[Tensor, Tensor]:
        return _qk_rms(ctx, q, k, il, p)


@dataclass(kw_only=True)
class Llama4MoeBlock(MoeBlock):
    def after_rope(self, ctx: Context, q: Tensor, k: Tensor, il: int, p: DecoderParams) -> tuple[Tensor, Tensor]:
        return _qk_rms(ctx, q, k, il, p)


@register("llama4")
@dataclass(kw_only=True)
class Llama4(Decoder):
    blk: list[Block] = weight(count=lambda p: p.n_layer,
                              kind=lambda p, il: Llama4MoeBlock if p.moe_layers[il] else Llama4Block)

    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        n_layer = backend.uint("block_count")
        step = max(backend.uint("interleave_moe_layer_step", 1), 1)
        # a sliding_window of 0 (MobileLLM) turns chunking, NoPE layers and the temperature off
        local = backend.uint("attention.sliding_window", 1) != 0
        chunk = backend.uint("attention.chunk_size", DEFAULT_CHUNK) if local else 0
        n_expert = backend.uint("expert_count", 0)
        return read_moe(
            backend, False, moe_sigmoid=True, moe_layers=tuple((il + 1) % step == 0 for il in range(n_layer)),
            nope_layers=tuple(local and (il + 1) % 4 == 0 for il in range(n_layer)), chunk=chunk,
            chunk_layers=tuple(local and il % 4 < 3 for il in range(n_layer)),
            attn_temp_scale=backend.float("attention.temperature_scale", 0.1) if local else 0.0,
            attn_temp_floor=backend.uint("attention.temperature_length", DEFAULT_CHUNK), attn_temp_offset=1.0,
            qk_rms_norm=backend.bool("use_qk_norm", n_expert != 128), attn_scale=backend.float("attention.scale", 0.0),
            rope_base_swa=backend.float("rope.freq_base", 10000.0))

    def new_cache(self, flash: bool = False, n_ctx_seq: int = 0) -> Cache:
        """Chunked layers get a chunked cache, the NoPE layers a full one."""
        p = self.params
        if not (p.chunk and any(p.chunk_layers)):
            return super().new_cache(flash, n_ctx_seq)
        self.flash, self.n_ctx_seq = flash, n_ctx_seq
        chunked = CausalCache(self.shift, chunk=p.chunk, flash=flash)
        full = CausalCache(self.shift, flash=flash)
        return WrapperCache([chunked, full], lambda il: 0 if p.chunk_layers[il] else 1)
