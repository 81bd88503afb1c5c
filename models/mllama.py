"""mllama (Llama 3.2 Vision) in Ollama's single-file layout: a llama decoder whose layers listed in
`mllama.attention.cross_attention_layers` are cross-attention layers over an image (Hugging Face
MllamaCrossAttentionDecoderLayer), the vision tower under `v.*` and the projector under `mm.0`
(models.vision.mllama_vision).

A cross-attention layer: RMSNorm, queries from the text (per-head RMSNorm, no RoPE), keys (per-head RMSNorm) and
values from the image's projected tokens, attention over all of them, output projection scaled by
tanh(cross_attn_attn_gate) and added; then the SwiGLU MLP scaled by tanh(cross_attn_mlp_gate) and added.

The image enters the sequence as one input, carried by an `<|image|>` token (runner.images); the forward that sees
that row runs the tower and projector and puts each cross-attention layer's keys and values into the encoder cache
(kvcache.encoder); later forwards, and later requests whose cached prefix holds the same image, read them from
there. Rows before the image in its sequence do not see it (the processor's cross-attention mask: text attends to
the image from its `<|image|>` token on); they get neither the attention nor the MLP part of the layer, as Meta's
reference masks both (Hugging Face's port zeroes only the MLP part of such rows; Ollama lets every row of the
image's batch see it). So a row's result does not depend on how the prompt was batched. A
sequence without an image skips the cross-attention layers, as Ollama does. The encoder cache holds one image, so
the model serves one sequence at a time (`max_parallel`; Ollama forces --parallel 1 for mllama).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kvcache.base import Cache
from kvcache.causal import CausalCache
from kvcache.encoder import EncoderCache
from kvcache.wrapper import WrapperCache
from ml.backend import Backend, Context, Tensor
from ml.batch import Batch
from ml.module import Module, hyper, weight
from ml.nn import Embedding, Linear, RMSNorm, attention
from models.decoder import Block, Decoder, DecoderParams, gated_ffn
from models.registry import register
from models.vision.image import decode
from models.vision.mllama_vision import MllamaVisionParams, MllamaVisionTower, _v, tiles_input
from models.vision.tiles import TiledImage, tile_image

IMAGE_TOKEN = "<|image|>"
IMAGE_TOKEN_ID = 128256  # Ollama's fallback: the first id after Llama 3's text vocabulary


@dataclass(frozen=True)
class MllamaParams(DecoderParams):
    cross_layers: tuple[bool, ...] = ()  # cross_layers[il]: layer il is a cross-attention layer
    n_vocab_embd: int = 0  # rows of token_embd: the text vocabulary plus the image token (and spares)
    image_token: int = IMAGE_TOKEN_ID
    vision: MllamaVisionParams | None = None


@dataclass(frozen=True)
class CrossInputs:
    """What the cross-attention layers of one forward need: the image's projected tokens [n_embd, n_image] when
    this forward encodes it (None: read the encoder cache), and F32 [1, n] with 1 for the rows that see it."""

    states: Tensor | None
    visible: Tensor


@dataclass(kw_only=True)
class CrossBlock(Module):
    attn_norm: RMSNorm = weight(shape=lambda p: (p.n_embd,))
    cross_attn_q_proj: Linear = weight(shape=lambda p: (p.n_embd, p.n_head * p.head_dim_k))
    cross_attn_k_proj: Linear = weight(shape=lambda p: (p.n_embd, p.n_head_kv * p.head_dim_k))
    cross_attn_v_proj: Linear = weight(shape=lambda p: (p.n_embd, p.n_head_kv * p.head_dim_v))
    cross_attn_o_proj: Linear = weight(shape=lambda p: (p.n_head * p.head_dim_v, p.n_embd))
    cross_attn_q_norm: RMSNorm = weight(shape=lambda p: (p.head_dim_k,))
    cross_attn_k_norm: RMSNorm = weight(shape=lambda p: (p.head_dim_k,))
    cross_attn_attn_gate: Tensor = weight(shape=lambda p: (1,))
    ffn_norm: RMSNorm = weight(shape=lambda p: (p.n_embd,))
    ffn_gate: Linear = weight(shape=lambda p: (p.n_embd, p.n_ff))
    ffn_up: Linear = weight(shape=lambda p: (p.n_embd, p.n_ff))
    ffn_down: Linear = weight(shape=lambda p: (p.n_ff, p.n_embd))
    cross_attn_mlp_gate: Tensor = weight(shape=lambda p: (1,))

    def forward(self, ctx: Context, x: Tensor, cross: CrossInputs, outputs: Tensor | None, cache: Cache, il: int,
                p: MllamaParams, flash: bool) -> Tensor:
        n = x.shape[1] if len(x.shape) > 1 else 1
        h = self.attn_norm.forward(ctx, x, p.eps)
        q = self.cross_attn_q_proj.forward(ctx, h).reshape(ctx, p.head_dim_k, p.n_head, n)
        q = self.cross_attn_q_norm.forward(ctx, q, p.eps)
        if cross.states is not None:
            m = cross.states.shape[1]
            k = self.cross_attn_k_proj.forward(ctx, cross.states).reshape(ctx, p.head_dim_k, p.n_head_kv, m)
            k = self.cross_attn_k_norm.forward(ctx, k, p.eps)
            v = self.cross_attn_v_proj.forward(ctx, cross.states).reshape(ctx, p.head_dim_v, p.n_head_kv, m)
            cache.put(ctx, il, k, v)
        keys, values, _ = cache.get(ctx, il)  # every image token is visible: no mask
        a = attention(ctx, q, keys, values, None, 1.0 / math.sqrt(p.head_dim_k), flash=flash)
        a = self.cross_attn_o_proj.forward(ctx, a)
        visible = cross.visible
        if outputs is not None:  # last layer: only the rows whose logits are wanted go on
            a, x, visible = a.get_rows(ctx, outputs), x.get_rows(ctx, outputs), visible.get_rows(ctx, outputs)
        x = x.add(ctx, a.mul(ctx, self.cross_attn_attn_gate.tanh(ctx)).mul(ctx, visible))
        h = gated_ffn(ctx, self.ffn_norm.forward(ctx, x, p.eps), self.ffn_gate, self.ffn_up, self.ffn_down, p.gelu)
        return x.add(ctx, h.mul(ctx, self.cross_attn_mlp_gate.tanh(ctx)).mul(ctx, visible))


def _layer_kind(p: MllamaParams, il: int) -> type:
    return CrossBlock if p.cross_layers[il] else Block


@register("mllama")
@dataclass(kw_only=True)
class Mllama(Decoder):
    params: MllamaParams = hyper()
    token_embd: Embedding = weight(shape=lambda p: (p.n_embd, p.n_vocab_embd))
    blk: list[Block | CrossBlock] = weight(count=lambda p: p.n_layer, kind=_layer_kind)  # type: ignore[assignment]
    v: MllamaVisionTower | None = weight(optional=True)
    mm: Linear | None = weight(optional=True, name="mm.0", shape=lambda p: (_v(p).n_out, p.n_embd))
    images_encoded: int = field(default=0, init=False)  # tower runs, for tests and logs

    reusable_graphs: ClassVar[bool] = False  # the graph depends on the image and on what the encoder cache holds
    max_parallel: ClassVar[int] = 1  # the encoder cache holds one sequence's image
    cross_attention_images: ClassVar[bool] = True  # an image is one input encoded in the forward (runner.images)

    @classmethod
    def read_params(cls, backend: Backend) -> MllamaParams:
        b, arch = backend, backend.architecture
        n_layer = b.uint("block_count")
        key = f"{arch}.attention.cross_attention_layers"
        cross = {int(i) for i in b.ints("attention.cross_attention_layers")} if key in b.metadata else set()
        if any(not 0 <= i < n_layer for i in cross):
            raise ValueError(f"{key} {sorted(cross)} names layers outside 0..{n_layer - 1}")
        embd, out = b.get("token_embd.weight"), b.get("output.weight")
        n_vocab_embd = int(embd.shape[1]) if embd is not None and len(embd.shape) == 2 else 0
        n_vocab = int(out.shape[1]) if out is not None and len(out.shape) == 2 else n_vocab_embd
        text = DecoderParams.read(b, n_vocab=n_vocab) if n_vocab else DecoderParams.read(b)
        tokens = b.strings("tokenizer.ggml.tokens", [])
        image_token = tokens.index(IMAGE_TOKEN) if IMAGE_TOKEN in tokens else IMAGE_TOKEN_ID
        vision = MllamaVisionParams.read(b, text.n_embd)
        if vision is not None and not 0 <= image_token < n_vocab_embd:
            raise ValueError(f"the image token {image_token} has no row in token_embd ({n_vocab_embd} rows)")
        values = {f.name: getattr(text, f.name) for f in dataclasses.fields(text)}
        return MllamaParams(**values, cross_layers=tuple(il in cross for il in range(n_layer)),
                            n_vocab_embd=n_vocab_embd or text.n_vocab, image_token=image_token, vision=vision)

    # ---- images ----
    @property
    def vision(self) -> MllamaVisionParams | None:
        """The vision hyper-parameters when the file has a complete tower and projector."""
        return self.params.vision if self.v is not None and self.mm is not None else None

    @property
    def image_token(self) -> int:
        return self.params.image_token

    def prepare_image(self, data: bytes) -> TiledImage:
        """Decode and tile an image file (raises models.vision.image.ImageError)."""
        vision = self.vision
        assert vision is not None, "prepare_image of a text-only mllama"
        return tile_image(decode(data), vision.tile_spec())

    def encode_image(self, ctx: Context, image: TiledImage) -> Tensor:
        """The image's projected tokens [n_embd, n_positions * n_tiles] (the cross-attention states)."""
        vision = self.vision
        assert vision is not None and self.v is not None and self.mm is not None
        if not 1 <= image.n_tiles <= vision.max_tiles or not 1 <= image.ratio_id <= vision.n_ratios:
            raise ValueError(f"an image of {image.n_tiles} tiles (aspect ratio id {image.ratio_id}) does not fit "
                             f"this model's {vision.max_tiles} tiles")
        self.images_encoded += 1
        tiles = ctx.from_numpy(tiles_input(image.pixels, vision.max_tiles))  # ggml [S, S, 3, max_tiles]
        ratio = ctx.from_numpy(np.array([image.ratio_id], dtype=np.int32))
        return self.mm.forward(ctx, self.v.forward(ctx, tiles, ratio, image.n_tiles, vision))

    # ---- the decoder's hooks ----
    def layer_inputs(self, ctx: Context, batch: Batch, cache: Cache) -> CrossInputs | None:
        """The cross-attention inputs of this forward; None when its sequence has no image (the layers are
        skipped)."""
        if not any(self.params.cross_layers):
            return None
        if batch.multimodal:
            item = batch.multimodal[-1]
            if not isinstance(item.data, TiledImage):
                raise TypeError(f"mllama cannot encode a {type(item.data).__name__}")
            states: Tensor | None = self.encode_image(ctx, item.data)
            image_pos = int(batch.positions[item.index])
        else:
            encoder = _encoder_of(cache)
            if encoder is None or not encoder.encoder_cached:
                return None
            states, image_pos = None, encoder.encoder_pos
        visible = (np.asarray(batch.positions) >= image_pos).astype(np.float32).reshape(-1, 1)  # ggml [1, n]
        return CrossInputs(states, ctx.from_numpy(visible))

    def run_block(self, ctx: Context, il: int, block: Module, x: Tensor, positions: Tensor, outputs: Tensor | None,
                  cache: Cache, q_scale: Tensor | None, extra: Any) -> Tensor:
        if not isinstance(block, CrossBlock):
            return super().run_block(ctx, il, block, x, positions, outputs, cache, q_scale, extra)
        if extra is None:  # no image: the layer is skipped
            return x if outputs is None else x.get_rows(ctx, outputs)
        return block.forward(ctx, x, extra, outputs, cache, il, self.params, self.flash)

    def new_cache(self, flash: bool = False, n_ctx_seq: int = 0) -> Cache:
        """Self-attention layers in a causal cache, cross-attention layers in an encoder cache."""
        self.flash, self.n_ctx_seq = flash, n_ctx_seq
        cross = self.params.cross_layers
        causal = CausalCache(self.shift, flash=flash)
        if not any(cross):
            return causal
        return WrapperCache([causal, EncoderCache(flash=flash)], lambda il: 1 if cross[il] else 0)


def _encoder_of(cache: Cache) -> EncoderCache | None:
    if isinstance(cache, EncoderCache):
        return cache
    if isinstance(cache, WrapperCache):
        return next((c for c in cache.caches if isinstance(c, EncoderCache)), None)
    return None
