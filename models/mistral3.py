"""mistral3 (the text decoder of Mistral Small 3.1 / Ministral 3; the vision tower's `v.*` / `mm.*` tensors in the
same file are not used here): the llama block with normal RoPE (YaRN keys as RopeScaling reads them) and an
optional query temperature per position, 1 + beta * ln(1 + floor(pos / original context)), read from Ollama's
`rope.scaling_beta` or llama.cpp's `attention.temperature_scale`."""
from __future__ import annotations

from dataclasses import dataclass

from ml.backend import Backend
from models.decoder import Decoder, DecoderParams
from models.registry import register


@register("mistral3")
@dataclass(kw_only=True)
class Mistral3(Decoder):
    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        beta = backend.float("attention.temperature_scale", 0.0) or backend.float("rope.scaling_beta", 0.0)
        floor = backend.uint("rope.scaling.original_context_length", 0) or backend.uint("context_length", 0)
        return DecoderParams.read(backend, attn_temp_scale=beta if floor else 0.0, attn_temp_floor=floor,
                                  attn_scale=backend.float("attention.scale", 0.0))
