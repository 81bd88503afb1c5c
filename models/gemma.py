"""gemma2 and gemma3: embeddings scaled by sqrt(n_embd), GeGLU, post-norms, sliding-window layers; gemma2 adds
attention/final soft-capping, gemma3 adds q/k RMSNorm, a local RoPE base for window layers and, in files that carry
one, a SigLIP vision tower with its projector (models.vision.siglip)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from ml.backend import Backend, Context, Tensor
from ml.module import hyper, weight
from ml.nn import RMSNorm
from models.decoder import Block, Decoder, DecoderParams
from models.registry import register
from models.vision.image import ImageSpec
from models.vision.siglip import Gemma3Projector, VisionParams, VisionTower


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


@dataclass(frozen=True)
class Gemma3Params(DecoderParams):
    vision: VisionParams | None = None  # None: a text-only file


@register("gemma3")
@dataclass(kw_only=True)
class Gemma3(Decoder):
    takes_projector: ClassVar[bool] = True  # a llama.cpp mmproj file can bring the tower (models.vision.siglip)
    params: Gemma3Params = hyper()
    blk: list[Gemma3Block] = weight(count=lambda p: p.n_layer)  # type: ignore[assignment]
    # required exactly when the hyper-parameters describe a tower (a projector missing a tensor is an error)
    v: VisionTower | None = weight(optional=lambda p: p.vision is None)
    mm: Gemma3Projector | None = weight(optional=lambda p: p.vision is None)

    @property
    def vision(self) -> VisionParams | None:
        """The vision hyper-parameters when the file has a complete tower and projector."""
        return self.params.vision if self.v is not None and self.mm is not None else None

    def image_spec(self) -> ImageSpec:
        """Gemma 3's processor: a square image_size resize, pixels scaled to [0, 1] and normalised by the file's
        mean / std (0.5 / 0.5 unless a projector file says otherwise)."""
        vision = self.vision
        assert vision is not None, "image_spec of a text-only gemma3"
        return ImageSpec(vision.image_size, vision.image_size, vision.image_mean, vision.image_std)

    def encode_image(self, ctx: Context, pixels: npt.NDArray[np.float32]) -> Tensor:
        """Soft tokens [n_embd, tokens_per_image] of one preprocessed image (float32 [3, H, W])."""
        vision = self.vision
        assert vision is not None and self.v is not None and self.mm is not None
        x = ctx.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))  # ggml [W, H, C]
        return self.mm.forward(ctx, self.v.forward(ctx, x, vision), vision)

    @classmethod
    def read_params(cls, backend: Backend) -> Gemma3Params:
        text = cls.read_text_params(backend)
        values = {f.name: getattr(text, f.name) for f in dataclasses.fields(text)}
        return Gemma3Params(**values, vision=VisionParams.read(backend, text.n_embd))

    @classmethod
    def read_text_params(cls, backend: Backend) -> DecoderParams:
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
