"""The encoder cache: cross-attention K/V computed once from an encoder's output (an image), kept whole per layer.

The keys and values do not depend on the decoder's positions, so there are no cells, no mask and no shifting:
`get` returns the stored tensors and None for the mask (every entry is visible to every token). What the cache
remembers is *where* the encoder input sat in the sequence: removing that position (`remove(seq, begin, end)`
with `begin <= pos < end`) invalidates the cached K/V, and the model must run the encoder again
(`encoder_cached` tells it); removing a finite range below it (a context shift) moves the position down with the
rows after the range.

Which position produced the K/V: a batch may carry `multimodal`, a sequence of the batch indices of its
encoder inputs (ints, or objects with an `index` attribute, as Ollama's `input.MultimodalIndex`); the cache
records the position of the last one. Without that attribute, the batch's first position is recorded.

As in Ollama, the cache holds one sequence only (`init` refuses `max_sequences > 1`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kvcache.causal import check_kv_type
from kvcache.errors import NotSupportedError
from ml.backend import Backend, Context, Tensor
from ml.batch import Batch
from ml.dtype import DType


class EncoderCache:
    def __init__(self, *, flash: bool = False) -> None:
        self.flash = flash
        self.dtype = DType.F16
        self._backend: Backend | None = None
        self._ctxs: dict[int, Any] = {}  # il -> context owning that layer's K/V (re-made when the shape changes)
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self._cur_pos = 0
        self._reserve = False
        self._scratch: dict[int, tuple[Tensor, Tensor]] = {}  # reserve-mode writes (owned by the forward's ctx)
        self.encoder_cached = False
        self.encoder_pos = -1  # position of the input that produced the cached K/V (-1: none)

    # ---- runner side ----
    def init(self, backend: Backend, dtype: DType, max_sequences: int, capacity: int, max_batch: int) -> None:
        check_kv_type(dtype, self.flash)
        if max_sequences != 1:
            raise NotSupportedError(f"the encoder cache holds one sequence, not {max_sequences}")
        self.close()
        self.dtype = dtype
        self._backend = backend

    def start_forward(self, ctx: Context, batch: Batch, reserve: bool = False) -> None:
        self._reserve = reserve
        self._scratch.clear()
        mm = getattr(batch, "multimodal", None)
        if mm:
            last = mm[-1]
            index = int(getattr(last, "index", last))
            self._cur_pos = int(batch.positions[index])
        elif batch.n_tokens:
            self._cur_pos = int(np.asarray(batch.positions)[0])

    def remove(self, seq: int, begin: int, end: int | None = None) -> None:
        self._check_seq(seq)
        if self.encoder_cached and begin <= self.encoder_pos and (end is None or self.encoder_pos < end):
            self.encoder_cached = False
        elif end is not None and self.encoder_pos >= end:  # a context shift moves the image down with its row
            self.encoder_pos -= end - begin

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self._check_seq(src)
        self._check_seq(dst)  # src == dst == 0: truncation to positions < n
        self.remove(src, n, None)

    def can_resume(self, seq: int, pos: int) -> bool:
        self._check_seq(seq)
        return True

    def clear(self) -> None:
        self.encoder_cached = False
        self.encoder_pos = -1

    def close(self) -> None:
        for c in self._ctxs.values():
            c.close()
        self._ctxs.clear()
        self.keys.clear()
        self.values.clear()
        self.clear()

    # ---- model side ----
    def put(self, ctx: Context, il: int, k: Tensor, v: Tensor) -> None:
        """Store the encoder's k [head_dim_k, n_head_kv, n_enc], v [head_dim_v, n_head_kv, n_enc] whole."""
        if self._backend is None:
            raise RuntimeError("cache used before init()")
        bs = self.dtype.block_size
        if k.shape[0] % bs or v.shape[0] % bs:  # ggml would abort the process on the copy
            raise NotSupportedError(f"a {self.dtype.name.lower()} KV cache needs head sizes that are multiples "
                                    f"of {bs}, not {k.shape[0]}/{v.shape[0]}")
        if self._reserve:  # same work into scratch: a reserve graph leaves the cache as it was
            scratch = ctx.empty(self.dtype, *k.shape), ctx.empty(self.dtype, *v.shape)
            self._scratch[il] = scratch
            ctx.forward(k.copy(ctx, scratch[0]), v.copy(ctx, scratch[1]))
            return
        keys, values = self.keys.get(il), self.values.get(il)
        if keys is None or values is None or tuple(keys.shape) != tuple(k.shape) \
                or tuple(values.shape) != tuple(v.shape):
            if il in self._ctxs:
                self._ctxs.pop(il).close()
            store = self._backend.new_context(max_nodes=8)
            self._ctxs[il] = store
            keys = store.layer(il).zeros(self.dtype, *k.shape)
            values = store.layer(il).zeros(self.dtype, *v.shape)
            self.keys[il], self.values[il] = keys, values
        self.encoder_pos, self.encoder_cached = self._cur_pos, True
        ctx.forward(k.copy(ctx, keys), v.copy(ctx, values))

    def get(self, ctx: Context, il: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """k [head_dim_k, n_enc, n_head_kv], v [head_dim_v, n_enc, n_head_kv] (views) and no mask."""
        keys, values = self._scratch[il] if self._reserve and il in self._scratch else (
            self.keys.get(il), self.values.get(il))
        if keys is None or values is None:
            raise RuntimeError(f"layer {il}: get before put (run the encoder first)")
        return keys.permute(ctx, 0, 2, 1, 3), values.permute(ctx, 0, 2, 1, 3), None

    @staticmethod
    def _check_seq(seq: int) -> None:
        if seq != 0:
            raise ValueError(f"sequence id {seq} outside [0, 1)")
