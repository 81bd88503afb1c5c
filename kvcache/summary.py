"""What a decode step needs to know about a CellTable, kept up to date instead of recomputed from it every step.

A decode step asks three things of the cell table: how many cells are used, where the used ones end (the
extent, which sets the attended range), and, per sequence, the last cell it holds (its next token must go above
it). Answering them from the arrays costs a dozen numpy passes over every cell, and on a decode step the interpreter
runs with caches that the graph compute has just flushed: ~150 µs of a step's Python time. A `CellSummary` holds
the answers in one small int64 array. A decode step's eviction and placement (C, ggml/host.py) update it in place,
as do `CellTable.store` and the general eviction; every other mutation drops it and the next query rebuilds it from
the arrays (one pass).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


class CellSummary:
    """n_used, extent and each sequence's last cell, in one int64 array (`values`: n_used, extent, then per
    sequence its highest cell, -1 when none), which a decode step's placement in C (ggml/host.py) reads and
    updates in place."""

    __slots__ = ("values",)

    def __init__(self, values: NDArray[np.int64]) -> None:
        self.values = values

    @property
    def n_used(self) -> int:
        return int(self.values[0])

    @property
    def extent(self) -> int:
        """1 + the last used cell, 0 when none is."""
        return int(self.values[1])

    @property
    def last(self) -> NDArray[np.int64]:
        """Per sequence, the highest cell it holds; -1 when none (a view)."""
        return self.values[2:]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CellSummary) and np.array_equal(self.values, other.values)

    def __repr__(self) -> str:
        return f"CellSummary(n_used={self.n_used}, extent={self.extent}, last={self.last.tolist()})"

    @staticmethod
    def of(pos: NDArray[np.int32], member: NDArray[np.bool_]) -> CellSummary:
        """Computed from a table's arrays: positions int32[capacity], membership bool[max_sequences, capacity]."""
        used = np.flatnonzero(pos >= 0)
        capacity = pos.size
        held = member.any(axis=1)
        values = np.empty(2 + member.shape[0], dtype=np.int64)
        values[0] = used.size
        values[1] = int(used[-1]) + 1 if used.size else 0
        values[2:] = np.where(held, capacity - 1 - member[:, ::-1].argmax(axis=1), -1)
        return CellSummary(values)

    def stored(self, cells: list[int], seqs: list[int]) -> None:
        """Record cells that were empty and now hold seqs[i] each."""
        v = self.values
        v[0] += len(cells)
        v[1] = max(int(v[1]), max(cells) + 1)
        for c, s in zip(cells, seqs):
            if c > v[2 + s]:
                v[2 + s] = c

    def evicted(self, rows: list[int], drop: NDArray[np.bool_], freed: NDArray[np.int32]) -> bool:
        """Follow an eviction (`drop[i]`: the cells sequence rows[i] lost; `freed`: the cells that became empty,
        ascending); False when it cannot be followed cheaply and the summary must be rebuilt: it took a sequence's
        last cell or the extent's cell (a window drops a sequence's oldest cells, so normally neither)."""
        if freed.size and int(freed[-1]) + 1 >= self.extent:
            return False
        last = self.last.tolist()
        if any(last[s] >= 0 and drop[i, last[s]] for i, s in enumerate(rows)):
            return False
        self.values[0] -= int(freed.size)
        return True
