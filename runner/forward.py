"""Model forwards for the batch loop, keeping the last built graph for the next step of the same shape.

Building a decoder's graph from Python costs about 1 µs per op (~1000 ops for SmolLM2), more than the rest of a
decode step's Python work together. A step whose batch has the same number of tokens and outputs as the last one,
and whose cache inputs fit the same layout (`ForwardInputs.key`: the attended cell range, which grows in steps of
256 cells), runs the last graph again: only its input tensors get new contents (token ids, positions, output rows,
KV write indices, mask). Same nodes, same kernels, same inputs: the logits are those of a freshly built graph, bit
for bit (tests/test_graph_reuse.py).

A graph is kept only when every input its build made is one this module can refresh: a field of the batch or an
array of the cache's `prepare`, recognised by identity. The model must say its graph depends on nothing else than
those shapes (`reusable_graphs`), and the cache must have `prepare`; otherwise every step builds its graph, as
before. The scheduler's compute buffers hold one graph at a time, so anything else computed in between (a cache
defrag or shift, an embedding) makes the next step build again (`GgmlContext.recompute` says so).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ml.backend import Backend, Context, Tensor
from ml.batch import Batch

_BATCH_FIELDS = ("tokens", "positions", "seqs", "outputs")


@dataclass
class _Input:
    """An input tensor of a kept graph, and where the backend allows it a writable view of its memory: a step's
    new contents are then a numpy copy instead of a call into C per input (a decoder step refreshes five or
    more)."""

    tensor: Tensor
    view: npt.NDArray[Any] | None  # 1-D

    @staticmethod
    def of(t: Tensor) -> _Input:
        view = _host_view(t, writable=True)
        return _Input(t, None if view is None else view.reshape(-1))

    def write(self, ctx: Any, array: npt.NDArray[Any]) -> None:
        v = self.view  # flat: a mask's [n_kv, 1] tensor is (n_kv,) to ggml's shape and (1, n_kv) in numpy
        if v is not None and array.size == v.size and array.dtype == v.dtype:
            v[...] = array.reshape(-1)
        else:
            ctx.set(self.tensor, array)  # converts, or says why it cannot


@dataclass
class _Kept:
    key: tuple[Any, ...]
    ctx: Any  # a GgmlContext
    out: Tensor
    batch_inputs: list[tuple[_Input, str]]  # input, Batch field
    cache_inputs: list[tuple[_Input, int]]  # input, index into ForwardInputs.arrays
    view: npt.NDArray[np.float32] | None  # the output [n_outputs, n_vocab] in place, where it is in host memory


class _Refresh:
    """Stands in for the kept graph's context while the cache's `start_forward` hands over this step's arrays:
    each `from_numpy` writes into the input tensor that array's slot fed at build time."""

    def __init__(self, kept: _Kept, arrays: tuple[npt.NDArray[Any], ...]) -> None:
        self._kept = kept
        self._slots = {id(a): i for i, a in enumerate(arrays)}

    def from_numpy(self, array: npt.NDArray[Any], dtype: Any = None) -> Tensor:
        slot = self._slots[id(array)]
        found: Tensor | None = None
        for inp, i in self._kept.cache_inputs:
            if i == slot:
                inp.write(self._kept.ctx, array)
                found = inp.tensor
        if found is None:
            raise RuntimeError("the kept graph has no input for this cache array")
        return found


class ForwardRunner:
    """`logits(batch)`: the model's logits [n_outputs, n_vocab] for `batch`, through `cache`. One owner thread."""

    def __init__(self, backend: Backend, model: Any, cache: Any, *, reuse: bool = True) -> None:
        self.backend, self.model, self.cache = backend, model, cache
        self.n_vocab = int(model.params.n_vocab)
        self.reuse = (reuse and bool(getattr(model, "reusable_graphs", False))
                      and callable(getattr(cache, "prepare", None)))
        self._kept: _Kept | None = None
        self.n_built = 0
        self.n_reused = 0

    def logits(self, batch: Batch, *, copy: bool = True) -> npt.NDArray[np.float32]:
        """copy=False: a read-only view of the backend's output where it can (a kept graph on the CPU), valid only
        until the next forward; for a caller that is done with the logits by then (the batch loop samples them at
        once). Gemma 3's 262k-entry rows cost ~1 MB of copying each otherwise."""
        inputs = self.cache.prepare(batch) if self.reuse else None
        # a batch with image embeddings or inputs adds inputs of its own: never run through (or kept as) a reusable
        # graph
        key = (None if inputs is None or batch.embeds is not None or batch.multimodal
               else (batch.n_tokens, int(batch.outputs.size), inputs.key))
        kept = self._kept
        # Still allocated: the scheduler ran no other graph since (prepare's own defrag would be one).
        if kept is not None and key is not None and kept.key == key and kept.ctx.allocated:
            assert inputs is not None
            try:
                self.cache.start_forward(_Refresh(kept, inputs.arrays), batch)  # takes the placement, sets inputs
                for inp, name in kept.batch_inputs:
                    inp.write(kept.ctx, getattr(batch, name))
                view = None if copy else kept.view
                if not (kept.ctx.recompute() if view is not None else kept.ctx.recompute(kept.out)):
                    raise RuntimeError("the kept graph lost its allocation")  # `allocated` said otherwise
                logits = self._read(kept.out) if view is None else view
            except BaseException:
                self.drop()
                raise
            self.n_reused += 1
            return logits
        return self._build(batch, key, inputs)

    def _build(self, batch: Batch, key: tuple[Any, ...] | None, inputs: Any) -> npt.NDArray[np.float32]:
        self.drop()
        ctx = self.backend.new_context()
        try:
            out = self.model.forward(ctx, batch, self.cache)
            ctx.forward(out).compute(out)
            logits = self._read(out)
        except BaseException:
            ctx.close()
            raise
        self.n_built += 1
        kept = self._bindings(ctx, out, batch, key, inputs, self.n_vocab) if key is not None else None
        if kept is None:
            ctx.close()
        self._kept = kept
        return logits

    def _read(self, out: Tensor) -> npt.NDArray[np.float32]:
        return np.asarray(out.numpy()).reshape(-1, self.n_vocab)

    @staticmethod
    def _bindings(ctx: Context, out: Tensor, batch: Batch, key: tuple[Any, ...], inputs: Any,
                  n_vocab: int) -> _Kept | None:
        """Where each input of the built graph comes from, or None when one of them is unknown (not kept)."""
        recorded = getattr(ctx, "inputs", None)
        if recorded is None or not callable(getattr(ctx, "recompute", None)):
            return None
        fields = {id(getattr(batch, f)): f for f in _BATCH_FIELDS}
        slots = {id(a): i for i, a in enumerate(inputs.arrays)}
        batch_inputs: list[tuple[_Input, str]] = []
        cache_inputs: list[tuple[_Input, int]] = []
        for t, src in recorded:
            if id(src) in fields:
                batch_inputs.append((_Input.of(t), fields[id(src)]))
            elif id(src) in slots:
                cache_inputs.append((_Input.of(t), slots[id(src)]))
            else:
                return None
        # The output's view is made once: an allocated kept graph keeps its memory (recompute checks that)
        view = _host_view(out, writable=False)
        return _Kept(key, ctx, out, batch_inputs, cache_inputs, None if view is None else view.reshape(-1, n_vocab))

    def drop(self) -> None:
        """Free the kept graph (before the cache's tensors go, or to save its memory)."""
        if self._kept is not None:
            self._kept.ctx.close()
            self._kept = None

    def close(self) -> None:
        self.drop()


def _host_view(t: Tensor, *, writable: bool) -> npt.NDArray[Any] | None:
    """A view of `t`'s own memory where the tensor has one and it is plain host memory, else None (an output left
    on a GPU is copied, an input there is set through the backend)."""
    view: Callable[..., npt.NDArray[Any]] | None = getattr(t, "host_view", None)
    if view is None:
        return None
    try:
        return view(writable=writable)
    except Exception:  # GgmlError: not plain host memory
        return None
