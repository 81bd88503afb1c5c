"""The in-batch cache: attention over the batch's own tokens only, nothing stored between forwards.

For one-shot forwards that need no history: a causal model computing an embedding runs each input in one batch,
so its keys and values never outlive the graph. `put` keeps this forward's K/V tensors (graph nodes, no copy),
`get` returns them with a mask built from the batch's positions and sequences: a token sees the tokens of its
own sequence at or before its position (all of them when `causal` is False), and on window layers only the last
`window + 1` positions (the causal cache's rule, kvcache.masks)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kvcache.masks import build_mask
from ml.backend import Backend, Context, Tensor
from ml.batch import Batch
from ml.dtype import DType


class BatchCache:
    def __init__(self, *, window_for: Callable[[int], int | None] = lambda il: None, causal: bool = True,
                 flash: bool = False) -> None:
        """`window_for(il)`: layer il's sliding window, or None for full attention."""
        self.window_for = window_for
        self.causal = causal
        self.flash = flash
        self._batch: Batch | None = None
        self._masks: dict[int | None, Tensor] = {}
        self._kv: dict[int, tuple[Tensor, Tensor]] = {}

    # ---- runner side: nothing is kept, so there is nothing to size, edit or free ----
    def init(self, backend: Backend, dtype: DType, max_sequences: int, capacity: int, max_batch: int) -> None:
        pass

    def start_forward(self, ctx: Context, batch: Batch, reserve: bool = False) -> None:
        if batch.n_tokens < 1:  # ggml aborts the process on the empty tensors that would follow
            raise ValueError("empty batch")
        self._batch = batch
        self._masks.clear()
        self._kv.clear()

    def remove(self, seq: int, begin: int, end: int | None = None) -> None:
        pass

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        pass

    def can_resume(self, seq: int, pos: int) -> bool:
        return False

    def clear(self) -> None:
        self._kv.clear()
        self._masks.clear()

    def close(self) -> None:
        self.clear()

    # ---- model side ----
    def put(self, ctx: Context, il: int, k: Tensor, v: Tensor) -> None:
        self._kv[il] = (k, v)

    def get(self, ctx: Context, il: int) -> tuple[Tensor, Tensor, Tensor | None]:
        if il not in self._kv:
            raise RuntimeError(f"layer {il}: get before put")
        k, v = self._kv[il]
        return k.permute(ctx, 0, 2, 1, 3), v.permute(ctx, 0, 2, 1, 3), self._mask(ctx, self.window_for(il))

    def _mask(self, ctx: Context, window: int | None) -> Tensor:
        if window not in self._masks:
            b = self._batch
            if b is None:
                raise RuntimeError("start_forward must precede get")
            member = b.seqs[:, None] == b.seqs[None, :]  # [query token, key token]
            mask = build_mask(b.positions, member, b.positions, window=window, causal=self.causal,
                              dtype=np.float16 if self.flash else np.float32)
            self._masks[window] = ctx.from_numpy(mask)
        return self._masks[window]
