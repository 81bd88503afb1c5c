"""Cheap checks on the small integer arrays a forward batch hands the cell table (positions, sequence ids, cells).

A decode step's arrays hold a handful of entries, where numpy's per-call cost exceeds the work: up to SMALL entries
are checked in plain Python, larger ones with numpy. Results are the same either way.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

SMALL = 64  # arrays up to this size are checked in plain Python (cheaper than numpy's per-call cost)


def bounds(a: NDArray[Any]) -> tuple[int, int]:
    """(min, max) of a non-empty integer array."""
    if a.size <= SMALL:
        values = a.tolist()
        return min(values), max(values)
    return int(a.min()), int(a.max())


def all_distinct(a: NDArray[Any]) -> bool:
    """Whether no value occurs twice (a batch with one token per sequence, cells without duplicates)."""
    return (len(set(a.tolist())) if a.size <= SMALL else int(np.unique(a).size)) == a.size


def batch_arrays(positions: ArrayLike, seqs: ArrayLike,
                 pos_dtype: type[np.int32] | type[np.int64]) -> tuple[NDArray[Any], NDArray[np.intp]]:
    """A batch's positions and sequence ids as arrays; raises ValueError unless both are 1-D of one length."""
    pos = np.asarray(positions, dtype=pos_dtype)
    seq = np.asarray(seqs, dtype=np.intp)
    if pos.ndim != 1 or seq.shape != pos.shape:
        raise ValueError(f"positions {pos.shape} and seqs {seq.shape} must be equal 1-D")
    # contiguous, as the C loops of a decode step read them (a strided view is copied)
    return np.ascontiguousarray(pos), np.ascontiguousarray(seq)


def readonly(a: NDArray[Any]) -> NDArray[Any]:
    """A view of `a` that cannot be written through."""
    view = a.view()
    view.flags.writeable = False
    return view
