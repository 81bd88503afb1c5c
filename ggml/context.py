"""GgmlContext: builds one graph; tensors it creates directly (inputs, KV storage) get their own buffers at once,
op results are placed by the scheduler at `compute`. `close()` frees the ggml context and those buffers."""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ggml import rpc
from ggml._lib import CData, check, check_status, ffi, lib
from ggml.tensor import GgmlTensor, new_tensor_ptr
from ml.dtype import DType, dtype_of_numpy
from ml.errors import GgmlError

if TYPE_CHECKING:
    from ggml.runtime import Runtime
    from ml.backend import Tensor

DEFAULT_MAX_NODES = 8192
# ggml type -> the numpy dtype whose bytes it takes as they are (not quantized, not bf16)
_PLAIN_NUMPY = {int(d): d.numpy for d in DType if not d.is_quantized and d != DType.BF16}


def _free_context(state: dict[str, Any]) -> None:
    if rpc.failed():
        return  # buffers on a dead RPC host cannot be freed: the connection thread is parked (ggml/rpc.py)
    for buf in state["buffers"]:
        lib.ggml_backend_buffer_free(buf)
    state["buffers"].clear()
    if state["ctx"] is not None:
        lib.ggml_free(state["ctx"])
        state["ctx"] = None


class GgmlContext:
    """One graph under construction plus the tensors it owns. Not thread-safe: one owner thread."""

    def __init__(self, runtime: Runtime, max_nodes: int = 0, *, buft: CData | None = None,
                 parent: GgmlContext | None = None) -> None:
        self._rt = runtime
        self._buft = buft if buft is not None else runtime.cpu_buft
        self._parent = parent
        self._graph: CData = None
        self._token = object()  # names this context's graph to the runtime (Runtime.sched_user)
        if parent is not None:  # a layer view: same graph and ownership, other allocation target
            self._state: dict[str, Any] = parent._state
            self._max_nodes: int = parent._max_nodes
            return
        self._max_nodes = max_nodes or DEFAULT_MAX_NODES
        mem = self._max_nodes * lib.ggml_tensor_overhead() + lib.ggml_graph_overhead_custom(self._max_nodes, False)
        params = ffi.new("struct ggml_init_params *", {"mem_size": mem, "mem_buffer": ffi.NULL, "no_alloc": True})
        ctx = check(lib.ggml_init(params[0]), "ggml_init", f"mem_size={mem}")
        # "inputs": (tensor, the array it was made from) per from_numpy call, in order; lets a caller that keeps the
        # graph for later steps find and refresh its inputs.
        # "casts": the row kernels' quantized activations made so far (ggml.row_matmul.matmul)
        self._state = {"ctx": ctx, "buffers": [], "inputs": [], "casts": {}}
        self._finalizer = weakref.finalize(self, _free_context, self._state)

    # ---- plumbing for GgmlTensor ----
    @property
    def runtime(self) -> Runtime:
        return self._rt

    @property
    def c(self) -> CData:
        ctx = self._state["ctx"]
        if ctx is None:
            raise GgmlError("context is closed")
        return ctx

    @property
    def row_matmul_casts(self) -> dict[tuple[int, int], CData]:
        """Quantized copies of activations for the row kernels, shared by the mat-muls of one input."""
        casts: dict[tuple[int, int], CData] = self._state["casts"]
        return casts

    def wrap(self, ptr: CData) -> GgmlTensor:
        return GgmlTensor(check(ptr, "ggml op"), self)

    def _root(self) -> GgmlContext:
        return self._parent if self._parent is not None else self

    # ---- tensors with their own memory ----
    def empty(self, dtype: DType, *shape: int) -> GgmlTensor:
        """A tensor allocated now (in this context's buffer type), contents undefined."""
        ptr = new_tensor_ptr(self.c, dtype, shape)
        nbytes = lib.ggml_nbytes(ptr)
        buf = check(lib.ggml_backend_buft_alloc_buffer(self._buft, max(nbytes, 1)), "ggml_backend_buft_alloc_buffer",
                    f"{nbytes} bytes")
        self._state["buffers"].append(buf)
        check_status(lib.ggml_backend_tensor_alloc(buf, ptr, lib.ggml_backend_buffer_get_base(buf)),
                     "ggml_backend_tensor_alloc")
        return GgmlTensor(ptr, self)

    def zeros(self, dtype: DType, *shape: int) -> GgmlTensor:
        t = self.empty(dtype, *shape)
        lib.ggml_backend_buffer_clear(t._ptr.buffer, 0)
        return t

    def from_numpy(self, array: npt.NDArray[Any], dtype: DType | None = None) -> GgmlTensor:
        """A tensor holding `array` (numpy shape reversed into ggml order). With `dtype` F16/BF16/quantized the
        data is converted; otherwise the numpy dtype must map to a ggml type."""
        arr = np.ascontiguousarray(array)
        shape = tuple(reversed(arr.shape)) or (1,)
        target = dtype if dtype is not None else dtype_of_numpy(arr.dtype)
        if target.is_quantized and arr.dtype == np.uint8 and arr.ndim:  # raw blocks: the last axis counts bytes
            shape = (arr.shape[-1] // target.block_bytes * target.block_size, *shape[1:])
        data = _encode(arr, target)
        t = self.empty(target, *shape)
        if data.nbytes != t.nbytes:
            raise GgmlError(f"from_numpy: {data.nbytes} bytes for a {target.name} tensor of {t.nbytes} bytes")
        lib.ggml_backend_tensor_set(t._ptr, ffi.from_buffer(data), 0, data.nbytes)
        self._state["inputs"].append((t, array))
        return t

    @property
    def inputs(self) -> list[tuple[GgmlTensor, Any]]:
        """(tensor, source array) of every `from_numpy` call so far, in call order (the array as passed)."""
        return list(self._state["inputs"])

    def set(self, tensor: Tensor, array: npt.NDArray[Any]) -> None:
        """Overwrite an allocated tensor's contents (same byte size) — for reusing input tensors across steps."""
        t: GgmlTensor = tensor  # type: ignore[assignment]
        p = t._ptr
        if array.dtype == _PLAIN_NUMPY.get(int(p.type)) and array.flags.c_contiguous:
            data = array  # the per-step path of a reused graph: no conversion, no copy
        else:
            data = _encode(np.ascontiguousarray(array), t.dtype)
        if data.nbytes != lib.ggml_nbytes(p):
            raise GgmlError(f"set: {data.nbytes} bytes for tensor {t.name!r} of {t.nbytes} bytes")
        lib.ggml_backend_tensor_set(p, ffi.from_buffer(data), 0, data.nbytes)

    def arange(self, start: float, stop: float, step: float = 1.0, dtype: DType = DType.F32) -> GgmlTensor:
        values = np.arange(start, stop, step)
        return self.from_numpy(values.astype(dtype.numpy if not dtype.is_quantized else np.float32), dtype)

    def stack(self, dim: int, *tensors: Tensor) -> Tensor:
        """Stack equal-shaped tensors along a new dimension `dim`."""
        if not tensors:
            raise ValueError("stack needs at least one tensor")
        parts = []
        for t in tensors:
            shape = list(t.shape) + [1] * (4 - len(t.shape))
            shape.insert(dim, 1)
            parts.append(t.reshape(self, *shape[:4]))
        out = parts[0]
        for p in parts[1:]:
            out = out.concat(self, p, dim)
        return out

    def layer(self, il: int) -> GgmlContext:
        """A view of this context whose direct allocations go to layer `il`'s device."""
        n_layer = getattr(self._rt, "n_layer", 0)
        return GgmlContext(self._rt, buft=self._rt.layer_buft(self._rt.device_of_layer(il, n_layer)),
                           parent=self._root())

    # ---- graph ----
    def _get_graph(self) -> CData:
        c = self.c  # raises once closed: the graph lived in the freed ggml context
        root = self._root()
        if root._graph is None:
            root._graph = check(lib.ggml_new_graph_custom(c, root._max_nodes, False), "ggml_new_graph_custom")
        return root._graph

    def forward(self, *tensors: Tensor) -> GgmlContext:
        """Add `tensors` (and everything they depend on) to the graph; returns self so calls chain."""
        g = self._get_graph()
        for t in tensors:
            lib.ggml_build_forward_expand(g, t._ptr)  # type: ignore[attr-defined]
        return self

    def compute(self, *tensors: Tensor) -> None:
        """Run the graph; afterwards `t.numpy()` gives each of `tensors`' values (copied out, so they stay valid)."""
        g = self._get_graph()
        for t in tensors:
            lib.ggml_set_output(t._ptr)  # type: ignore[attr-defined]
            lib.ggml_build_forward_expand(g, t._ptr)  # type: ignore[attr-defined]
        rt = self._rt
        sched = rt.sched
        rt.sched_user = None
        lib.pyrunner_graph_forget_allocation(g)  # a second compute of this context: nodes of the first move too
        lib.ggml_backend_sched_reset(sched)
        if not lib.ggml_backend_sched_alloc_graph(sched, g):
            raise GgmlError(f"ggml_backend_sched_alloc_graph failed ({lib.ggml_graph_n_nodes(g)} nodes)")
        rt.run_graph(g)
        rt.sched_user = self._root()._token  # this graph's allocation stays valid until another graph is computed
        for t in tensors:
            gt: GgmlTensor = t  # type: ignore[assignment]
            gt._value = gt._read()

    @property
    def allocated(self) -> bool:
        """Whether the graph of this context's last `compute` is still the scheduler's (`recompute` can run)."""
        root = self._root()
        return not self.closed and root._graph is not None and self._rt.sched_user is root._token

    def recompute(self, *tensors: Tensor) -> bool:
        """Run the graph of the last `compute` again, as allocated then (inputs refreshed with `set`), and read
        `tensors` (outputs of that `compute`; none: the caller reads them itself, e.g. with `host_view`). Returns
        False, running nothing, when the scheduler has computed another graph since: the compute buffers then hold
        that graph, and this one must be built again.

        The same nodes, kernels and inputs as a fresh graph, so the results are the same bit for bit."""
        if not self.allocated:
            return False
        root = self._root()
        rt = self._rt
        rt.sched_user = None
        rt.run_graph(root._graph, repeat_of=root._token)
        rt.sched_user = root._token
        for t in tensors:
            gt: GgmlTensor = t  # type: ignore[assignment]
            gt._value = gt._read()
        return True

    @property
    def closed(self) -> bool:
        return self._state["ctx"] is None

    @property
    def n_nodes(self) -> int:
        return 0 if self._root()._graph is None else int(lib.ggml_graph_n_nodes(self._root()._graph))

    def close(self) -> None:
        if self._parent is None:
            self._finalizer()

    def __enter__(self) -> GgmlContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode(arr: npt.NDArray[Any], target: DType) -> npt.NDArray[Any]:
    """The bytes of `arr` as ggml type `target`."""
    if target.is_quantized:
        if arr.dtype == np.uint8:
            return arr  # already raw blocks
        from gguf.quants import quantize
        from gguf.constants import GGMLQuantizationType
        src = np.ascontiguousarray(arr, dtype=np.float32)
        try:
            return quantize(src, GGMLQuantizationType(int(target)))
        except NotImplementedError:  # gguf has no numpy quantizer for K-quants / IQ4_NL: use ggml's own
            return _ggml_quantize(src, target)
    if target == DType.BF16:
        f = arr.astype(np.float32).view(np.uint32)
        # round to nearest even, as ggml's fp32->bf16 does
        return ((f + (0x7FFF + ((f >> 16) & 1))) >> 16).astype(np.uint16)
    return arr.astype(target.numpy, copy=False)


def _ggml_quantize(src: npt.NDArray[np.float32], target: DType) -> npt.NDArray[np.uint8]:
    """Quantize rows of `src` (last axis) to `target` with ggml_quantize_chunk (no importance matrix)."""
    n_per_row = src.shape[-1] if src.ndim else 1
    if n_per_row % target.block_size or lib.ggml_quantize_requires_imatrix(int(target)):
        raise GgmlError(f"cannot quantize rows of {n_per_row} values to {target.name}")
    out = np.empty((*src.shape[:-1], target.row_bytes(n_per_row)), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(target), ffi.from_buffer("float[]", src), ffi.from_buffer(out), 0,
                            src.size // n_per_row, n_per_row, ffi.NULL)
    return out
