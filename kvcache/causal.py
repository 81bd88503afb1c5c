"""The causal KV cache: per-layer K/V tensors over a CellTable, with sliding-window and chunked variants.

Writes go through `set_rows` at cell indices that are graph inputs, and reads are views over a padded cell range,
so a decode step's graph has the same shape whichever cells it uses (only the range grows, in steps of `kv_pad`).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kvcache.base import ShiftFn
from kvcache.cells import CellTable
from kvcache.errors import NotSupportedError
from kvcache.masks import round_up
from kvcache.plans import ShiftPlan
from ml.backend import Backend, Context, Tensor
from ml.batch import Batch
from ml.dtype import DType

log = logging.getLogger(__name__)


class CausalCache:
    """Causal self-attention cache. `window` makes it a sliding-window cache (a cell is visible while
    pos - cell_pos <= window), `chunk` a chunked-attention one (llama4: only cells of the token's chunk)."""

    def __init__(self, shift_fn: ShiftFn | None = None, *, window: int | None = None, chunk: int | None = None,
                 kv_pad: int = 256, flash: bool = False) -> None:
        self.shift_fn = shift_fn
        self.window = window
        self.chunk = chunk
        self.kv_pad = kv_pad
        self.flash = flash
        self.cells: CellTable | None = None
        self._backend: Backend | None = None
        self._store: Any = None  # the context owning K/V tensors
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self._heads: dict[int, tuple[int, int, int, int]] = {}  # il -> (head_dim_k, n_head_k, head_dim_v, n_head_v)
        self.dtype = DType.F16
        self._idx: Tensor | None = None
        self._mask: Tensor | None = None
        self._range = (0, 0)

    # ---- runner side ----
    def init(self, backend: Backend, dtype: DType, max_sequences: int, capacity: int, max_batch: int) -> None:
        if dtype.is_quantized and not self.flash:
            raise NotSupportedError(f"a {dtype.name} KV cache needs flash attention (--flash-attn)")
        if self.window is not None:
            # Only the window of each sequence plus one batch ever needs to be resident.
            capacity = min(capacity, max_sequences * (self.window + 1) + max_batch)
        self.capacity = round_up(capacity, self.kv_pad)
        self.cells = CellTable(self.capacity, max_sequences)
        self.dtype = dtype
        self._backend = backend
        self._store = backend.new_context(max_nodes=64)
        self.max_batch = max_batch

    def start_forward(self, ctx: Context, batch: Batch, reserve: bool = False) -> None:
        cells = self._table()
        n = batch.n_tokens
        mask_dtype = np.float16 if self.flash else np.float32
        if reserve:
            idx = np.arange(n, dtype=np.int64)
            self._range = (0, self.capacity)
            mask = np.zeros((n, self.capacity), dtype=mask_dtype)
        else:
            if self.window is not None:
                cells.evict_outside_window(batch.positions, batch.seqs, self.window)
            idx = cells.store(cells.free_cells(n), batch.positions, batch.seqs).astype(np.int64)
            self._range = cells.kv_range(self.kv_pad)
            mask = cells.mask(batch.positions, batch.seqs, kv_range=self._range, window=self.window,
                              chunk=self.chunk, dtype=mask_dtype)
        self._idx = ctx.from_numpy(idx)
        self._mask = ctx.from_numpy(mask)

    def remove(self, seq: int, begin: int, end: int | None = None) -> None:
        plan = self._table().remove(seq, begin, end)
        if plan is not None and plan.cells.size:
            self._shift(plan)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self._table().copy_prefix(src, dst, n)

    def can_resume(self, seq: int, pos: int) -> bool:
        return self._table().can_resume(seq, pos, self.window)

    def clear(self) -> None:
        self._table().clear()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        self.keys.clear()
        self.values.clear()

    # ---- model side ----
    def put(self, ctx: Context, il: int, k: Tensor, v: Tensor) -> None:
        """k [head_dim_k, n_head_kv, n_tokens], v [head_dim_v, n_head_kv, n_tokens]."""
        kd, kh, n = _dims3(k)
        vd, vh, _ = _dims3(v)
        if il not in self.keys:
            self.keys[il] = self._store.layer(il).zeros(self.dtype, kd * kh, self.capacity)
            self.values[il] = self._store.layer(il).zeros(self.dtype, vd * vh, self.capacity)
            self._heads[il] = (kd, kh, vd, vh)
        assert self._idx is not None, "start_forward must precede put"
        ctx.forward(self.keys[il].set_rows(ctx, k.reshape(ctx, kd * kh, n), self._idx),
                    self.values[il].set_rows(ctx, v.reshape(ctx, vd * vh, n), self._idx))

    def get(self, ctx: Context, il: int) -> tuple[Tensor, Tensor, Tensor]:
        kd, kh, vd, vh = self._heads[il]
        start, stop = self._range
        assert self._mask is not None
        return (self._view(ctx, self.keys[il], kd, kh, start, stop),
                self._view(ctx, self.values[il], vd, vh, start, stop), self._mask)

    def _view(self, ctx: Context, t: Tensor, d: int, h: int, start: int, stop: int) -> Tensor:
        row = self.dtype.row_bytes(d * h)
        v = t.view(ctx, start * row, [d, h, stop - start], [self.dtype.row_bytes(d), row])
        return v.permute(ctx, 0, 2, 1, 3)  # [d, n_kv, h]

    # ---- internals ----
    def _table(self) -> CellTable:
        if self.cells is None:
            raise RuntimeError("cache used before init()")
        return self.cells

    def _shift(self, plan: ShiftPlan) -> None:
        """Re-rotate the keys of the shifted cells on every layer, in one graph (no logits are produced)."""
        if self.shift_fn is None:
            raise NotSupportedError("this model's cache cannot shift positions (no shift function)")
        if self._backend is None or not self.keys:
            return
        ctx = self._backend.new_context()
        try:
            cells = ctx.from_numpy(plan.cells.astype(np.int64))
            cells32 = ctx.from_numpy(plan.cells.astype(np.int32))
            delta = ctx.from_numpy(np.full(plan.cells.size, plan.delta, dtype=np.int32))
            outs = []
            for il, keys in self.keys.items():
                kd, kh, _, _ = self._heads[il]
                rows = keys.get_rows(ctx, cells32).reshape(ctx, kd, kh, plan.cells.size)  # f32
                rotated = self.shift_fn(ctx, il, rows, delta)
                outs.append(keys.set_rows(ctx, rotated.reshape(ctx, kd * kh, plan.cells.size), cells))
            ctx.forward(*outs).compute()
        finally:
            ctx.close()


def _dims3(t: Tensor) -> tuple[int, int, int]:
    s = tuple(t.shape) + (1, 1, 1)
    return s[0], s[1], s[2]
