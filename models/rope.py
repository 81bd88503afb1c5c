"""RoPE scaling from the GGUF metadata: the arguments llama.cpp hands to ggml_rope_ext for each scaling type.

`<arch>.rope.scaling.type` is one of none / linear / yarn / longrope (llama.cpp's LLAMA_ROPE_SCALING_TYPES; absent
means linear). llama3-style frequency factors are not a type: they come as the `rope_freqs` tensor, and LongRoPE's
per-dimension factors as `rope_factors_long` / `rope_factors_short` (phi3). Any other type is a load error: running
it as something else would give silently wrong logits.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension"; llama.cpp llama-context.cpp): ext_factor 1, the
correction range from beta_fast / beta_slow over the original context length, and an attention (magnitude) factor
0.1 ln(factor) + 1 on cos/sin. ggml's rope already multiplies by 1 + 0.1 ln(1 / freq_scale) whenever ext_factor is
non-zero, so llama.cpp passes attn_factor = mscale / (1 + 0.1 ln factor) * rope.scaling.attn_factor; so do we.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ml.backend import Backend
from ml.errors import ModelLoadError

SCALING_TYPES = ("none", "linear", "yarn", "longrope")


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class RopeScaling:
    """What ggml_rope_ext needs beyond the base and the dimensions."""

    kind: str = "linear"
    freq_scale: float = 1.0  # 1 / rope.scaling.factor
    n_ctx_orig: int = 0  # rope.scaling.original_context_length, else the training context
    ext_factor: float = 0.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    @staticmethod
    def read(b: Backend, n_ctx_train: int) -> RopeScaling:
        kind = b.string("rope.scaling.type", "linear")
        if kind not in SCALING_TYPES:
            raise ModelLoadError(f"unsupported {b.architecture}.rope.scaling.type {kind!r}; this runner supports "
                                 f"{', '.join(SCALING_TYPES)}")
        factor = b.float("rope.scaling.factor", 0.0) or b.float("rope.scale_linear", 0.0)
        if not math.isfinite(factor) or factor < 0.0:
            raise ModelLoadError(f"invalid hyper-parameter {b.architecture}.rope.scaling.factor = {factor}: must be "
                                 f"finite and positive")
        freq_scale = 1.0 / factor if factor and kind != "none" else 1.0
        n_ctx_orig = b.uint("rope.scaling.original_context_length", 0) or n_ctx_train
        ext_factor = b.float("rope.scaling.yarn_ext_factor", -1.0)
        if ext_factor < 0.0:
            ext_factor = 1.0 if kind == "yarn" else 0.0
        attn_factor = 1.0
        if ext_factor != 0.0:
            f = 1.0 / freq_scale
            log_mul = b.float("rope.scaling.yarn_log_multiplier", 0.0)
            attn_factor = _yarn_mscale(f, 1.0) / _yarn_mscale(f, log_mul) if log_mul else _yarn_mscale(f, 1.0)
            attn_factor /= 1.0 + 0.1 * math.log(f)  # ggml multiplies this back in (see the module docstring)
        attn_factor *= b.float("rope.scaling.attn_factor", 1.0)
        out = RopeScaling(kind=kind, freq_scale=freq_scale, n_ctx_orig=n_ctx_orig, ext_factor=ext_factor,
                          attn_factor=attn_factor, beta_fast=b.float("rope.scaling.yarn_beta_fast", 32.0),
                          beta_slow=b.float("rope.scaling.yarn_beta_slow", 1.0))
        for name, value in (("yarn_ext_factor", out.ext_factor), ("attn_factor", out.attn_factor),
                            ("yarn_beta_fast", out.beta_fast), ("yarn_beta_slow", out.beta_slow)):
            if not math.isfinite(value) or value < 0.0 or (name.startswith("yarn_beta") and value == 0.0):
                raise ModelLoadError(f"invalid hyper-parameter {b.architecture}.rope.scaling.{name} = {value}: "
                                     f"must be finite and positive")
        return out

    def shift_attn_factor(self, freq_scale: float) -> float:
        """The attn_factor that makes a cache shift a pure rotation: re-rotating keys must not scale them by the
        YaRN magnitude again (llama.cpp's shift does, which drifts keys on every context shift)."""
        if self.ext_factor == 0.0:
            return 1.0
        return 1.0 / (1.0 + 0.1 * math.log(1.0 / freq_scale))
