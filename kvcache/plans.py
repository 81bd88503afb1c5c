"""Plans the cell table hands to the tensor layer: what to do to K/V rows.

The cell table only tracks metadata.  When an operation changes where data
lives (defragmentation) or what a stored key means (a position shift after
removing tokens from the middle of a sequence), it returns one of these
immutable plans, and the tensor-storing cache replays it on every layer's
K/V tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, eq=False)
class ShiftPlan:
    """Keys whose position changed by ``delta`` and must be re-rotated (RoPE).

    The table's positions are already updated when this is returned; the
    tensor layer calls the model's shift callback so that each listed cell's
    key carries the rotation of its new position.  Values need nothing.

    Attributes:
        seq: the sequence whose cells moved.
        cells: int32[k] ascending indices of the shifted cells.
        delta: position change of every listed cell (negative after a removal).
        new_positions: int32[k] positions of those cells after the shift.
    """

    seq: int
    cells: NDArray[np.int32]
    delta: int
    new_positions: NDArray[np.int32]

    @property
    def cell_range(self) -> tuple[int, int]:
        """Smallest ``[start, stop)`` of cells covering every shifted cell."""
        return int(self.cells[0]), int(self.cells[-1]) + 1

    def offsets(self, start: int, stop: int) -> NDArray[np.int32]:
        """Dense int32[stop - start] per-cell shift over cells ``[start, stop)``.

        ``delta`` at the shifted cells, 0 elsewhere -- the form a single
        ``rope(keys_view, offsets)`` node over a contiguous K view needs
        (re-rotating a key by 0 is the identity).
        """
        out = np.zeros(stop - start, dtype=np.int32)
        inside = self.cells[(self.cells >= start) & (self.cells < stop)]
        out[inside - start] = self.delta
        return out


@dataclass(frozen=True, eq=False)
class DefragPlan:
    """Compaction of the used cells to ``[0, n_used)``, keeping their order.

    Attributes:
        order: int32[n_used]; after compaction cell ``i`` holds what cell
            ``order[i]`` held before (ascending).
        src: int32[k] old indices of the cells that actually move (ascending).
        dst: int32[k] their new indices; ``dst < src`` element-wise.
        version: table version the plan was computed for (stale-plan guard).

    Tensor layer: the overlap-proof way is a gather then a scatter in one
    graph per K/V tensor, ``rows = get_rows(K, src); set_rows(K, rows, dst)``
    (get_rows materialises a separate tensor before any write).  Copying
    views with :attr:`runs` also works if the runs are executed in order and
    a run with ``length > src_start - dst_start`` (source and destination
    overlap) goes through a temporary.
    """

    order: NDArray[np.int32]
    src: NDArray[np.int32]
    dst: NDArray[np.int32]
    version: int

    @property
    def n_used(self) -> int:
        """Number of used cells (all in ``[0, n_used)`` after the plan)."""
        return int(self.order.size)

    @property
    def is_noop(self) -> bool:
        """True when the used cells are already packed at the front."""
        return self.src.size == 0

    @property
    def runs(self) -> list[tuple[int, int, int]]:
        """Maximal contiguous moves ``(src_start, dst_start, length)``, in order."""
        if self.src.size == 0:
            return []
        # A run breaks where the source jumps over a hole; destinations of
        # moved cells are always consecutive.
        breaks = np.flatnonzero(np.diff(self.src) != 1) + 1
        starts = np.concatenate(([0], breaks))
        lengths = np.diff(np.concatenate((starts, [self.src.size])))
        return [
            (int(self.src[s]), int(self.dst[s]), int(n))
            for s, n in zip(starts, lengths)
        ]
