"""Bookkeeping of KV cache cells: who holds what, where (a decode step's loops run in C: ggml/host.py).

Model
-----
A cache has ``capacity`` cells; every layer's K and V tensors have one row
per cell, so a cell index addresses the same slot in all of them.  A cell
has a position (int32, ``-1`` = empty) and a set of sequence ids, kept as a
boolean membership table.  Several sequences may share a cell: that is how
:meth:`CellTable.copy_prefix` shares a prompt prefix without copying data.
Invariant: a cell's position is ``-1`` exactly when no sequence holds it.

A forward batch is two parallel arrays: token positions (int32[n_tokens])
and sequence ids (int32[n_tokens]), one sequence per token.

This module never touches tensors: work on K/V is returned as a plan
(:class:`~kvcache.plans.DefragPlan`, :class:`~kvcache.plans.ShiftPlan`).

Public API (:class:`CellTable`)
-------------------------------
Allocation: ``free_cells``, ``ordered_free_cells`` (cells that keep each
sequence in position order, or None when only a defrag makes room),
``place`` (that, and ``store``, in one call), ``find_slot``, ``defrag_plan``
/ ``apply_moves``, ``store``, ``free``; the allocators raise
:class:`~kvcache.errors.CacheFullError` when fewer than ``n`` cells are
free at all.  Masks: ``kv_range``, ``mask`` (layout and visibility rule in
:mod:`kvcache.masks`).  Sequence edits: ``remove``, ``copy_prefix``,
``can_resume``, ``evict_outside_window``.  Queries: ``seq_cells``,
``seq_positions``, ``max_pos``, ``positions``, ``sequences``, ``n_used``,
``n_free``, ``extent``, ``version``; ``clear()``.

How the tensor layer should use it (one forward batch)
------------------------------------------------------
1. Sliding-window caches first call ``evict_outside_window(positions,
   seqs, window)`` so cells no token can see any more become free.
2. Pick and store the write cells: ``cells = table.place(positions,
   seqs)`` (after a defrag when it returns None; ``ordered_free_cells`` and
   then ``store`` do the same in two calls), and write K/V with
   ``ggml_set_rows(K, k_cur, cells_tensor)``: the write locations are an
   input tensor, so the graph's shape does not depend on where the free
   cells are.  Contiguous alternative: ``find_slot(n)``, after a defrag
   (``defrag_plan``, moving the K/V rows, ``apply_moves``) when it returns
   None.  Storing comes before the mask, so the batch's own cells are
   visible (causally) to the batch.
3. ``start, stop = table.kv_range(pad)``; attend over the K/V views of
   cells ``[start, stop)`` with ``table.mask(..., kv_range=(start, stop))``.
   The default range ``[0, round_up(extent, pad))`` changes width only every
   ``pad`` cells, so decode-step graphs keep their shapes; choose
   ``capacity`` as a multiple of ``pad``.  Cells in the range that belong to
   other sequences or are empty are simply masked.
4. After a ``remove`` that returns a :class:`ShiftPlan`, re-rotate the keys
   of ``plan.cells`` by ``plan.delta`` on every layer (model callback)
   before the next forward; the positions here are already updated.

Every method validates before mutating: when it raises, the table is
unchanged.  ``version`` increases on every mutation; a
:class:`~kvcache.plans.DefragPlan` is only applicable to the version it was
computed for.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ggml.host import PLACE_MAX, evict_decode, place_decode
from kvcache.arrays import all_distinct, batch_arrays, bounds, readonly
from kvcache.errors import CacheFullError, NotSupportedError
from kvcache.masks import (
    KV_PAD_DEFAULT,
    ROW_PAD_DEFAULT,
    MaskDType,
    round_up,
    table_mask,
)
from kvcache.plans import DefragPlan, ShiftPlan
from kvcache.summary import CellSummary

EMPTY = -1
"""Position of an empty cell."""


class CellTable:
    """Positions and sequence membership of ``capacity`` KV cells.

    Storage: ``_pos`` int32[capacity] and ``_member``
    bool[max_sequences, capacity] (sequence-major, so the membership rows
    for a batch, ``_member[seqs, start:stop]``, come out as the mask's
    ``(n_tokens, n_kv)`` layout directly).
    """

    def __init__(self, capacity: int, max_sequences: int) -> None:
        if capacity < 1 or max_sequences < 1:
            raise ValueError(
                f"capacity and max_sequences must be >= 1, got {capacity}, {max_sequences}"
            )
        self._capacity = capacity
        self._max_sequences = max_sequences
        self._pos: NDArray[np.int32] = np.full(capacity, EMPTY, dtype=np.int32)
        self._member: NDArray[np.bool_] = np.zeros((max_sequences, capacity), dtype=np.bool_)
        self._version = 0
        self._summary: CellSummary | None = None  # None: stale, rebuilt from the arrays when next asked

    # ------------------------------------------------------------------ queries

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_sequences(self) -> int:
        return self._max_sequences

    @property
    def version(self) -> int:
        """Mutation counter (guards against applying stale plans)."""
        return self._version

    @property
    def positions(self) -> NDArray[np.int32]:
        """Read-only live view: int32[capacity] cell positions (-1 = empty)."""
        return readonly(self._pos)

    @property
    def sequences(self) -> NDArray[np.bool_]:
        """Read-only live view: bool[capacity, max_sequences], [cell, seq]."""
        return readonly(self._member.T)

    @property
    def n_used(self) -> int:
        return self._summarized().n_used

    @property
    def n_free(self) -> int:
        return self._capacity - self.n_used

    @property
    def extent(self) -> int:
        """1 + index of the last used cell (0 when empty)."""
        return self._summarized().extent

    def seq_cells(self, seq: int) -> NDArray[np.int32]:
        """int32[k] ascending indices of the cells holding ``seq``."""
        self._check_seq(seq)
        return np.flatnonzero(self._member[seq]).astype(np.int32)

    def seq_positions(self, seq: int) -> NDArray[np.int32]:
        """int32[k] sorted positions ``seq`` holds."""
        self._check_seq(seq)
        return np.sort(self._pos[self._member[seq]])

    def max_pos(self, seq: int) -> int:
        """Highest position ``seq`` holds, -1 if none."""
        self._check_seq(seq)
        held = self._pos[self._member[seq]]
        return int(held.max()) if held.size else EMPTY

    # --------------------------------------------------------------- allocation

    def free_cells(self, n: int) -> NDArray[np.int32]:
        """int32[n] lowest-index free cells (not necessarily contiguous).

        Raises:
            CacheFullError: fewer than ``n`` cells are free.
        """
        self._check_count(n)
        free = np.flatnonzero(self._pos < 0)
        if free.size < n:
            raise CacheFullError(f"need {n} cells, only {free.size} of {self._capacity} free")
        return free[:n].astype(np.int32)

    def ordered_free_cells(self, positions: ArrayLike, seqs: ArrayLike) -> NDArray[np.int32] | None:
        """int32[n] cells for a batch such that each sequence's cells stay in position order: every token gets a
        free cell above all cells its sequence already holds, in the order of its position among the batch's
        tokens of that sequence (lowest such cells first).

        Why: attention visits cells in index order; in position order a sequence's attention sums run the same way
        whatever other sequences hold the cells in between. Returns None when some sequence has too few free cells
        above its last one; after a compaction (:meth:`defrag_plan`, order kept) this succeeds whenever ``n``
        cells are free.

        Raises:
            CacheFullError: fewer than ``n`` cells are free at all.
        """
        pos, seq = batch_arrays(positions, seqs, np.int32)
        return self._ordered(pos, seq)

    def place(self, positions: ArrayLike, seqs: ArrayLike, max_holes: int | None = None) -> NDArray[np.int64] | None:
        """:meth:`ordered_free_cells` and :meth:`store` in one call (one validation): the cells taken (int64, the
        set_rows indices), or None, storing nothing, when ordered placement finds no room or would leave
        ``max_holes`` or more empty cells below the extent (a compaction then helps both). A decode step (one token
        per sequence) is placed by one C call (ggml/host.py), which updates the summary in place.

        Raises:
            CacheFullError: fewer than ``n`` cells are free at all.
            ValueError: bad shapes, sequence ids or positions.
        """
        pos, seq = batch_arrays(positions, seqs, np.int32)
        if pos.size == 0:
            raise ValueError("empty batch")
        _check_positions(pos)
        if pos.size <= PLACE_MAX and all_distinct(seq):
            self._check_seqs(seq)
            self._check_free(pos.size)
            placed = place_decode(self._pos, self._member, self._summarized().values, seq, pos, max_holes)
            self._version += placed is not None  # stored: a mutation
            return placed
        cells = self._ordered(pos, seq)
        if cells is None:
            return None
        if max_holes is not None and max(self.extent, bounds(cells)[1] + 1) - self.n_used - cells.size >= max_holes:
            return None
        self._commit(cells, pos, seq)
        return cells.astype(np.int64)

    def _ordered(self, pos: NDArray[np.int32], seq: NDArray[np.intp]) -> NDArray[np.int32] | None:
        self._check_seqs(seq)
        self._check_free(pos.size)
        if pos.size <= PLACE_MAX and all_distinct(seq):  # a decode step: place's C loop, storing nothing
            cells = place_decode(self._pos, self._member, self._summarized().values, seq, pos, None, store=False)
            return None if cells is None else cells.astype(np.int32)
        return self._cells_by_sequence(pos, seq, self._pos < 0)

    def _cells_by_sequence(self, pos: NDArray[np.int32], seq: NDArray[np.intp],
                           free: NDArray[np.bool_]) -> NDArray[np.int32] | None:
        """ordered_free_cells, one sequence of the batch after the other (ascending ids)."""
        out = np.empty(pos.size, dtype=np.int32)
        for s in np.unique(seq):  # the sequences of one batch: a handful
            rows = np.flatnonzero(seq == s)
            rows = rows[np.argsort(pos[rows], kind="stable")]
            held = np.flatnonzero(self._member[s])
            floor = int(held[-1]) + 1 if held.size else 0
            cand = np.flatnonzero(free[floor:])[:rows.size] + floor
            if cand.size < rows.size:
                return None
            out[rows] = cand
            free[cand] = False
        return out

    def find_slot(self, n: int) -> int | None:
        """Start of the first run of ``n`` contiguous free cells.

        Returns None when ``n`` cells are free but scattered: run
        :meth:`defrag_plan` / :meth:`apply_moves` and call again.

        Raises:
            CacheFullError: fewer than ``n`` cells are free at all.
        """
        self._check_count(n)
        free = self._pos < 0
        n_free = int(np.count_nonzero(free))
        if n_free < n:
            raise CacheFullError(f"need {n} cells, only {n_free} of {self._capacity} free")
        # Run boundaries of the free mask: +1 where a run starts, -1 past its end.
        edges = np.diff(np.concatenate(([0], free.view(np.int8), [0])))
        starts = np.flatnonzero(edges == 1)
        lengths = np.flatnonzero(edges == -1) - starts
        fits = np.flatnonzero(lengths >= n)
        return int(starts[fits[0]]) if fits.size else None

    def defrag_plan(self) -> DefragPlan:
        """Plan moving all used cells to ``[0, n_used)`` in their current order."""
        order = np.flatnonzero(self._pos >= 0).astype(np.int32)
        target = np.arange(order.size, dtype=np.int32)
        moved = order != target
        return DefragPlan(order=order, src=order[moved], dst=target[moved], version=self._version)

    def apply_moves(self, plan: DefragPlan) -> None:
        """Apply a compaction from :meth:`defrag_plan` to the metadata.

        Raises:
            ValueError: the plan was computed for another table state.
        """
        if plan.version != self._version:
            raise ValueError(
                f"stale defrag plan (computed at version {plan.version}, table is at {self._version})"
            )
        if plan.is_noop:
            return
        n = plan.n_used
        # Gather first (fancy indexing copies), then write in place so views
        # handed out by ``positions`` / ``sequences`` stay live.
        pos = self._pos[plan.order]
        member = self._member[:, plan.order]
        self._pos[:n] = pos
        self._pos[n:] = EMPTY
        self._member[:, :n] = member
        self._member[:, n:] = False
        self._mutated()

    def store(
        self, cells: int | ArrayLike, positions: ArrayLike, seqs: ArrayLike
    ) -> NDArray[np.int32]:
        """Mark cells used by a batch's tokens.

        Args:
            cells: start of a contiguous run (from :meth:`find_slot`) or
                int[n_tokens] cell indices (from :meth:`free_cells`).
            positions: int32[n_tokens] token positions (>= 0).
            seqs: int32[n_tokens] sequence ids.

        Returns:
            int32[n_tokens] cell index of each token -- the ``set_rows`` indices.

        Raises:
            ValueError: bad shapes/ids, or a target cell is not free.
        """
        pos, seq = batch_arrays(positions, seqs, np.int32)
        n = pos.size
        if isinstance(cells, (int, np.integer)):
            idx = np.arange(int(cells), int(cells) + n, dtype=np.intp)
        else:
            idx = np.asarray(cells, dtype=np.intp)
            if idx.shape != pos.shape:
                raise ValueError(f"cells {idx.shape} must match positions {pos.shape}")
            if not all_distinct(idx):
                raise ValueError("duplicate cell indices")
        if n == 0:
            return idx.astype(np.int32)
        lo, hi = bounds(idx)
        if lo < 0 or hi >= self._capacity:
            raise ValueError(f"cell indices outside [0, {self._capacity})")
        _check_positions(pos)
        self._check_seqs(seq)
        busy = idx[self._pos[idx] >= 0]
        if busy.size:
            raise ValueError(f"cells already in use: {busy.tolist()}")
        self._commit(idx, pos, seq)
        return idx.astype(np.int32)

    def _commit(self, idx: NDArray[Any], pos: NDArray[np.int32], seq: NDArray[np.intp]) -> None:
        """Store validated tokens in free cells."""
        self._pos[idx] = pos
        self._member[seq, idx] = True
        self._version += 1
        if self._summary is not None and idx.size <= PLACE_MAX:
            self._summary.stored(idx.tolist(), seq.tolist())
        else:
            self._summary = None

    def free(self, cells: ArrayLike) -> None:
        """Empty ``cells`` entirely (every sequence loses them)."""
        idx = np.asarray(cells, dtype=np.intp)
        if idx.size and (idx.min() < 0 or idx.max() >= self._capacity):
            raise ValueError(f"cell indices outside [0, {self._capacity})")
        self._pos[idx] = EMPTY
        self._member[:, idx] = False
        self._mutated()

    def clear(self) -> None:
        """Empty every cell."""
        self._pos.fill(EMPTY)
        self._member.fill(False)
        self._mutated()

    # -------------------------------------------------------------------- masks

    def kv_range(self, pad: int = KV_PAD_DEFAULT, seqs: ArrayLike | None = None) -> tuple[int, int]:
        """Cell range ``[start, stop)`` a batch should attend over.

        Default: ``[0, round_up(extent, pad))`` -- stable shapes across decode
        steps.  With ``seqs``: the padded span of the cells holding any of
        those sequences (narrower when other sequences sit elsewhere; start
        rounded down, stop rounded up to ``pad``).  ``stop`` is clipped to
        ``capacity``; ``(0, 0)`` when there is nothing to cover.
        """
        if seqs is None:
            extent = self.extent
            return (0, min(self._capacity, round_up(extent, pad))) if extent else (0, 0)
        s = np.unique(np.asarray(seqs, dtype=np.intp))
        self._check_seqs(s)
        idx = np.flatnonzero(np.any(self._member[s], axis=0))
        if idx.size == 0:
            return 0, 0
        return int(idx[0]) // pad * pad, min(self._capacity, round_up(int(idx[-1]) + 1, pad))

    def mask(
        self,
        positions: ArrayLike,
        seqs: ArrayLike,
        *,
        kv_range: tuple[int, int] | None = None,
        kv_pad: int = KV_PAD_DEFAULT,
        row_pad: int = ROW_PAD_DEFAULT,
        window: int | None = None,
        chunk: int | None = None,
        causal: bool | NDArray[np.bool_] = True,
        spans: NDArray[np.int32] | None = None,
        dtype: MaskDType = np.float32,
    ) -> NDArray[np.floating[Any]]:
        """Additive attention mask of a (stored) batch over a cell range.

        Args:
            positions: int32[n_tokens] token positions.
            seqs: int32[n_tokens] sequence ids.
            kv_range: ``[start, stop)`` cells (columns); default
                ``kv_range(kv_pad)``.  Column ``j`` is cell ``start + j``.
            kv_pad: padding multiple of the default range (ignored when
                ``kv_range`` is given).
            row_pad: rows are padded to a multiple of this; padding rows are
                all ``-inf``.
            window, chunk, causal, spans: visibility rule, see :mod:`kvcache.masks`.
            dtype: np.float32, or np.float16 for ``ggml_flash_attn_ext``.

        Returns:
            ``(round_up(n_tokens, row_pad), stop - start)`` array of 0/-inf
            (ggml ``ne = [n_kv, n_rows]``).
        """
        pos, seq = batch_arrays(positions, seqs, np.int32)
        if seq.size:
            self._check_seqs(seq)
        start, stop = self.kv_range(kv_pad) if kv_range is None else kv_range
        if not 0 <= start <= stop <= self._capacity:
            raise ValueError(f"kv_range {(start, stop)} outside [0, {self._capacity}]")
        return table_mask(
            self._pos,
            self._member,
            (start, stop),
            seq,
            pos,
            window=window,
            chunk=chunk,
            causal=causal,
            spans=spans,
            n_rows=round_up(pos.size, row_pad),
            dtype=dtype,
        )

    # ----------------------------------------------------------- sequence edits

    def remove(self, seq: int, begin: int, end: int | None = None) -> ShiftPlan | None:
        """Drop ``seq``'s cells with ``begin <= pos < end`` (``end=None``: no bound).

        With a finite ``end``, ``seq``'s cells at ``pos >= end`` move down by
        ``end - begin`` positions so the sequence stays gap-free; the
        returned plan lists them for key re-rotation.  Cells shared with other
        sequences only lose ``seq``'s membership when removed.

        Returns:
            A :class:`ShiftPlan` when cells were shifted, else None.

        Raises:
            NotSupportedError: a cell to shift is shared with another
                sequence (its key cannot hold two positions); nothing changed.
            ValueError: ``end < begin`` or bad ``seq``.
        """
        self._check_seq(seq)
        if end is not None and end < begin:
            raise ValueError(f"end {end} < begin {begin}")
        held = self._member[seq]
        to_drop = held & (self._pos >= begin)
        shift_idx = np.empty(0, dtype=np.intp)
        if end is not None:
            to_drop &= self._pos < end
            shift_idx = np.flatnonzero(held & (self._pos >= end)) if end > begin else shift_idx
            sharers = np.count_nonzero(self._member[:, shift_idx], axis=0) > 1
            if sharers.any():
                bad = shift_idx[sharers]
                others = np.flatnonzero(self._member[:, bad].any(axis=1))
                others = others[others != seq]
                raise NotSupportedError(
                    f"cannot shift sequence {seq} by {begin - end}: cells {bad.tolist()} "
                    f"(positions {self._pos[bad].tolist()}) are shared with sequences "
                    f"{others.tolist()}; re-process the prompt instead"
                )
        drop_idx = np.flatnonzero(to_drop)
        self._member[seq, drop_idx] = False
        self._release_orphans(drop_idx)
        plan: ShiftPlan | None = None
        if shift_idx.size:
            assert end is not None
            delta = begin - end
            self._pos[shift_idx] += delta
            plan = ShiftPlan(
                seq=seq,
                cells=shift_idx.astype(np.int32),
                delta=delta,
                new_positions=self._pos[shift_idx].copy(),
            )
        self._mutated()
        return plan

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make ``dst`` share ``src``'s cells with position < ``n`` (no data copy).

        ``dst``'s previous cells are dropped first (``src == dst`` therefore
        truncates the sequence to positions < ``n``).
        """
        self._check_seq(src)
        self._check_seq(dst)
        shared = self._member[src] & (self._pos < n)
        old_idx = np.flatnonzero(self._member[dst])
        self._member[dst] = shared
        self._release_orphans(old_idx)
        self._mutated()

    def can_resume(self, seq: int, pos: int, window: int | None = None) -> bool:
        """Whether ``seq`` can continue with a token at ``pos`` from this cache.

        The next token sees positions ``pos - window .. pos - 1`` of the past
        (all of ``0 .. pos - 1`` when ``window`` is None); every one of them
        must still be held.  A sliding-window cache that evicted them, or a
        sequence that never reached ``pos - 1``, cannot resume.
        """
        self._check_seq(seq)
        lo = 0 if window is None else max(0, pos - window)
        if pos <= lo:
            return True
        held = self._pos[self._member[seq]]
        needed = held[(held >= lo) & (held < pos)]
        return int(np.unique(needed).size) == pos - lo

    def evict_outside_window(
        self, positions: ArrayLike, seqs: ArrayLike, window: int
    ) -> NDArray[np.int32]:
        """Free what no token of this batch (or later) can see any more.

        For every sequence in the batch, with ``p`` its lowest position in the
        batch, its cells at positions ``< p - window`` are dropped: the batch
        sees ``>= p - window`` and later batches start higher.  Pass a larger
        ``window`` (Ollama's "SWA memory") to keep more for resuming.  With
        this, ``max_sequences * window + max_batch`` cells suffice.  Call it
        before allocating the batch's cells.

        Returns:
            int32[k] ascending indices of the cells that became empty.
        """
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        pos, seq = batch_arrays(positions, seqs, np.int64)
        if seq.size == 0:
            return np.empty(0, dtype=np.int32)
        self._check_seqs(seq)
        if bounds(pos)[1] <= window:
            # no position lies below any token's window (a sequence's first `window` steps): nothing to drop, and
            # found without the numpy passes below (this runs on every decode step of a sliding-window model)
            self._version += 1
            return np.empty(0, dtype=np.int32)
        if seq.size <= PLACE_MAX and all_distinct(seq):  # a decode step: one C pass that keeps the summary
            self._version += 1
            return evict_decode(self._pos, self._member, self._summarized().values, seq, pos - window)
        lowest = np.full(self._max_sequences, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(lowest, seq, pos)
        rows = np.unique(seq)
        threshold = lowest[rows] - window  # int64: no underflow
        if int(threshold.max()) <= 0:  # no position lies below: nothing to drop (the early steps of a sequence)
            self._version += 1
            return np.empty(0, dtype=np.int32)
        drop = self._member[rows] & (self._pos[np.newaxis, :] < threshold[:, np.newaxis])
        touched = np.flatnonzero(drop.any(axis=0))
        self._member[rows] &= ~drop
        freed = self._release_orphans(touched)
        self._version += 1
        if self._summary is not None and not self._summary.evicted(rows.tolist(), drop, freed):
            self._summary = None
        return freed

    # ------------------------------------------------------------------ helpers

    def _summarized(self) -> CellSummary:
        if self._summary is None:
            self._summary = CellSummary.of(self._pos, self._member)
        return self._summary

    def _mutated(self) -> None:
        """A change the summary does not follow: it is rebuilt when next asked."""
        self._version += 1
        self._summary = None

    def _release_orphans(self, idx: NDArray[np.intp]) -> NDArray[np.int32]:
        """Mark cells among ``idx`` that no sequence holds as empty; return them."""
        orphans = idx[~self._member[:, idx].any(axis=0)]
        self._pos[orphans] = EMPTY
        return orphans.astype(np.int32)

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self._max_sequences:
            raise ValueError(f"sequence id {seq} outside [0, {self._max_sequences})")

    def _check_seqs(self, seqs: NDArray[np.intp]) -> None:
        if seqs.size:
            lo, hi = bounds(seqs)
            if lo < 0 or hi >= self._max_sequences:
                raise ValueError(f"sequence ids outside [0, {self._max_sequences})")

    def _check_free(self, n: int) -> None:
        n_free = self._capacity - self.n_used
        if n_free < n:
            raise CacheFullError(f"need {n} cells, only {n_free} of {self._capacity} free")

    @staticmethod
    def _check_count(n: int) -> None:
        if n < 1:
            raise ValueError(f"number of cells must be >= 1, got {n}")


def _check_positions(pos: NDArray[np.int32]) -> None:
    """Raise ValueError for a negative token position (a non-empty batch)."""
    if bounds(pos)[0] < 0:
        raise ValueError("positions must be >= 0")
