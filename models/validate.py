"""Range and consistency checks of a decoder's hyper-parameters, before any tensor or graph is built from them.

ggml asserts (and aborts the process) or loops forever on values a file can carry: an odd or oversized RoPE
dimension count, a RoPE dimension count of 0, a NaN or negative norm epsilon, head counts that do not divide.
Each check names the GGUF key the value came from, so the load error tells the user which field is broken.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ml.errors import ModelLoadError

if TYPE_CHECKING:
    from models.decoder import DecoderParams

# Far above any released model, far below what would make position arithmetic or allocations absurd.
MAX_CONTEXT = 1 << 24

# DecoderParams field -> the GGUF key (without the architecture prefix) it is read from.
KEYS = {
    "n_embd": "embedding_length", "n_head": "attention.head_count", "n_head_kv": "attention.head_count_kv",
    "head_dim_k": "attention.key_length", "head_dim_v": "attention.value_length", "n_layer": "block_count",
    "n_ff": "feed_forward_length", "n_vocab": "vocab_size", "eps": "attention.layer_norm_rms_epsilon",
    "rope_dim": "rope.dimension_count", "rope_base": "rope.freq_base", "rope_base_swa": "rope.freq_base_swa",
    "rope_scale": "rope.scaling.factor", "window": "attention.sliding_window",
    "attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping",
    "n_ctx_train": "context_length",
}


def _fail(arch: str, field: str, value: object, why: str) -> ModelLoadError:
    key = KEYS.get(field, field)
    return ModelLoadError(f"invalid hyper-parameter {arch}.{key} = {value!r}: {why}")


def check_decoder_params(p: DecoderParams, arch: str) -> None:
    """Raise ModelLoadError naming the key of the first value that ggml cannot run."""
    for name in ("n_embd", "n_head", "n_head_kv", "head_dim_k", "head_dim_v", "n_layer", "n_ff", "n_vocab"):
        if getattr(p, name) <= 0:
            raise _fail(arch, name, getattr(p, name), "must be positive")
    if p.n_head % p.n_head_kv:
        raise _fail(arch, "n_head_kv", p.n_head_kv, f"must divide the head count {p.n_head}")
    if not (math.isfinite(p.eps) and 0.0 < p.eps < 1.0):
        raise _fail(arch, "eps", p.eps, "must be a finite number in (0, 1)")
    if p.rope_dim <= 0 or p.rope_dim % 2 or p.rope_dim > p.head_dim_k:
        raise _fail(arch, "rope_dim", p.rope_dim, f"must be even, positive and at most the head size {p.head_dim_k}")
    for name in ("rope_base", "rope_base_swa", "rope_scale"):
        value = getattr(p, name)
        if not (math.isfinite(value) and value > 0.0):
            raise _fail(arch, name, value, "must be a finite positive number")
    if p.rope_scale_swa is not None and not (math.isfinite(p.rope_scale_swa) and p.rope_scale_swa > 0.0):
        raise _fail(arch, "rope_scale", p.rope_scale_swa, "the window layers' scale must be finite and positive")
    for name in ("attn_scale", "attn_softcap", "final_softcap"):
        value = getattr(p, name)
        if not (math.isfinite(value) and value >= 0.0):
            raise _fail(arch, name, value, "must be a finite number >= 0")
    if not (math.isfinite(p.embed_scale) and p.embed_scale > 0.0):
        raise _fail(arch, "embed_scale", p.embed_scale, "must be a finite positive number")
    if len(p.swa_layers) != p.n_layer:
        raise _fail(arch, "n_layer", p.n_layer, f"the sliding-window layer pattern has {len(p.swa_layers)} entries")
    if any(p.swa_layers) and p.window <= 0:
        raise _fail(arch, "window", p.window, "sliding-window layers need a positive window")
    if not 0 <= p.n_ctx_train <= MAX_CONTEXT:
        raise _fail(arch, "n_ctx_train", p.n_ctx_train, f"must be between 0 and {MAX_CONTEXT}")


def check_encoder_params(arch: str, *, n_embd: int, n_head: int, n_layer: int, n_ff: int, n_vocab: int,
                         n_ctx_train: int, eps: float) -> None:
    """The same checks for a BERT-style encoder (layer-norm epsilon, position table of n_ctx_train rows)."""
    for key, value in (("embedding_length", n_embd), ("attention.head_count", n_head), ("block_count", n_layer),
                       ("feed_forward_length", n_ff), ("vocab_size", n_vocab)):
        if value <= 0:
            raise ModelLoadError(f"invalid hyper-parameter {arch}.{key} = {value!r}: must be positive")
    if n_embd % n_head:
        raise ModelLoadError(f"invalid hyper-parameter {arch}.attention.head_count = {n_head}: "
                             f"must divide the width {n_embd}")
    if not (math.isfinite(eps) and 0.0 < eps < 1.0):
        raise ModelLoadError(f"invalid hyper-parameter {arch}.attention.layer_norm_epsilon = {eps!r}: "
                             "must be a finite number in (0, 1)")
    if not 0 < n_ctx_train <= MAX_CONTEXT:
        raise ModelLoadError(f"invalid hyper-parameter {arch}.context_length = {n_ctx_train}: "
                             f"must be between 1 and {MAX_CONTEXT}")
