"""im2col, conv2d and pool2d (max / avg) against direct numpy loops. Images are numpy (N, C, H, W), i.e. ggml
[W, H, C, N]; kernels numpy (OC, C, KH, KW), i.e. ggml [KW, KH, C, OC]."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from ggml.context import GgmlContext
from ml.dtype import DType
from test_ops_common import check, ctx, randn, rng, rt, run, stored, trim

__all__ = ["ctx", "rt"]

F64 = npt.NDArray[np.float64]


def _out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def im2col_ref(x: F64, kh: int, kw: int, s0: int, s1: int, p0: int, p1: int, d0: int, d1: int) -> F64:
    """(N, C, H, W) -> (N, OH, OW, C*KH*KW): each output pixel's receptive field, channel-major, zero padded."""
    n, c, h, w = x.shape
    oh, ow = _out_size(h, kh, s1, p1, d1), _out_size(w, kw, s0, p0, d0)
    xp = np.zeros((n, c, h + 2 * p1 + d1 * kh, w + 2 * p0 + d0 * kw))
    xp[:, :, p1:p1 + h, p0:p0 + w] = x
    out = np.empty((n, oh, ow, c, kh, kw))
    for y in range(oh):
        for xx in range(ow):
            for i in range(kh):
                for j in range(kw):
                    out[:, y, xx, :, i, j] = xp[:, :, y * s1 + i * d1, xx * s0 + j * d0]
    return out.reshape(n, oh, ow, c * kh * kw)


def conv2d_ref(x: F64, k: F64, s0: int, s1: int, p0: int, p1: int, d0: int, d1: int) -> F64:
    """Cross-correlation (N, C, H, W) * (OC, C, KH, KW) -> (N, OC, OH, OW)."""
    oc, c, kh, kw = k.shape
    cols = im2col_ref(x, kh, kw, s0, s1, p0, p1, d0, d1)          # (N, OH, OW, C*KH*KW)
    return np.einsum("nyxk,ok->noyx", cols, k.reshape(oc, c * kh * kw))


CONV_CASES = {
    # name: (N, C, H, W, OC, KH, KW, s0, s1, p0, p1, d0, d1)
    "3x3": (1, 2, 6, 7, 3, 3, 3, 1, 1, 0, 0, 1, 1),
    "3x3-pad": (2, 3, 5, 5, 4, 3, 3, 1, 1, 1, 1, 1, 1),
    "stride2": (1, 3, 9, 8, 2, 3, 2, 2, 2, 1, 0, 1, 1),
    "patch": (1, 3, 8, 8, 5, 4, 4, 4, 4, 0, 0, 1, 1),         # ViT-style patch embedding
    "dilated": (1, 2, 9, 10, 2, 3, 3, 1, 2, 2, 1, 2, 2),
    "1x1": (2, 4, 3, 5, 6, 1, 1, 1, 1, 0, 0, 1, 1),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_im2col(ctx: GgmlContext, case: str) -> None:
    n, c, h, w, oc, kh, kw, s0, s1, p0, p1, d0, d1 = CONV_CASES[case]
    g = rng(60)
    x = randn(g, n, c, h, w)
    kernel = ctx.zeros(DType.F16, kw, kh, c, oc)             # only its shape matters
    out = ctx.from_numpy(x).im2col(ctx, kernel, s0, s1, p0, p1, d0, d1)
    ref = im2col_ref(x.astype(np.float64), kh, kw, s0, s1, p0, p1, d0, d1)
    assert out.dtype == DType.F32 and out.shape == trim(ref.shape[::-1])
    (got,) = run(ctx, out)
    np.testing.assert_array_equal(got.reshape(ref.shape), ref)


@pytest.mark.parametrize("kernel_type", [DType.F32, DType.F16], ids=lambda d: d.name)
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv2d(ctx: GgmlContext, case: str, kernel_type: DType) -> None:
    n, c, h, w, oc, kh, kw, s0, s1, p0, p1, d0, d1 = CONV_CASES[case]
    g = rng(61)
    x = randn(g, n, c, h, w)
    k = randn(g, oc, c, kh, kw)
    out = ctx.from_numpy(x).conv2d(ctx, ctx.from_numpy(k, kernel_type), s0, s1, p0, p1, d0, d1)
    ref = conv2d_ref(x.astype(np.float64), stored(k, kernel_type), s0, s1, p0, p1, d0, d1)
    assert out.shape == trim(ref.shape[::-1])
    (got,) = run(ctx, out)
    # ggml's conv_2d gathers the image patches as F16 (im2col to F16) before the matmul.
    check(got.reshape(ref.shape), ref, 1e-6, f"conv2d {case}")


def pool2d_ref(x: F64, kind: str, k0: int, k1: int, s0: int, s1: int, p0: int, p1: int) -> F64:
    """Max over the in-bounds part of each window; avg sums the in-bounds part and divides by k0*k1 (padding
    counts as zeros)."""
    n, c, h, w = x.shape
    oh, ow = (h + 2 * p1 - k1) // s1 + 1, (w + 2 * p0 - k0) // s0 + 1
    out = np.empty((n, c, oh, ow))
    for y in range(oh):
        for xx in range(ow):
            y0, x0 = y * s1 - p1, xx * s0 - p0
            win = x[:, :, max(y0, 0):max(y0 + k1, 0), max(x0, 0):max(x0 + k0, 0)]
            out[:, :, y, xx] = win.max(axis=(2, 3)) if kind == "max" else win.sum(axis=(2, 3)) / (k0 * k1)
    return out


POOL_CASES = {
    # name: (N, C, H, W, k0, k1, s0, s1, p0, p1)
    "2x2": (1, 3, 6, 8, 2, 2, 2, 2, 0, 0),
    "3x3-s1": (2, 2, 5, 7, 3, 3, 1, 1, 0, 0),
    "3x3-s2-pad": (1, 2, 7, 7, 3, 3, 2, 2, 1, 1),
    "rect": (1, 1, 6, 9, 3, 2, 3, 2, 0, 1),
    "odd-edge": (1, 2, 7, 5, 2, 2, 2, 2, 0, 0),               # the last row/column is dropped
}


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16], ids=lambda d: d.name)
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_pool2d(ctx: GgmlContext, case: str, kind: str, dtype: DType) -> None:
    n, c, h, w, k0, k1, s0, s1, p0, p1 = POOL_CASES[case]
    x = randn(rng(62), n, c, h, w)
    out = ctx.from_numpy(x, dtype).pool2d(ctx, kind, k0, k1, s0, s1, p0, p1)
    ref = pool2d_ref(stored(x, dtype), kind, k0, k1, s0, s1, p0, p1)
    assert out.dtype == DType.F32 and out.shape == trim(ref.shape[::-1])
    (got,) = run(ctx, out)
    check(got.reshape(ref.shape), ref, 1e-12, f"pool2d {kind} {case}")


def test_pool2d_rejects_unknown_kind(ctx: GgmlContext) -> None:
    with pytest.raises(ValueError, match="pool kind"):
        ctx.from_numpy(np.zeros((1, 4, 4), np.float32)).pool2d(ctx, "min", 2, 2, 2, 2)
