"""A cache made of several caches, each layer routed to one of them (gemma2/3: sliding-window vs global layers;
mllama: encoder vs causal). Runner-side calls go to every member."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from kvcache.base import Cache, ForwardInputs
from ml.backend import Backend, Context, Tensor
from ml.batch import Batch
from ml.dtype import DType


class WrapperCache:
    def __init__(self, caches: Sequence[Cache], route: Callable[[int], int]) -> None:
        """`route(il)` gives the index in `caches` of the cache layer `il` uses."""
        self.caches = list(caches)
        self.route = route

    def put(self, ctx: Context, il: int, k: Tensor, v: Tensor) -> None:
        self.caches[self.route(il)].put(ctx, il, k, v)

    def get(self, ctx: Context, il: int) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.caches[self.route(il)].get(ctx, il)

    def init(self, backend: Backend, dtype: DType, max_sequences: int, capacity: int, max_batch: int) -> None:
        for c in self.caches:
            c.init(backend, dtype, max_sequences, capacity, max_batch)

    def start_forward(self, ctx: Context, batch: Batch, reserve: bool = False) -> None:
        for c in self.caches:
            c.start_forward(ctx, batch, reserve)

    def prepare(self, batch: Batch) -> ForwardInputs | None:
        """Every member's `prepare` (None when some member has none: nothing is placed then), combined in the
        order `start_forward` visits them."""
        if not all(callable(getattr(c, "prepare", None)) for c in self.caches):
            return None
        parts = [c.prepare(batch) for c in self.caches]  # type: ignore[attr-defined]
        return ForwardInputs(batch, tuple(p.key for p in parts), tuple(a for p in parts for a in p.arrays))

    def remove(self, seq: int, begin: int, end: int | None = None) -> None:
        """Applied to every member; members that can tell in advance (`check_remove`) are asked first, so a
        refused shift leaves all of them unchanged."""
        for c in self.caches:
            check = getattr(c, "check_remove", None)
            if check is not None:
                check(seq, begin, end)
        for c in self.caches:
            c.remove(seq, begin, end)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        for c in self.caches:
            c.copy_prefix(src, dst, n)

    def can_resume(self, seq: int, pos: int) -> bool:
        return all(c.can_resume(seq, pos) for c in self.caches)

    def clear(self) -> None:
        for c in self.caches:
            c.clear()

    def close(self) -> None:
        for c in self.caches:
            c.close()
