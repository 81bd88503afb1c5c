"""Shared pieces of the op tests (tests/test_ops*.py): runtime/context fixtures, value readers, and the normalized
mean squared error check that llama.cpp's test-backend-ops uses: nmse = mse(out, ref) / mse(ref, 0).

References in the test files are plain numpy (float64) written from ggml's documented semantics; quantized data is
dequantized with gguf.quants from the very bytes the tensor holds. This module holds no tests itself.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from ggml import Runtime, RuntimeOptions
from ggml.context import GgmlContext
from ml.dtype import DType

FLOAT_TYPES = (DType.F32, DType.F16, DType.BF16)
QUANT_TYPES = (DType.Q8_0, DType.Q4_0, DType.Q4_1, DType.Q5_0, DType.Q4_K, DType.Q5_K, DType.Q6_K)
ALL_TYPES = FLOAT_TYPES + QUANT_TYPES

# nmse bound for an elementwise result stored as each type (output rounding dominates).
ELEMENTWISE_NMSE = {DType.F32: 1e-7, DType.F16: 1e-6, DType.BF16: 5e-5}
# matmul: quantized weights multiply Q8-quantized activations (Q8_0 / Q8_K), as in test-backend-ops (5e-4).
MATMUL_NMSE = {DType.F32: 1e-7, DType.F16: 1e-5, DType.BF16: 1e-4, **{q: 5e-4 for q in QUANT_TYPES}}
# Typical quantization error (nmse against the f32 source) of Gaussian data, with a margin: for set_rows / cast.
QUANT_NMSE = {DType.F16: 1e-6, DType.BF16: 3e-5, DType.Q8_0: 6e-5, DType.Q4_0: 2e-2, DType.Q4_1: 2e-2,
              DType.Q5_0: 5e-3, DType.Q4_K: 1.5e-2, DType.Q5_K: 3e-3, DType.Q6_K: 1e-3}


@pytest.fixture(scope="module")
def rt() -> Iterator[Runtime]:
    """One single-threaded CPU runtime per test module (fast to start, deterministic)."""
    r = Runtime(RuntimeOptions(threads=1))
    yield r
    r.close()


@pytest.fixture
def ctx(rt: Runtime) -> Iterator[GgmlContext]:
    c = GgmlContext(rt)
    yield c
    c.close()


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def randn(gen: np.random.Generator, *shape: int, scale: float = 1.0) -> npt.NDArray[np.float32]:
    """Standard normal float32 data, numpy shape."""
    return (gen.standard_normal(shape) * scale).astype(np.float32)


def dequant(raw: npt.NDArray[Any], dtype: DType) -> npt.NDArray[np.float64]:
    """Values of raw quantized block bytes (rows on the last axis), via gguf's numpy dequantizers."""
    return dequantize(np.ascontiguousarray(raw), GGMLQuantizationType(int(dtype))).astype(np.float64)


def values(t: Any) -> npt.NDArray[np.float64]:
    """A tensor's current values as float64 numpy (dequantized when quantized)."""
    raw = t.numpy()
    if t.dtype.is_quantized:
        return dequant(raw, t.dtype)
    return np.asarray(raw, dtype=np.float64)


def bf16_round(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """float32 -> bfloat16 -> float32 with round-to-nearest-even (ggml's conversion)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def stored(x: npt.NDArray[Any], dtype: DType) -> npt.NDArray[np.float64]:
    """The values a float32 array takes once stored as a float `dtype` (what ggml's op actually reads)."""
    if dtype == DType.F16:
        return x.astype(np.float16).astype(np.float64)
    if dtype == DType.BF16:
        return bf16_round(x).astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def nmse(out: npt.NDArray[Any], ref: npt.NDArray[Any]) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = float(np.mean(ref * ref))
    return float(np.mean((out - ref) ** 2)) / max(den, 1e-30)


def check(out: npt.NDArray[Any], ref: npt.NDArray[Any], tol: float, what: str = "") -> None:
    """Assert same shape, finite values and nmse(out, ref) <= tol."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != reference {ref.shape}"
    fin = np.isfinite(ref)
    assert np.array_equal(np.isfinite(out), fin), f"{what}: non-finite values differ from the reference"
    err = nmse(out[fin], ref[fin])
    assert err <= tol, f"{what}: nmse {err:.3g} > {tol:.3g}"


def run(ctx: GgmlContext, *outs: Any) -> list[npt.NDArray[Any]]:
    """Compute `outs` in one graph and return their numpy values."""
    ctx.forward(*outs).compute(*outs)
    return [o.numpy() for o in outs]


def trim(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A ggml-order shape without trailing 1s, as Tensor.shape reports it (numpy() drops the same leading 1s)."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return shape[:n]


def pad4(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Prefix a numpy array's shape with ones up to 4 dimensions (ggml's implicit trailing ne = 1)."""
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def skip(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.skip(reason=reason)
