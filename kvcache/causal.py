"""The causal KV cache: per-layer K/V tensors over a CellTable, with sliding-window and chunked variants.

Layout: every layer has one K and one V tensor of shape [head_dim * n_head_kv, capacity] (one row per cell).
Writes go through `set_rows` at cell indices that are graph inputs, and reads are views over a padded cell range,
so a decode step's graph has the same shape whichever cells it uses (only the range grows, in steps of `kv_pad`).

Two operations change K/V outside a model's forward (a forward's own writes are `set_rows` nodes of the model's
graph); each builds and computes its own graph, which produces no output tensor (`ctx.forward(...).compute()`):

* shift: after `remove(seq, begin, end)` with a finite `end`, the keys of the later cells are re-rotated by
  `begin - end` positions with the model's `shift_fn` (get_rows -> shift_fn -> set_rows);
* defrag: the used cells are compacted to the front (get_rows of every moved row, then set_rows at its new index,
  per layer and tensor: a gather materialises the rows before any write, so overlapping moves are safe; for
  Q8_0/Q4_0 the dequantize-requantize round trip reproduces the blocks bit for bit).

Placement and defragmentation policy
------------------------------------
A token goes to the lowest free cell above every cell its sequence holds (`CellTable.ordered_free_cells`), so
each sequence's cells stay in position order. Attention visits cells in index order, so its sums then run in
the same order whatever the other sequences hold: a sequence's logits are the same alone or batched (with the
runtime's batch-invariant kernels, the default). When a sequence finds no free cell above its last one, the
cache compacts (order-preserving) and every free cell is above every used one.
Holes below the last used cell also cost attention work on every step (attention runs over
`[0, round_up(extent, kv_pad))`): if `defrag_holes` cells or more would be empty below the extent after placing
the batch, `start_forward` compacts first. With the default `defrag_holes = kv_pad` that
guarantees the attended range shrinks by at least one `kv_pad` block for every later step, for the price of one
row copy per moved cell and layer.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np

from kvcache.base import ForwardInputs, ShiftFn
from kvcache.cells import CellTable
from kvcache.errors import CacheFullError, NotSupportedError
from kvcache.masks import round_up
from kvcache.plans import DefragPlan, ShiftPlan
from ml.backend import Backend, Context, Tensor
from ml.batch import Batch
from ml.dtype import DType

log = logging.getLogger(__name__)

KV_TYPES = (DType.F32, DType.F16, DType.Q8_0, DType.Q4_0)
"""Element types a cache can store K/V as; the quantized ones need flash attention."""


STORE_TENSORS = 4096
"""Room of the context owning K/V: two tensors per layer, so models of up to 2048 layers."""


def check_kv_type(dtype: DType, flash: bool) -> None:
    """Raise NotSupportedError for a K/V type this cache cannot use (quantized K/V need the fused kernel)."""
    if dtype not in KV_TYPES:
        raise NotSupportedError(f"KV cache type {dtype.name} is not supported (use one of "
                                f"{', '.join(t.name.lower() for t in KV_TYPES)})")
    if dtype.is_quantized and not flash:
        raise NotSupportedError(f"a {dtype.name.lower()} KV cache needs flash attention (--flash-attn)")


class CausalCache:
    """Causal self-attention cache. `window` makes it a sliding-window cache (a cell is visible while
    pos - cell_pos <= window; cells no later token can see are freed), `chunk` a chunked-attention one (llama4:
    only cells of the token's chunk are visible). `defrag_holes` (default `kv_pad`): see the module docstring."""

    def __init__(self, shift_fn: ShiftFn | None = None, *, window: int | None = None, chunk: int | None = None,
                 kv_pad: int = 256, flash: bool = False, defrag_holes: int | None = None) -> None:
        if window is not None and window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if kv_pad < 1:
            raise ValueError(f"kv_pad must be >= 1, got {kv_pad}")
        self.shift_fn = shift_fn
        self.window = window
        self.chunk = chunk
        self.kv_pad = kv_pad
        self.flash = flash
        self.defrag_holes = kv_pad if defrag_holes is None else max(1, defrag_holes)
        self.cells: CellTable | None = None
        self._backend: Backend | None = None
        self._store: Any = None  # the context owning K/V tensors
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self._heads: dict[int, tuple[int, int, int, int]] = {}  # il -> (head_dim_k, n_head_k, head_dim_v, n_head_v)
        self.dtype = DType.F16
        self.capacity = 0
        self.max_batch = 0
        self._idx: Tensor | None = None
        self._mask: Tensor | None = None
        self._range = (0, 0)
        self._reserve = False
        self._prepared: ForwardInputs | None = None
        self._epoch = 0  # counts K/V (re)allocations: a graph built over older tensors must not run again
        self.n_defrags = 0  # how many compactions ran (diagnostics)

    # ---- runner side ----
    def init(self, backend: Backend, dtype: DType, max_sequences: int, capacity: int, max_batch: int) -> None:
        check_kv_type(dtype, self.flash)
        if max_sequences < 1 or capacity < 1 or max_batch < 1:
            raise ValueError(f"max_sequences, capacity and max_batch must be >= 1, got "
                             f"{max_sequences}, {capacity}, {max_batch}")
        if self.window is not None:
            # Eviction keeps, per sequence, the `window` positions before the batch's first one: only those plus
            # one batch ever need to be resident.
            capacity = min(capacity, max_sequences * self.window + max_batch)
        self.close()
        self._epoch += 1
        self.capacity = round_up(capacity, self.kv_pad)
        self.cells = CellTable(self.capacity, max_sequences)
        self.dtype = dtype
        self._backend = backend
        self._store = backend.new_context(max_nodes=STORE_TENSORS)
        self.max_batch = max_batch

    def start_forward(self, ctx: Context, batch: Batch, reserve: bool = False) -> None:
        """Place the batch and build its inputs. Raises CacheFullError, leaving the cache unchanged.

        With reserve=True nothing is stored, evicted or moved: the graph gets the worst-case layout (attention
        over every cell, writes of `batch.n_tokens` rows into a scratch tensor), so it can be sized or even run
        without touching the cache's contents. A batch placed ahead by `prepare` is not placed again."""
        prepared, self._prepared = self._prepared, None
        self._reserve = reserve
        if reserve:
            n = batch.n_tokens
            self._range = (0, self.capacity)
            inputs = ForwardInputs(batch, (), (np.arange(n, dtype=np.int64),
                                               np.zeros((n, self.capacity), dtype=self._mask_dtype())))
        elif prepared is not None and prepared.batch is batch:
            inputs = prepared
        else:
            inputs = self._place(batch)
        idx, mask = inputs.arrays
        self._idx = ctx.from_numpy(idx)
        self._mask = ctx.from_numpy(mask)

    def prepare(self, batch: Batch) -> ForwardInputs:
        """Place the batch now (as `start_forward` would) and return its input arrays; the next `start_forward`
        of this same batch uses them instead of placing it again. `key` names the graph layout they fit (the
        attended cell range): a caller that kept a graph built with the same key only refreshes its inputs."""
        self._prepared = self._place(batch)
        return self._prepared

    def _mask_dtype(self) -> type[np.float16] | type[np.float32]:
        return np.float16 if self.flash else np.float32

    def _place(self, batch: Batch) -> ForwardInputs:
        """Evict, place (compacting first when needed), store; the write indices and the mask."""
        cells = self._table()
        n = batch.n_tokens
        if n < 1:
            raise ValueError("empty batch")
        if self.window is not None:
            cells = self._evict(batch, n)
        # CacheFullError before anything moves
        placed = cells.place(batch.positions, batch.seqs, max_holes=self.defrag_holes)
        if placed is None:
            # a sequence reached the top, or too many holes would stay below the extent: compaction puts
            # every free cell above every used one
            self.defrag()
            placed = cells.place(batch.positions, batch.seqs)
            assert placed is not None
        self._range = cells.kv_range(self.kv_pad)
        mask = cells.mask(batch.positions, batch.seqs, kv_range=self._range, window=self.window,
                          chunk=self.chunk, spans=batch.spans, dtype=self._mask_dtype())
        return ForwardInputs(batch, (self._epoch, self._range), (placed, mask))

    def remove(self, seq: int, begin: int, end: int | None = None) -> None:
        """Forget seq's positions [begin, end); with a finite end the later ones move down and their keys are
        re-rotated. Raises NotSupportedError (nothing changed) when that shift is impossible: cells shared with
        another sequence, or no shift function."""
        self.check_remove(seq, begin, end)
        plan = self._table().remove(seq, begin, end)
        if plan is not None and plan.cells.size:
            self._shift(plan)

    def check_remove(self, seq: int, begin: int, end: int | None = None) -> None:
        """Raise what `remove(seq, begin, end)` would raise, changing nothing (lets a wrapper refuse an edit
        before any member applied it)."""
        cells = self._table()
        if end is not None and end < begin:
            raise ValueError(f"end {end} < begin {begin}")
        if end is None or end == begin:
            return
        moving = cells.seq_cells(seq)
        moving = moving[cells.positions[moving] >= end]
        if not moving.size:
            return
        if self.shift_fn is None and self.keys:
            raise NotSupportedError("this model's cache cannot shift positions (no shift function)")
        shared = moving[np.count_nonzero(cells.sequences[moving], axis=1) > 1]
        if shared.size:
            raise NotSupportedError(f"cannot shift sequence {seq} by {begin - end}: cells {shared.tolist()} are "
                                    f"shared with other sequences; re-process the prompt instead")

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self._table().copy_prefix(src, dst, n)

    def can_resume(self, seq: int, pos: int) -> bool:
        """A sliding-window cache needs the window before `pos`, a chunked one the start of `pos`'s chunk."""
        window = self.window
        if self.chunk is not None:
            window = pos % self.chunk if window is None else min(window, pos % self.chunk)
        return self._table().can_resume(seq, pos, window)

    def clear(self) -> None:
        self._table().clear()

    def close(self) -> None:
        self._epoch += 1
        self._prepared = None
        if self._store is not None:
            self._store.close()
            self._store = None
        self.keys.clear()
        self.values.clear()
        self._heads.clear()

    def defrag(self) -> bool:
        """Compact the used cells to the front on every layer (contents and masks unchanged, modulo the cell
        permutation). Returns whether anything moved."""
        cells = self._table()
        plan = cells.defrag_plan()
        if plan.is_noop:
            return False
        self._move(plan)
        cells.apply_moves(plan)
        self.n_defrags += 1
        log.debug("defrag: moved %d cells, extent now %d", plan.src.size, plan.n_used)
        return True

    # ---- model side ----
    def put(self, ctx: Context, il: int, k: Tensor, v: Tensor) -> None:
        """k [head_dim_k, n_head_kv, n_tokens], v [head_dim_v, n_head_kv, n_tokens]."""
        kd, kh, n = _dims3(k)
        vd, vh, _ = _dims3(v)
        if il not in self.keys:
            if self._store is None:
                raise RuntimeError("cache used before init() or after close()")
            bs = self.dtype.block_size
            if kd % bs or vd % bs:
                raise NotSupportedError(f"a {self.dtype.name.lower()} KV cache needs head sizes that are multiples "
                                        f"of {bs}, not {kd}/{vd}")
            self.keys[il] = self._store.layer(il).zeros(self.dtype, kd * kh, self.capacity)
            self.values[il] = self._store.layer(il).zeros(self.dtype, vd * vh, self.capacity)
            self._heads[il] = (kd, kh, vd, vh)
        assert self._idx is not None, "start_forward must precede put"
        keys, values = self.keys[il], self.values[il]
        if self._reserve:  # same work, but into scratch rows: a reserve graph never changes the cache
            keys, values = ctx.empty(self.dtype, kd * kh, n), ctx.empty(self.dtype, vd * vh, n)
        ctx.forward(keys.set_rows(ctx, k.reshape(ctx, kd * kh, n), self._idx),
                    values.set_rows(ctx, v.reshape(ctx, vd * vh, n), self._idx))

    def get(self, ctx: Context, il: int) -> tuple[Tensor, Tensor, Tensor | None]:
        if il not in self._heads:
            raise RuntimeError(f"layer {il}: get before put")
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

    def _evict(self, batch: Batch, n: int) -> CellTable:
        """Sliding window: free what no token of this batch (or later) can see; if the batch still does not fit,
        put everything back and raise CacheFullError."""
        cells = self._table()
        saved = copy.deepcopy(cells) if cells.n_free < n else None  # only when eviction might not be enough
        assert self.window is not None
        cells.evict_outside_window(batch.positions, batch.seqs, self.window)
        if saved is not None and cells.n_free < n:
            self.cells = saved
            raise CacheFullError(f"need {n} cells, only {cells.n_free} of {self.capacity} free after evicting "
                                 f"what the window hides")
        return cells

    def _new_ctx(self) -> Context:
        assert self._backend is not None
        return self._backend.new_context(max_nodes=32 * len(self.keys) + 64)

    def _move(self, plan: DefragPlan) -> None:
        """Copy rows plan.src -> plan.dst of every K and V, in one graph (no outputs)."""
        if self._backend is None or not self.keys:
            return
        ctx = self._new_ctx()
        try:
            src = ctx.from_numpy(plan.src.astype(np.int32))
            dst = ctx.from_numpy(plan.dst.astype(np.int64))
            outs = []
            for t in (*self.keys.values(), *self.values.values()):
                rows = t.get_rows(ctx, src)  # a separate f32 tensor: no write can clobber a source row
                outs.append(t.set_rows(ctx, rows, dst))
            ctx.forward(*outs).compute()
        finally:
            ctx.close()

    def _shift(self, plan: ShiftPlan) -> None:
        """Re-rotate the keys of the shifted cells on every layer, in one graph (no outputs)."""
        if self._backend is None or not self.keys:
            return
        if self.shift_fn is None:
            raise NotSupportedError("this model's cache cannot shift positions (no shift function)")
        ctx = self._new_ctx()
        try:
            n = plan.cells.size
            cells = ctx.from_numpy(plan.cells.astype(np.int64))
            cells32 = ctx.from_numpy(plan.cells.astype(np.int32))
            delta = ctx.from_numpy(np.full(n, plan.delta, dtype=np.int32))
            outs = []
            for il, keys in self.keys.items():
                kd, kh, _, _ = self._heads[il]
                rows = keys.get_rows(ctx, cells32).reshape(ctx, kd, kh, n)  # f32
                rotated = self.shift_fn(ctx, il, rows, delta)
                outs.append(keys.set_rows(ctx, rotated.reshape(ctx, kd * kh, n), cells))
            ctx.forward(*outs).compute()
        finally:
            ctx.close()


def _dims3(t: Tensor) -> tuple[int, int, int]:
    s = tuple(t.shape) + (1, 1, 1)
    return s[0], s[1], s[2]
