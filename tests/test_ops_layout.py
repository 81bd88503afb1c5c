"""Shape and layout ops (reshape, view, permute, transpose, contiguous, concat, pad, repeat, stack) and reductions
(sum_rows, mean, argmax, top_k) against numpy. Arrays are numpy-ordered; `.T` turns them into ggml order."""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from ggml.context import GgmlContext
from ml.dtype import DType
from test_ops_common import check, ctx, randn, rng, rt, run, trim, values

__all__ = ["ctx", "rt"]

LAYOUT_TYPES = [DType.F32, DType.F16, DType.I32]


def _data(dtype: DType, *shape: int, seed: int = 40) -> npt.NDArray[Any]:
    """Exactly representable data of `dtype` (numpy shape), so layout ops must reproduce it bit for bit."""
    g = rng(seed)
    if dtype == DType.I32:
        return g.integers(-(2**31), 2**31 - 1, shape, dtype=np.int64).astype(np.int32)
    return randn(g, *shape).astype(dtype.numpy)


def _ids(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s))


# ---------------------------------------------------------------- reshape


@pytest.mark.parametrize("np_shape,new", [
    ((24,), (4, 6)), ((2, 3, 4), (12, 2)), ((2, 3, 4), (24,)), ((2, 3, 4, 5), (5, 4, 6)),
    ((6, 4), (2, 2, 3, 2)), ((1, 1, 7), (7,)),
], ids=lambda v: _ids(v))
@pytest.mark.parametrize("dtype", LAYOUT_TYPES, ids=lambda d: d.name)
def test_reshape(ctx: GgmlContext, dtype: DType, np_shape: tuple[int, ...], new: tuple[int, ...]) -> None:
    x = _data(dtype, *np_shape)
    out = ctx.from_numpy(x).reshape(ctx, *new)
    assert out.shape == trim(new)
    (got,) = run(ctx, out)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, x.reshape(tuple(reversed(trim(new)))))


def test_reshape_quantized_rows(ctx: GgmlContext) -> None:
    x = randn(rng(41), 2, 128)
    t = ctx.from_numpy(x, DType.Q8_0)                  # ggml [128, 2], 136 bytes a row
    (got,) = run(ctx, t.reshape(ctx, 64, 4))
    np.testing.assert_array_equal(got, t.numpy().reshape(4, 68))


# ---------------------------------------------------------------- view


@pytest.mark.parametrize("dtype", LAYOUT_TYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("case", ["block", "every-other-row", "rows", "flat", "plane"])
def test_view(ctx: GgmlContext, dtype: DType, case: str) -> None:
    x = _data(dtype, 4, 6, 8)                          # ggml [8, 6, 4]
    es = x.itemsize
    nb1, nb2 = 8 * es, 48 * es
    t = ctx.from_numpy(x)
    # (offset bytes, view shape (ggml order), byte strides of dims 1.., numpy reference)
    views = {
        "block": (1 * nb1 + 2 * es, (3, 2, 2), (nb1, nb2), x[0:2, 1:3, 2:5]),
        "every-other-row": (0, (8, 3, 4), (2 * nb1, nb2), x[:, ::2, :]),
        "rows": (2 * nb1, (8, 3), (), x.reshape(24, 8)[2:5]),
        "flat": (5 * es, (7,), (), x.ravel()[5:12]),
        "plane": (nb2, (8, 6, 2), (nb1, nb2), x[1:3]),
    }
    offset, shape, strides, ref = views[case]
    v = t.view(ctx, offset, shape, strides)
    assert v.shape == shape and v.dtype == dtype
    if strides:
        assert [v.stride(i + 1) for i in range(len(strides))] == list(strides)
    (got,) = run(ctx, v.contiguous(ctx))
    np.testing.assert_array_equal(got, ref)


def test_view_quantized(ctx: GgmlContext) -> None:
    """Views of Q8_0 data address whole rows and blocks (34 bytes per 32 values)."""
    t = ctx.from_numpy(randn(rng(42), 4, 128), DType.Q8_0)  # ggml [128, 4], 136 bytes a row
    raw = t.numpy()
    rows = t.view(ctx, 136, (128, 2))                        # rows 1..2
    half = t.view(ctx, 34, (64, 4), (136,))                  # blocks 1..2 of every row
    as_f32 = half.cast(ctx, DType.F32)
    got_rows, got_half, got_f32 = run(ctx, rows, half.contiguous(ctx), as_f32)
    np.testing.assert_array_equal(got_rows, raw[1:3])
    np.testing.assert_array_equal(got_half, raw[:, 34:102])
    check(got_f32, values(t)[:, 32:96], 1e-14, "Q8_0 view -> F32")


# ---------------------------------------------------------------- permute / transpose / contiguous


@pytest.mark.parametrize("axes", [(1, 0, 2, 3), (0, 2, 1, 3), (2, 0, 3, 1), (3, 2, 1, 0), (1, 2, 3, 0)],
                         ids=lambda a: "".join(map(str, a)))
@pytest.mark.parametrize("dtype", LAYOUT_TYPES, ids=lambda d: d.name)
def test_permute(ctx: GgmlContext, dtype: DType, axes: tuple[int, ...]) -> None:
    x = _data(dtype, 2, 3, 4, 5)                       # ggml [5, 4, 3, 2]
    p = ctx.from_numpy(x).permute(ctx, *axes)
    xg = x.T                                           # ggml-ordered
    ref_g = np.transpose(xg, np.argsort(axes))         # dim i of x becomes dim axes[i]
    assert p.shape == ref_g.shape
    (got,) = run(ctx, p.contiguous(ctx))
    np.testing.assert_array_equal(got, ref_g.T)


def test_permute_3d(ctx: GgmlContext) -> None:
    x = _data(DType.F32, 2, 3, 4)                      # ggml [4, 3, 2]
    (got,) = run(ctx, ctx.from_numpy(x).permute(ctx, 1, 2, 0).contiguous(ctx))
    np.testing.assert_array_equal(got, np.transpose(x.T, (2, 0, 1)).T)  # ggml [2, 4, 3]


@pytest.mark.parametrize("np_shape", [(3, 5), (2, 3, 5), (2, 2, 3, 5)], ids=_ids)
@pytest.mark.parametrize("dtype", LAYOUT_TYPES, ids=lambda d: d.name)
def test_transpose(ctx: GgmlContext, dtype: DType, np_shape: tuple[int, ...]) -> None:
    x = _data(dtype, *np_shape)
    tt = ctx.from_numpy(x).transpose(ctx)
    assert tt.stride(0) == x.itemsize * np_shape[-1]   # a view: dim 0 now steps over the old rows
    (got,) = run(ctx, tt.contiguous(ctx))
    np.testing.assert_array_equal(got, np.swapaxes(x, -1, -2))


def test_contiguous_of_contiguous_and_double_transpose(ctx: GgmlContext) -> None:
    x = _data(DType.F32, 3, 7)
    t = ctx.from_numpy(x)
    a, b = run(ctx, t.contiguous(ctx), t.transpose(ctx).transpose(ctx).contiguous(ctx))
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(b, x)


# ---------------------------------------------------------------- concat / pad / repeat / stack


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", LAYOUT_TYPES, ids=lambda d: d.name)
def test_concat(ctx: GgmlContext, dtype: DType, dim: int) -> None:
    a_np = _data(dtype, 2, 3, 4, 5, seed=43)
    b_shape = list(a_np.shape)
    b_shape[3 - dim] = 3                               # ggml dim d is numpy axis 3 - d
    b_np = _data(dtype, *b_shape, seed=44)
    out = ctx.from_numpy(a_np).concat(ctx, ctx.from_numpy(b_np), dim)
    (got,) = run(ctx, out)
    np.testing.assert_array_equal(got, np.concatenate([a_np, b_np], axis=3 - dim))


@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("dtype", [DType.Q8_0, DType.Q4_K], ids=lambda d: d.name)
def test_concat_quantized(ctx: GgmlContext, dtype: DType, dim: int) -> None:
    """Quantized tensors concatenate block-wise (rows of whole blocks)."""
    bs, g = dtype.block_size, rng(47)
    a = ctx.from_numpy(randn(g, 2, 3, 2 * bs), dtype)         # ggml [2*bs, 3, 2]
    b_np = [2, 3, 2 * bs]
    b_np[2 - dim] = {0: bs, 1: 4, 2: 1}[dim]
    b = ctx.from_numpy(randn(g, *b_np), dtype)
    out = a.concat(ctx, b, dim)
    (got,) = run(ctx, out)
    assert out.dtype == dtype
    b_raw = b.numpy().reshape(b_np[0], b_np[1], -1)  # numpy() drops the leading 1 of a [n, 3, 1] tensor
    np.testing.assert_array_equal(got, np.concatenate([a.numpy(), b_raw], axis=2 - dim))  # raw block bytes


def test_concat_non_contiguous_input(ctx: GgmlContext) -> None:
    a_np, b_np = _data(DType.F32, 6, 4), _data(DType.F32, 2, 6, seed=45)
    at = ctx.from_numpy(a_np).transpose(ctx)           # ggml [6, 4]
    (got,) = run(ctx, at.concat(ctx, ctx.from_numpy(b_np), 1))
    np.testing.assert_array_equal(got, np.concatenate([a_np.T, b_np], axis=0))


@pytest.mark.parametrize("np_shape,pads", [
    ((5,), (3,)), ((3, 4), (2, 1)), ((2, 3, 4), (0, 2, 1)), ((2, 2, 3, 4), (1, 0, 2, 1)), ((3, 4), (0, 0)),
], ids=lambda v: _ids(v))
def test_pad(ctx: GgmlContext, np_shape: tuple[int, ...], pads: tuple[int, ...]) -> None:
    x = _data(DType.F32, *np_shape)
    (got,) = run(ctx, ctx.from_numpy(x).pad(ctx, *pads))
    widths = [(0, p) for p in reversed(pads)]
    np.testing.assert_array_equal(got, np.pad(x, widths))


@pytest.mark.parametrize("src,like", [
    ((1,), (7,)), ((3,), (2, 6)), ((1, 3, 2), (2, 6, 4)), ((2, 1, 1, 3), (2, 2, 3, 6)),
], ids=lambda v: _ids(v))
@pytest.mark.parametrize("dtype", LAYOUT_TYPES, ids=lambda d: d.name)
def test_repeat(ctx: GgmlContext, dtype: DType, src: tuple[int, ...], like: tuple[int, ...]) -> None:
    x = _data(dtype, *src)
    shape = ctx.empty(DType.F32, *reversed(like))
    (got,) = run(ctx, ctx.from_numpy(x).repeat(ctx, shape))
    xs = x.reshape((1,) * (len(like) - x.ndim) + x.shape)
    np.testing.assert_array_equal(got, np.tile(xs, tuple(n // m for n, m in zip(like, xs.shape))))


@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("dtype", [DType.F32, DType.F16], ids=lambda d: d.name)
def test_stack(ctx: GgmlContext, dtype: DType, dim: int) -> None:
    parts = [_data(dtype, 3, 4, seed=46 + i) for i in range(3)]  # each ggml [4, 3]
    out = ctx.stack(dim, *[ctx.from_numpy(p) for p in parts])
    ref = np.stack([p.T for p in parts], axis=dim).T   # stack in ggml order
    assert out.shape == ref.shape[::-1]
    (got,) = run(ctx, out)
    np.testing.assert_array_equal(got, ref)


def test_stack_3d_along_dim3(ctx: GgmlContext) -> None:
    parts = [_data(DType.F32, 2, 3, 4, seed=50 + i) for i in range(2)]
    (got,) = run(ctx, ctx.stack(3, *[ctx.from_numpy(p) for p in parts]))
    np.testing.assert_array_equal(got, np.stack(parts))


def test_stack_single(ctx: GgmlContext) -> None:
    x = _data(DType.F32, 3, 4)
    (got,) = run(ctx, ctx.stack(1, ctx.from_numpy(x)))
    np.testing.assert_array_equal(got, x.reshape(3, 1, 4))


# ---------------------------------------------------------------- reductions

RED_SHAPES = [(9,), (4, 257), (2, 3, 16), (2, 2, 3, 5)]


@pytest.mark.parametrize("np_shape", RED_SHAPES, ids=_ids)
@pytest.mark.parametrize("op", ["sum_rows", "mean"])
def test_row_reductions(ctx: GgmlContext, op: str, np_shape: tuple[int, ...]) -> None:
    x = randn(rng(52), *np_shape) + 0.5
    out = getattr(ctx.from_numpy(x), op)(ctx)
    assert out.shape[0] == 1 and out.dtype == DType.F32
    (got,) = run(ctx, out)
    fn = np.sum if op == "sum_rows" else np.mean
    check(got, fn(x.astype(np.float64), axis=-1, keepdims=True), 1e-12, op)


@pytest.mark.parametrize("np_shape", [(1,), (17,), (5, 37), (3, 1000)], ids=_ids)
def test_argmax(ctx: GgmlContext, np_shape: tuple[int, ...]) -> None:
    g = rng(53)
    x = (g.permutation(int(np.prod(np_shape))).reshape(np_shape) - 2000).astype(np.float32)  # distinct values
    out = ctx.from_numpy(x).argmax(ctx)
    assert out.dtype == DType.I32
    (got,) = run(ctx, out)
    np.testing.assert_array_equal(got.reshape(-1), np.argmax(x.reshape(-1, np_shape[-1]), axis=-1))


@pytest.mark.parametrize("np_shape,k", [((10,), 3), ((4, 50), 1), ((4, 50), 5), ((3, 64), 64), ((2, 3, 40), 7)],
                         ids=lambda v: _ids(v) if isinstance(v, tuple) else f"k{v}")
def test_top_k(ctx: GgmlContext, np_shape: tuple[int, ...], k: int) -> None:
    g = rng(54)
    rows = [g.permutation(np_shape[-1]) for _ in range(int(np.prod(np_shape[:-1])))]
    x = (np.stack(rows).reshape(np_shape) * 0.37 - 5).astype(np.float32)  # distinct within each row
    out = ctx.from_numpy(x).top_k(ctx, k)
    assert out.dtype == DType.I32 and out.shape[0] == k
    (got,) = run(ctx, out)
    got2 = got.reshape(-1, k)
    want = np.argsort(-x.reshape(-1, np_shape[-1]), axis=-1, kind="stable")[:, :k]
    # ggml gives the k best in no particular order: compare as sets
    np.testing.assert_array_equal(np.sort(got2, axis=-1), np.sort(want, axis=-1))
