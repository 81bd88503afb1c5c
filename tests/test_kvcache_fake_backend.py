"""The numpy fake backend the cache tests use agrees with ggml op for op (so a cache test passing on both
backends is not passing on the fake by accident of its semantics)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from fake_backend import FakeBackend, GgmlTestBackend
from ml.dtype import DType
from ml.nn import attention
from test_kvcache_common import tensor_values

Build = Callable[[Any], Any]  # ctx -> output tensor


@pytest.fixture(scope="module")
def ggml_backend() -> Iterator[GgmlTestBackend]:
    b = GgmlTestBackend()
    yield b
    b.close()


def both(ggml_backend: GgmlTestBackend, build: Build) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for backend in (FakeBackend(), ggml_backend):
        ctx = backend.new_context()
        try:
            t = build(ctx)
            if t.dtype.is_quantized or t.stride(1) != t.dtype.row_bytes(t.shape[0]):
                t = t.contiguous(ctx)
            ctx.compute(t)
            out.append(tensor_values(t))
        finally:
            ctx.close()
    return out[0], out[1]


g = np.random.default_rng(0)
X = g.standard_normal((3, 5, 64)).astype(np.float32)  # ggml [64, 5, 3]


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.Q8_0, DType.Q4_0], ids=lambda d: d.name)
def test_set_rows_get_rows_and_views(ggml_backend: GgmlTestBackend, dtype: DType) -> None:
    def build(ctx: Any) -> Any:
        store = ctx.zeros(dtype, 64, 6)
        ctx.forward(store.set_rows(ctx, ctx.from_numpy(X[0, :4]), ctx.from_numpy(np.array([5, 1, 3, 0], np.int64))))
        view = store.view(ctx, dtype.row_bytes(64), [32, 2, 4], [dtype.row_bytes(32), dtype.row_bytes(64)])
        return view.permute(ctx, 0, 2, 1, 3).contiguous(ctx)

    fake, real = both(ggml_backend, build)
    np.testing.assert_array_equal(fake, real)

    def rows(ctx: Any) -> Any:
        store = ctx.from_numpy(X[1], dtype)
        return store.get_rows(ctx, ctx.from_numpy(np.array([4, 0, 2], np.int32)))

    fake, real = both(ggml_backend, rows)
    np.testing.assert_array_equal(fake, real)


@pytest.mark.parametrize("neox", [False, True])
def test_rope(ggml_backend: GgmlTestBackend, neox: bool) -> None:
    pos = np.array([0, 3, 17, 250, 1000], np.int32)
    fake, real = both(ggml_backend, lambda ctx: ctx.from_numpy(X.transpose(1, 0, 2).copy()).rope(
        ctx, ctx.from_numpy(pos), 48, 10000.0, neox=neox))
    np.testing.assert_allclose(fake, real, rtol=0, atol=1e-4)  # ggml: f32 angles (1000 rad)


@pytest.mark.parametrize("flash", [False, True])
def test_attention(ggml_backend: GgmlTestBackend, flash: bool) -> None:
    k = g.standard_normal((2, 7, 64)).astype(np.float32)  # [64, 7, 2]: 2 KV heads
    v = g.standard_normal((2, 7, 64)).astype(np.float32)
    q = g.standard_normal((3, 4, 64)).astype(np.float32)  # [64, 4 heads, 3 tokens]
    mask = np.zeros((3, 7), np.float16 if flash else np.float32)
    mask[0, 2:] = -np.inf
    mask[1, 5:] = -np.inf

    def build(ctx: Any) -> Any:
        kk = ctx.from_numpy(k, DType.F16)
        vv = ctx.from_numpy(v, DType.F16)
        return attention(ctx, ctx.from_numpy(q), kk, vv, ctx.from_numpy(mask), 0.125, flash=flash)

    fake, real = both(ggml_backend, build)
    np.testing.assert_allclose(fake, real, rtol=0, atol=3e-3)
