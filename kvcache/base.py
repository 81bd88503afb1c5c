"""The cache interface: one part for models (put/get per layer), one for the runner (lifecycle and edits)."""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt

from ml.backend import Backend, Context, Tensor
from ml.batch import Batch
from ml.dtype import DType

# Re-rotates cached keys: (ctx, il, key [head_dim, n_head_kv, n], delta I32 [n]) -> rotated key (same shape).
ShiftFn = Callable[[Context, int, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ForwardInputs:
    """A placed batch's cache inputs, ahead of its graph (`prepare`): the arrays `start_forward` turns into input
    tensors (with `from_numpy`, in this order), and a key naming the graph layout they fit. Two batches of one
    shape whose keys are equal use the same graph; only these arrays differ."""

    batch: Any  # the Batch placed (compared by identity)
    key: Hashable
    arrays: tuple[npt.NDArray[Any], ...]


class Cache(Protocol):
    # ---- used by models ----
    def put(self, ctx: Context, il: int, k: Tensor, v: Tensor) -> None:
        """Store this batch's keys/values of layer `il`: k [head_dim_k, n_head_kv, n_tokens], v likewise."""

    def get(self, ctx: Context, il: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """History of layer `il`: k [head_dim_k, n_kv, n_head_kv], v [head_dim_v, n_kv, n_head_kv] and the mask
        [n_kv, n_rows] (0 visible, -inf hidden), or None for caches whose every entry is visible to every token
        (the encoder cache of cross-attention)."""

    # ---- used by the runner ----
    def init(self, backend: Backend, dtype: DType, max_sequences: int, capacity: int, max_batch: int) -> None:
        """Size the cache: `capacity` cells shared by up to `max_sequences` sequences."""

    def start_forward(self, ctx: Context, batch: Batch, reserve: bool = False) -> None:
        """Place the batch in the cache and build its inputs (cell indices, mask). Raises CacheFullError.
        With reserve=True, lay out the worst case (max_batch tokens over the whole cache) without storing."""

    def remove(self, seq: int, begin: int, end: int | None = None) -> None:
        """Forget seq's positions [begin, end); with a finite end, later positions shift down (keys re-rotated)."""

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make dst share src's first n positions (no data copy)."""

    def can_resume(self, seq: int, pos: int) -> bool:
        """Whether generation of seq can continue at pos with what is cached."""

    def clear(self) -> None:
        """Forget every sequence (the tensors stay allocated)."""

    def close(self) -> None:
        """Free the cache's tensors."""
