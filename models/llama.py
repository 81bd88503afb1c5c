"""llama (SmolLM2, Llama 3.x, Mistral-7B layout; optional rope_freqs) and qwen2 (QKV biases, NeoX RoPE)."""
from __future__ import annotations

from dataclasses import dataclass

from ml.backend import Backend
from models.decoder import Decoder, DecoderParams
from models.registry import register


@register("llama", "mistral")
@dataclass(kw_only=True)
class Llama(Decoder):
    """Normal (GPT-J style) RoPE; everything else is the shared decoder."""


@register("qwen2")
@dataclass(kw_only=True)
class Qwen2(Decoder):
    """Differs from llama in two places: NeoX RoPE, and Q/K/V biases (the optional Linear biases load)."""

    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        return DecoderParams.read(backend, neox=True)
