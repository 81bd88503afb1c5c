"""granite (IBM Granite 3.x dense): the llama block with four multipliers from the metadata — embeddings
(`embedding_scale`), each branch before its residual add (`residual_scale`), attention scores
(`attention.scale`, replacing 1/sqrt(head_dim)) and logits (divided by `logit_scale`); llama.cpp granite.cpp."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ml.backend import Backend
from ml.errors import ModelLoadError
from models.decoder import Decoder, DecoderParams
from models.registry import register


@register("granite")
@dataclass(kw_only=True)
class Granite(Decoder):
    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        scales = {key: backend.float(key, 0.0) for key in ("embedding_scale", "residual_scale", "logit_scale")}
        for key, value in scales.items():
            if not math.isfinite(value) or value < 0.0 or (key == "logit_scale" and value == 0.0):
                raise ModelLoadError(f"invalid hyper-parameter {backend.architecture}.{key} = {value}: must be "
                                     f"finite and positive")
        return DecoderParams.read(
            backend, embed_scale=scales["embedding_scale"] or 1.0, residual_scale=scales["residual_scale"] or 1.0,
            attn_scale=backend.float("attention.scale", 0.0), logit_scale=scales["logit_scale"])
