"""granite (IBM Granite 3.x dense): the llama block with four multipliers from the metadata — embeddings
(`embedding_scale`), each branch before its residual add (`residual_scale`), attention scores
(`attention.scale`, replacing 1/sqrt(head_dim)) and logits (divided by `logit_scale`); llama.cpp granite.cpp."""
from __future__ import annotations

from dataclasses import dataclass

from ml.backend import Backend
from models.decoder import Decoder, DecoderParams
from models.registry import register


@register("granite")
@dataclass(kw_only=True)
class Granite(Decoder):
    @classmethod
    def read_params(cls, backend: Backend) -> DecoderParams:
        return DecoderParams.read(
            backend, embed_scale=backend.float("embedding_scale", 0.0) or 1.0,
            residual_scale=backend.float("residual_scale", 0.0) or 1.0,
            attn_scale=backend.float("attention.scale", 0.0), logit_scale=backend.float("logit_scale"))
