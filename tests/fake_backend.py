"""A numpy stand-in for the ggml backend, for cache tests (as Ollama's kvcache tests use a testBackend).

`FakeBackend` / `FakeContext` / `FakeTensor` implement the parts of the `ml` Backend / Context / Tensor protocols
that the KV caches and `ml.nn.attention` use, eagerly: every op computes its value when it is called, `forward`
and `compute` do nothing. Semantics follow ggml (shapes in ggml order, views with byte offsets and strides that
alias their source, `set_rows` writing into its destination, `get_rows` giving f32, matmul broadcasting over
dims 2/3, softmax/flash attention with a [n_kv, n_rows >= n_tokens] mask broadcast over heads, normal and NeoX
RoPE). Storage keeps each type's precision: F16 data is stored as float16, quantized data (Q8_0, Q4_0) as the
float32 values its blocks decode to (quantized with gguf's numpy quantizers on every write), so reads, views and
row copies see what ggml would hold.

`GgmlTestBackend` adapts a bare ggml `Runtime` to the Backend protocol (no model file), so the same cache tests
run on both.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from ml.dtype import DType

_STORAGE: dict[DType, Any] = {DType.F32: np.float32, DType.F16: np.float16, DType.I32: np.int32,
                              DType.I64: np.int64, DType.Q8_0: np.float32, DType.Q4_0: np.float32}


def _storage(dtype: DType) -> Any:
    if dtype not in _STORAGE:
        raise NotImplementedError(f"fake backend: no {dtype.name} tensors")
    return _STORAGE[dtype]


def _elem_bytes(dtype: DType) -> tuple[int, int]:
    """(bytes, elements) of one block: byte offsets * elements // bytes = element offsets."""
    return (dtype.block_bytes, dtype.block_size) if dtype.is_quantized else (dtype.row_bytes(1), 1)


def _contig(ne: Sequence[int]) -> tuple[int, int, int, int]:
    return (1, ne[0], ne[0] * ne[1], ne[0] * ne[1] * ne[2])


def _round(values: npt.NDArray[Any], dtype: DType) -> npt.NDArray[Any]:
    """What storing `values` (numpy layout, dim 0 last) as `dtype` keeps."""
    if dtype.is_quantized:
        qt = GGMLQuantizationType(int(dtype))
        x = np.ascontiguousarray(values, dtype=np.float32)
        return dequantize(quantize(x, qt), qt).astype(np.float32).reshape(x.shape)
    return np.asarray(values).astype(_storage(dtype))


class FakeTensor:
    """A (possibly strided) window on a flat numpy buffer: element offset, ne and element strides in ggml order."""

    def __init__(self, buf: npt.NDArray[Any], dtype: DType, ne: Sequence[int], nb: Sequence[int] | None = None,
                 off: int = 0, owner: FakeContext | None = None) -> None:
        ne4 = tuple(int(d) for d in ne) + (1,) * (4 - len(ne))
        self._buf, self._dtype, self._ne = buf, dtype, ne4
        self._nb = tuple(nb) if nb is not None else _contig(ne4)
        self._off, self._owner = off, owner

    # ---- properties ----
    @property
    def shape(self) -> tuple[int, ...]:
        n = 4
        while n > 1 and self._ne[n - 1] == 1:
            n -= 1
        return self._ne[:n]

    @property
    def dtype(self) -> DType:
        return self._dtype

    @property
    def nbytes(self) -> int:
        return self._dtype.row_bytes(self._ne[0]) * self._ne[1] * self._ne[2] * self._ne[3]

    def stride(self, dim: int) -> int:
        if dim == 0:
            return _elem_bytes(self._dtype)[0]
        nbytes, nelem = _elem_bytes(self._dtype)
        return self._nb[dim] * nbytes // nelem

    def __repr__(self) -> str:
        return f"FakeTensor({self._dtype.name}, {list(self.shape)})"

    def arr(self) -> npt.NDArray[Any]:
        """The live numpy view (ne3, ne2, ne1, ne0) of the buffer (writes go through)."""
        if self._owner is not None and self._owner.closed:
            raise RuntimeError("tensor belongs to a closed context")
        item = self._buf.itemsize
        return np.lib.stride_tricks.as_strided(
            self._buf[self._off:], shape=self._ne[::-1], strides=tuple(s * item for s in self._nb[::-1]),
            writeable=True)

    def values(self) -> npt.NDArray[np.float64]:
        """Float64 numpy values, numpy shape reversed(self.shape)."""
        return self.arr().astype(np.float64).reshape(tuple(reversed(self.shape)))

    def numpy(self) -> npt.NDArray[Any]:
        """Like GgmlTensor.numpy: values in numpy shape; quantized tensors give raw block bytes per row."""
        if not self._is_contiguous():
            raise RuntimeError("non-contiguous view: make it contiguous before reading")
        a = np.ascontiguousarray(self.arr()).reshape(tuple(reversed(self.shape)))
        if self._dtype.is_quantized:
            return quantize(a.astype(np.float32), GGMLQuantizationType(int(self._dtype)))
        return a.copy()

    def _is_contiguous(self) -> bool:
        return all(self._nb[i] == _contig(self._ne)[i] for i in range(4) if self._ne[i] > 1)

    def _new(self, ctx: Any, values: npt.NDArray[Any], dtype: DType | None = None) -> FakeTensor:
        """A fresh tensor holding `values` (numpy layout)."""
        dt = self._dtype if dtype is None else dtype
        v = np.ascontiguousarray(_round(values, dt))
        return FakeTensor(v.reshape(-1), dt, v.shape[::-1], owner=ctx)

    # ---- element-wise (the few the tests use) ----
    def add(self, ctx: Any, b: FakeTensor) -> FakeTensor:
        return self._new(ctx, self.values() + _bcast(b.values(), self), DType.F32)

    def mul(self, ctx: Any, b: FakeTensor) -> FakeTensor:
        return self._new(ctx, self.values() * _bcast(b.values(), self), DType.F32)

    def scale(self, ctx: Any, s: float) -> FakeTensor:
        return self._new(ctx, self.values() * s, DType.F32)

    # ---- linear algebra ----
    def matmul(self, ctx: Any, b: FakeTensor) -> FakeTensor:
        """self [k, m, a2, a3] x b [k, n, b2, b3] -> [m, n, b2, b3]; self repeats over b's dims 2 and 3."""
        a4, b4 = self.arr().astype(np.float64), b.arr().astype(np.float64)  # (a3, a2, m, k), (b3, b2, n, k)
        if a4.shape[-1] != b4.shape[-1] or b4.shape[0] % a4.shape[0] or b4.shape[1] % a4.shape[1]:
            raise ValueError(f"matmul: cannot multiply {self.shape} by {b.shape}")
        a4 = np.repeat(np.repeat(a4, b4.shape[0] // a4.shape[0], 0), b4.shape[1] // a4.shape[1], 1)
        out = b4 @ np.swapaxes(a4, -1, -2)  # (b3, b2, n, m)
        return self._new(ctx, _trim(out, 4), DType.F32)

    matmul_full = matmul

    def softmax(self, ctx: Any, mask: FakeTensor | None = None, scale: float = 1.0,
                softcap: float = 0.0) -> FakeTensor:
        """softmax over dim 0 of self*scale (soft-capped) + mask[:n_rows] (mask broadcast over dims 2 and 3)."""
        x = self.arr().astype(np.float64) * scale  # (a3, a2, rows, n_kv)
        if softcap > 0:
            x = softcap * np.tanh(x / softcap)
        if mask is not None:
            x = x + _mask_rows(mask, x.shape[2], x.shape[3])
        return self._new(ctx, _trim(_softmax(x), len(self.shape)), DType.F32)

    def rope(self, ctx: Any, positions: FakeTensor, n_dims: int, base: float, *, neox: bool = False,
             freq_factors: FakeTensor | None = None, freq_scale: float = 1.0, n_ctx_orig: int = 0,
             ext_factor: float = 0.0, attn_factor: float = 1.0, beta_fast: float = 32.0,
             beta_slow: float = 1.0) -> FakeTensor:
        """Normal or NeoX RoPE of self [head_dim, n_head, n_tokens] at positions [n_tokens] (no YaRN)."""
        if ext_factor != 0.0 or attn_factor != 1.0:
            raise NotImplementedError("fake backend: no YaRN")
        x = self.arr().astype(np.float64)  # (1, n_tokens, n_head, head_dim)
        pos = positions.arr().reshape(-1).astype(np.float64)
        half = n_dims // 2
        theta = pos[:, None] * base ** (-2.0 * np.arange(half) / n_dims) * freq_scale  # (n_tokens, half)
        if freq_factors is not None:
            theta = theta / freq_factors.arr().reshape(-1)[:half].astype(np.float64)
        cos, sin = np.cos(theta)[None, :, None, :], np.sin(theta)[None, :, None, :]
        out = x.copy()
        if neox:
            x0, x1 = x[..., :half], x[..., half:n_dims]
            out[..., :half], out[..., half:n_dims] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        else:
            x0, x1 = x[..., 0:n_dims:2], x[..., 1:n_dims:2]
            out[..., 0:n_dims:2], out[..., 1:n_dims:2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return self._new(ctx, _trim(out, len(self.shape)), DType.F32 if self._dtype != DType.F16 else DType.F16)

    def flash_attn(self, ctx: Any, k: FakeTensor, v: FakeTensor, mask: FakeTensor | None, scale: float,
                   softcap: float = 0.0) -> FakeTensor:
        """q = self [d, n_tokens, n_head]; k/v [d, n_kv, n_head_kv] -> [d_v, n_head, n_tokens]."""
        q = self.arr().astype(np.float64)[0]  # (n_head, n_tokens, d)
        kk, vv = k.arr().astype(np.float64)[0], v.arr().astype(np.float64)[0]  # (n_head_kv, n_kv, d)
        group = q.shape[0] // kk.shape[0]
        kk, vv = np.repeat(kk, group, 0), np.repeat(vv, group, 0)
        s = q @ np.swapaxes(kk, -1, -2) * scale  # (n_head, n_tokens, n_kv)
        if softcap > 0:
            s = softcap * np.tanh(s / softcap)
        if mask is not None:
            s = s + _mask_rows(mask, s.shape[1], s.shape[2])[0, 0]
        out = _softmax(s) @ vv  # (n_head, n_tokens, d_v)
        return self._new(ctx, np.swapaxes(out, 0, 1), DType.F32)  # (n_tokens, n_head, d_v)

    # ---- shape and layout ----
    def reshape(self, ctx: Any, *shape: int) -> FakeTensor:
        if not self._is_contiguous():
            raise ValueError("reshape of a non-contiguous tensor")
        ne = tuple(shape) + (1,) * (4 - len(shape))
        if int(np.prod(ne)) != int(np.prod(self._ne)):
            raise ValueError(f"reshape {self.shape} -> {shape}")
        return FakeTensor(self._buf, self._dtype, ne, None, self._off, ctx)

    def view(self, ctx: Any, offset: int, shape: Sequence[int], strides: Sequence[int] = ()) -> FakeTensor:
        """`shape` at byte `offset`, byte `strides` for dims 1.. (default: contiguous rows of this type)."""
        nbytes, nelem = _elem_bytes(self._dtype)
        ne = list(shape) + [1] * (4 - len(shape))
        nb = list(strides)
        if len(nb) < 3:
            row = self._dtype.row_bytes(ne[0])
            full = [row, row * ne[1], row * ne[1] * ne[2]]
            nb = nb + full[len(nb):]
        for b in [offset, *nb]:
            if b * nelem % nbytes:
                raise ValueError(f"view: byte offset/stride {b} splits a {self._dtype.name} block")
        el = [1] + [b * nelem // nbytes for b in nb]
        off = self._off + offset * nelem // nbytes
        last = off + sum((n - 1) * s for n, s in zip(ne, el))
        if last >= self._buf.size:
            raise ValueError("view out of bounds")
        return FakeTensor(self._buf, self._dtype, ne, el, off, ctx)

    def permute(self, ctx: Any, *axes: int) -> FakeTensor:
        """Dimension i of self becomes dimension axes[i] of the result (ggml_permute)."""
        ax = list(axes) + list(range(len(axes), 4))
        ne, nb = [0] * 4, [0] * 4
        for i, a in enumerate(ax):
            ne[a], nb[a] = self._ne[i], self._nb[i]
        return FakeTensor(self._buf, self._dtype, ne, nb, self._off, ctx)

    def transpose(self, ctx: Any) -> FakeTensor:
        return self.permute(ctx, 1, 0, 2, 3)

    def contiguous(self, ctx: Any) -> FakeTensor:
        a = np.ascontiguousarray(self.arr())
        return FakeTensor(a.reshape(-1).copy(), self._dtype, self._ne, owner=ctx)

    def get_rows(self, ctx: Any, ids: FakeTensor) -> FakeTensor:
        """Rows of self [ne0, ne1, ne2] at ids [n] (or [n, ne2]) -> [ne0, n, ne2] f32 (ints stay ints)."""
        a = self.arr()[0]  # (ne2, ne1, ne0)
        idx = ids.arr().astype(np.intp)[0, 0]  # (ids_ne1, n)
        if idx.shape[0] == 1:
            out = a[:, idx[0], :]
        else:
            out = np.stack([a[i, idx[i], :] for i in range(a.shape[0])])
        dt = DType.I32 if self._dtype == DType.I32 else DType.F32
        return self._new(ctx, _trim(out.astype(np.float64 if dt == DType.F32 else np.int32), len(self.shape)), dt)

    def set_rows(self, ctx: Any, src: FakeTensor, ids: FakeTensor) -> FakeTensor:
        """Write src [ne0, n, ne2, ne3] into rows ids [n] of self (converting to self's type); returns self."""
        idx = ids.arr().reshape(-1).astype(np.intp)
        s = src.arr()  # (ne3, ne2, n, ne0)
        if s.shape[-1] != self._ne[0] or s.shape[2] != idx.size:
            raise ValueError(f"set_rows: {src.shape} rows into {self.shape} at {idx.size} ids")
        if idx.size and (idx.min() < 0 or idx.max() >= self._ne[1]):
            raise IndexError("set_rows: row index out of range")
        if np.unique(idx).size != idx.size:
            raise ValueError("set_rows: duplicate row ids")
        dst = self.arr()
        dst[:, :, idx, :] = _round(s.astype(np.float32), self._dtype)
        return FakeTensor(self._buf, self._dtype, self._ne, self._nb, self._off, ctx)

    def copy(self, ctx: Any, dst: FakeTensor) -> FakeTensor:
        """Copy self into dst (same element count, converting type); returns dst."""
        if int(np.prod(self._ne)) != int(np.prod(dst._ne)):
            raise ValueError("copy: element counts differ")
        vals = np.ascontiguousarray(self.arr()).reshape(dst._ne[::-1])
        dst.arr()[...] = _round(vals.astype(np.float32), dst._dtype)
        return FakeTensor(dst._buf, dst._dtype, dst._ne, dst._nb, dst._off, ctx)

    def cast(self, ctx: Any, dtype: DType) -> FakeTensor:
        return self._new(ctx, np.ascontiguousarray(self.arr()).astype(np.float32), dtype)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"fake backend: Tensor.{name} is not implemented")


class FakeContext:
    """Eager: `forward`/`compute` only record; values exist as soon as an op is called."""

    def __init__(self) -> None:
        self.closed = False
        self.n_computes = 0

    def empty(self, dtype: DType, *shape: int) -> FakeTensor:
        # Undefined contents in ggml; NaN here so that reading an unwritten value shows.
        n = int(np.prod(shape))
        fill = np.nan if np.issubdtype(np.dtype(_storage(dtype)), np.floating) else 0
        return FakeTensor(np.full(n, fill, dtype=_storage(dtype)), dtype, shape, owner=self)

    def zeros(self, dtype: DType, *shape: int) -> FakeTensor:
        return FakeTensor(np.zeros(int(np.prod(shape)), dtype=_storage(dtype)), dtype, shape, owner=self)

    def from_numpy(self, array: npt.NDArray[Any], dtype: DType | None = None) -> FakeTensor:
        arr = np.ascontiguousarray(array)
        if dtype is None:
            dt = {np.dtype(np.float32): DType.F32, np.dtype(np.float16): DType.F16, np.dtype(np.int32): DType.I32,
                  np.dtype(np.int64): DType.I64, np.dtype(np.float64): DType.F32}.get(arr.dtype)
            if dt is None:
                raise TypeError(f"fake backend: no type for numpy {arr.dtype}")
        else:
            dt = dtype
        if dt.is_quantized and arr.dtype == np.uint8:  # raw blocks
            vals = dequantize(arr, GGMLQuantizationType(int(dt))).astype(np.float32)
        else:
            vals = _round(arr, dt)
        shape = tuple(reversed(vals.shape)) or (1,)
        return FakeTensor(np.ascontiguousarray(vals).reshape(-1), dt, shape, owner=self)

    def arange(self, start: float, stop: float, step: float = 1.0, dtype: DType = DType.F32) -> FakeTensor:
        return self.from_numpy(np.arange(start, stop, step).astype(_storage(dtype)), dtype)

    def forward(self, *tensors: FakeTensor) -> FakeContext:
        if self.closed:
            raise RuntimeError("context is closed")
        return self

    def compute(self, *tensors: FakeTensor) -> None:
        if self.closed:
            raise RuntimeError("context is closed")
        self.n_computes += 1

    def layer(self, il: int) -> FakeContext:
        return self

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    """The Backend protocol, minus a model: metadata is empty and there are no weights."""

    architecture = "fake"

    def __init__(self) -> None:
        self.metadata: dict[str, Any] = {}
        self.contexts: list[FakeContext] = []

    def new_context(self, max_nodes: int = 0) -> FakeContext:
        c = FakeContext()
        self.contexts.append(c)
        return c

    def get(self, name: str) -> None:
        return None

    def tensor_names(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class GgmlTestBackend:
    """A Backend over a bare ggml Runtime (CPU, one thread): contexts without a model file."""

    architecture = "none"

    def __init__(self, threads: int = 1) -> None:
        from ggml import Runtime, RuntimeOptions
        self.runtime = Runtime(RuntimeOptions(threads=threads))
        self.metadata: dict[str, Any] = {}

    def new_context(self, max_nodes: int = 0) -> Any:
        from ggml.context import GgmlContext
        return GgmlContext(self.runtime, max_nodes)

    def get(self, name: str) -> None:
        return None

    def tensor_names(self) -> list[str]:
        return []

    def close(self) -> None:
        self.runtime.close()


# ---- helpers ----
def _trim(a: npt.NDArray[Any], rank: int) -> npt.NDArray[Any]:
    """Drop leading size-1 axes beyond `rank` (numpy layout), keeping at least `rank` axes."""
    while a.ndim > max(rank, 1) and a.shape[0] == 1:
        a = a[0]
    return a


def _bcast(b: npt.NDArray[Any], like: FakeTensor) -> npt.NDArray[Any]:
    target = tuple(reversed(like.shape))
    reps = [t // s for t, s in zip(target, (1,) * (len(target) - b.ndim) + b.shape)]
    return np.tile(b.reshape((1,) * (len(target) - b.ndim) + b.shape), reps)


def _mask_rows(mask: FakeTensor, n_rows: int, n_kv: int) -> npt.NDArray[np.float64]:
    m = mask.arr().astype(np.float64)  # (1, 1, rows_padded, n_kv)
    if m.shape[-1] != n_kv or m.shape[-2] < n_rows:
        raise ValueError(f"mask {mask.shape} does not cover {n_kv} cells x {n_rows} rows")
    return m[:, :, :n_rows, :]


def _softmax(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    mx = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - mx)
    return e / np.sum(e, axis=-1, keepdims=True)
