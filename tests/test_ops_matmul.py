"""matmul (+ matmul_full, matmul_id), get_rows, set_rows, copy and cast over float and quantized types, against
numpy references computed from the dequantized bytes each tensor holds."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from ggml import GgmlError, Runtime, RuntimeOptions
from ggml.context import GgmlContext
from ml.dtype import DType
from test_ops_common import (ALL_TYPES, FLOAT_TYPES, MATMUL_NMSE, QUANT_NMSE, QUANT_TYPES, check, ctx, dequant,
                             randn, rng, rt, run, skip, stored, trim, values)

__all__ = ["ctx", "rt"]

F64 = npt.NDArray[np.float64]
GGUF_QUANTIZABLE = (DType.Q8_0, DType.Q4_0, DType.Q4_1, DType.Q5_0)  # gguf.quants has numpy quantizers for these


def _k_unit(dtype: DType) -> int:
    """Smallest legal row length step: the block size (256 for K-quants); floats use an odd size."""
    return dtype.block_size if dtype.is_quantized else 37


def _bcast(a: F64, b_lead: tuple[int, int]) -> F64:
    """Repeat a's dims 2, 3 (numpy axes 1, 0) the way ggml's mul_mat broadcasts: each a-matrix serves
    ne12 / ne02 consecutive b-matrices (repeat, not tile)."""
    a = np.repeat(a, b_lead[1] // a.shape[1], axis=1)
    return np.repeat(a, b_lead[0] // a.shape[0], axis=0)


# (k in units, m, n, a's (ne2, ne3), b's (ne2, ne3))
MATMUL_CASES = [
    (1, 7, 1, (1, 1), (1, 1)),     # mat-vec, rows not a multiple of 8
    (2, 16, 5, (1, 1), (1, 1)),
    (3, 33, 17, (1, 1), (1, 1)),   # odd sizes, several column blocks
    (1, 8, 40, (1, 1), (1, 1)),    # wide enough for the gemm paths
    (1, 12, 3, (2, 1), (4, 3)),    # 4-D, a broadcast over dims 2 and 3
    (2, 5, 2, (3, 2), (3, 2)),     # batched, no broadcast
]


def _case_id(c: tuple[object, ...]) -> str:
    ku, m, n, a23, b23 = c
    return f"k{ku}-m{m}-n{n}-a{a23[0]}x{a23[1]}-b{b23[0]}x{b23[1]}"


@pytest.mark.parametrize("case", MATMUL_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", ALL_TYPES, ids=lambda d: d.name)
def test_matmul(ctx: GgmlContext, dtype: DType, case: tuple[int, int, int, tuple[int, int], tuple[int, int]]) -> None:
    ku, m, n, (a2, a3), (b2, b3) = case
    k = ku * _k_unit(dtype)
    g = rng(20)
    w = ctx.from_numpy(randn(g, a3, a2, m, k), dtype)   # ggml [k, m, a2, a3]
    xb = randn(g, b3, b2, n, k)
    x = ctx.from_numpy(xb)                              # ggml [k, n, b2, b3]
    out = w.matmul(ctx, x)
    assert out.dtype == DType.F32 and out.shape == trim((m, n, b2, b3))
    (got,) = run(ctx, out)
    wv = values(w).reshape(a3, a2, m, k)
    ref = xb.astype(np.float64) @ np.swapaxes(_bcast(wv, (b3, b2)), -1, -2)
    check(got.reshape(b3, b2, n, m), ref, MATMUL_NMSE[dtype], f"matmul {dtype.name}")


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.BF16, DType.Q8_0, DType.Q4_K], ids=lambda d: d.name)
def test_matmul_full(ctx: GgmlContext, dtype: DType) -> None:
    k = 2 * _k_unit(dtype)
    g = rng(21)
    w = ctx.from_numpy(randn(g, 2, 9, k), dtype)
    xb = randn(g, 2, 6, k)
    (got,) = run(ctx, w.matmul_full(ctx, ctx.from_numpy(xb)))
    ref = xb.astype(np.float64) @ np.swapaxes(values(w), -1, -2)
    check(got, ref, MATMUL_NMSE[dtype], f"matmul_full {dtype.name}")


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.Q8_0, DType.Q4_K], ids=lambda d: d.name)
def test_matmul_permuted_activations(ctx: GgmlContext, dtype: DType) -> None:
    """b as a permuted view (rows still contiguous, as attention's q is)."""
    k, m, n, heads = _k_unit(dtype), 6, 4, 3
    g = rng(30)
    w = ctx.from_numpy(randn(g, heads, m, k), dtype)          # ggml [k, m, heads]
    xb = randn(g, n, heads, k)                                # ggml [k, heads, n]
    xp = ctx.from_numpy(xb).permute(ctx, 0, 2, 1, 3)          # ggml [k, n, heads], non-contiguous
    (got,) = run(ctx, w.matmul(ctx, xp))
    ref = np.ascontiguousarray(xb.transpose(1, 0, 2)).astype(np.float64) @ np.swapaxes(values(w), -1, -2)
    check(got, ref, MATMUL_NMSE[dtype], f"matmul permuted b {dtype.name}")


@pytest.mark.parametrize("dtype", [
    DType.F16,  # F32 and Q8_0 weights with F16 b abort ggml-cpu: refused, see test_matmul_b_type_is_checked
], ids=lambda d: d.name)
def test_matmul_f16_activations(ctx: GgmlContext, dtype: DType) -> None:
    """b stored as F16 (the F16 weight's dot type), as K x Q with an F16 cache."""
    g = rng(31)
    w = ctx.from_numpy(randn(g, 2, 7, 40), dtype)
    xb = randn(g, 2, 5, 40)
    (got,) = run(ctx, w.matmul(ctx, ctx.from_numpy(xb, DType.F16)))
    ref = stored(xb, DType.F16) @ np.swapaxes(values(w), -1, -2)
    check(got, ref, MATMUL_NMSE[dtype], f"matmul F16 b {dtype.name}")


def test_matmul_two_threads() -> None:
    """Quantized and f32 products on a 2-thread runtime (the work is split across threads)."""
    g = rng(22)
    xb = randn(g, 24, 512)
    rt2 = Runtime(RuntimeOptions(threads=2))
    try:
        with GgmlContext(rt2) as c:
            for dtype in (DType.F32, DType.Q4_0, DType.Q4_K, DType.Q6_K):
                w = c.from_numpy(randn(g, 40, 512), dtype)
                (got,) = run(c, w.matmul(c, c.from_numpy(xb)))
                check(got, xb.astype(np.float64) @ values(w).T, MATMUL_NMSE[dtype], f"2 threads {dtype.name}")
    finally:
        rt2.close()


# ---------------------------------------------------------------- matmul_id (mixture-of-experts)


@pytest.mark.parametrize("b_rows", ["per-slot", "shared"])
@pytest.mark.parametrize("dtype", ALL_TYPES, ids=lambda d: d.name)
def test_matmul_id(ctx: GgmlContext, dtype: DType, b_rows: str) -> None:
    n_expert, m, n_used, n_tokens = 5, 9, 2, 4
    k = _k_unit(dtype)
    g = rng(23)
    experts = ctx.from_numpy(randn(g, n_expert, m, k), dtype)            # [k, m, n_expert]
    nb1 = n_used if b_rows == "per-slot" else 1
    xb = randn(g, n_tokens, nb1, k)                                       # [k, nb1, n_tokens]
    ids = np.stack([g.permutation(n_expert)[:n_used] for _ in range(n_tokens)]).astype(np.int32)
    out = experts.matmul_id(ctx, ctx.from_numpy(xb), ctx.from_numpy(ids))
    assert out.shape == (m, n_used, n_tokens)
    (got,) = run(ctx, out)
    ev = values(experts)
    ref = np.empty((n_tokens, n_used, m))
    for t in range(n_tokens):
        for e in range(n_used):
            ref[t, e] = ev[ids[t, e]] @ xb[t, e % nb1].astype(np.float64)
    check(got, ref, MATMUL_NMSE[dtype], f"matmul_id {dtype.name}")


# ---------------------------------------------------------------- get_rows


@pytest.mark.parametrize("dtype", ALL_TYPES + (DType.I32,), ids=lambda d: d.name)
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "3d"])
def test_get_rows(ctx: GgmlContext, dtype: DType, batched: bool) -> None:
    n_embd = 2 * _k_unit(dtype) if dtype != DType.I32 else 13
    n_rows, n_ids = 7, 5
    g = rng(24)
    if dtype == DType.I32:
        src = g.integers(-1000, 1000, (2, n_rows, n_embd)).astype(np.int32)
        a = ctx.from_numpy(src if batched else src[0])
    else:
        a = ctx.from_numpy(randn(g, 2, n_rows, n_embd) if batched else randn(g, n_rows, n_embd), dtype)
    ids = g.integers(0, n_rows, (2, n_ids) if batched else (n_ids,)).astype(np.int32)
    ids[..., 0] = n_rows - 1  # include the last row
    out = a.get_rows(ctx, ctx.from_numpy(ids))
    assert out.dtype == (DType.I32 if dtype == DType.I32 else DType.F32)  # quantized rows come out dequantized
    (got,) = run(ctx, out)
    av = a.numpy() if dtype == DType.I32 else values(a)
    if batched:
        ref = np.stack([av[j][ids[j]] for j in range(2)])
    else:
        ref = av[ids]
    if dtype == DType.I32:
        np.testing.assert_array_equal(got, ref)
    else:
        check(got, ref, 1e-12, f"get_rows {dtype.name}")


# ---------------------------------------------------------------- set_rows


SET_ROWS_TYPES = FLOAT_TYPES + QUANT_TYPES


def _quant_check(got: F64, src: npt.NDArray[np.float32], dtype: DType, what: str) -> None:
    """`got` (dequantized ggml output) is `src` stored as `dtype`: within that type's quantization error, and for
    types gguf can quantize, close to gguf's own round trip of the same rows."""
    if dtype.is_quantized:
        check(got, src, QUANT_NMSE[dtype], f"{what} vs source")
        if dtype in GGUF_QUANTIZABLE:
            ref = dequant(quantize(src, GGMLQuantizationType(int(dtype))), dtype)
            check(got, ref, 1e-6, f"{what} vs gguf round trip")
    else:
        check(got, stored(src, dtype), 1e-14, what)


@pytest.mark.parametrize("id_type", [np.int64, np.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("dtype", SET_ROWS_TYPES, ids=lambda d: d.name)
def test_set_rows(ctx: GgmlContext, dtype: DType, id_type: type) -> None:
    n_embd, n_dst, g = 2 * _k_unit(dtype), 6, rng(25)
    init = randn(g, n_dst, n_embd)
    dst = ctx.from_numpy(init, dtype)
    before = dst.numpy().copy()
    src = randn(g, 3, n_embd)
    ids = np.array([4, 0, 5], dtype=id_type)
    view = dst.set_rows(ctx, ctx.from_numpy(src), ctx.from_numpy(ids))
    assert view.dtype == dtype and view.shape == dst.shape
    run(ctx, view)
    after = dst.numpy()  # set_rows writes into dst itself
    untouched = [1, 2, 3]
    assert np.array_equal(np.asarray(after)[untouched], np.asarray(before)[untouched]), "other rows changed"
    assert np.array_equal(np.asarray(view.numpy()), np.asarray(after))
    got = values(dst)[ids]
    _quant_check(got, src, dtype, f"set_rows {dtype.name}")


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.Q8_0], ids=lambda d: d.name)
def test_set_rows_batched(ctx: GgmlContext, dtype: DType) -> None:
    """dst [n_embd, 4, 2] with separate row ids per dim-2 slice (ids [2, 2])."""
    n_embd, g = _k_unit(dtype), rng(26)
    dst = ctx.zeros(dtype, n_embd, 4, 2)
    src = randn(g, 2, 2, n_embd)
    ids = np.array([[3, 1], [0, 2]], np.int64)
    run(ctx, dst.set_rows(ctx, ctx.from_numpy(src), ctx.from_numpy(ids)))
    got = values(dst)
    for j in range(2):
        _quant_check(got[j][ids[j]], src[j], dtype, f"set_rows slice {j}")
        rest = [r for r in range(4) if r not in ids[j]]
        assert not np.any(got[j][rest])


# ---------------------------------------------------------------- copy and cast


@pytest.mark.parametrize("dtype", SET_ROWS_TYPES, ids=lambda d: d.name)
def test_copy_into_other_shape(ctx: GgmlContext, dtype: DType) -> None:
    """copy F32 [2*unit, 4] into dst [4*unit, 2] (same element count) converting to dst's type."""
    unit, g = _k_unit(dtype), rng(27)
    x = randn(g, 4, 2 * unit)
    dst = ctx.zeros(dtype, 4 * unit, 2)
    out = ctx.from_numpy(x).copy(ctx, dst)
    assert out.dtype == dtype and out.shape == (4 * unit, 2)
    run(ctx, out)
    _quant_check(values(dst), x.reshape(2, 4 * unit), dtype, f"copy {dtype.name}")


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.BF16], ids=lambda d: d.name)
def test_copy_non_contiguous_source(ctx: GgmlContext, dtype: DType) -> None:
    x = randn(rng(28), 3, 5, 8)
    src = ctx.from_numpy(x).permute(ctx, 2, 0, 1)  # ggml [8, 5, 3] -> [5, 3, 8]
    dst = ctx.empty(dtype, 5, 3, 8)
    run(ctx, src.copy(ctx, dst))
    check(values(dst), stored(np.ascontiguousarray(x.transpose(2, 0, 1)), dtype), 1e-14, f"copy permuted {dtype.name}")


CASTS = [
    *[(DType.F32, d) for d in (DType.F16, DType.BF16, *QUANT_TYPES)],
    (DType.F16, DType.F32), (DType.F16, DType.BF16), (DType.F16, DType.Q8_0), (DType.F16, DType.Q4_K),
    (DType.BF16, DType.F32), (DType.BF16, DType.F16), (DType.BF16, DType.Q4_0),
    *[(q, DType.F32) for q in QUANT_TYPES],
    (DType.F32, DType.I32), (DType.I32, DType.F32),
]


@pytest.mark.parametrize("src_type,dst_type", CASTS,
                         ids=lambda d: d.name if isinstance(d, DType) else str(d))
def test_cast(ctx: GgmlContext, src_type: DType, dst_type: DType) -> None:
    quant = [d for d in (src_type, dst_type) if d.is_quantized]
    unit = quant[0].block_size if quant else _k_unit(src_type)
    g = rng(29)
    if DType.I32 in (src_type, dst_type):  # integer-valued data converts exactly both ways
        x = g.integers(-5000, 5000, (3, 2 * unit)).astype(np.float32)
        a = ctx.from_numpy(x.astype(np.int32) if src_type == DType.I32 else x)
        (got,) = run(ctx, a.cast(ctx, dst_type))
        np.testing.assert_array_equal(got, x.astype(dst_type.numpy))
        return
    a = ctx.from_numpy(randn(g, 3, 2 * unit), src_type)
    src_values = values(a)
    out = a.cast(ctx, dst_type)
    assert out.dtype == dst_type and out.shape == a.shape
    run(ctx, out)
    got = values(out)
    if src_type.is_quantized:  # dequantization: the same values gguf computes from the same bytes
        check(got, src_values, 1e-12, f"cast {src_type.name}->{dst_type.name}")
    else:
        _quant_check(got, src_values.astype(np.float32), dst_type, f"cast {src_type.name}->{dst_type.name}")


@pytest.mark.parametrize("dtype", [DType.F32, DType.Q8_0], ids=lambda d: d.name)
def test_matmul_b_type_is_checked(ctx: GgmlContext, dtype: DType) -> None:
    """b must be F32 or the weight's own dot type; ggml-cpu's scheduler would abort the process otherwise."""
    g = rng(31)
    w = ctx.from_numpy(randn(g, 2, 7, 64), dtype)
    with pytest.raises(GgmlError, match="mul_mat"):
        w.matmul(ctx, ctx.from_numpy(randn(g, 2, 5, 64), DType.F16))


@pytest.mark.parametrize("src_type,dst_type", [(DType.Q8_0, DType.F16), (DType.Q4_0, DType.Q8_0)],
                         ids=lambda d: d.name)
def test_quantized_cast_to_other_than_f32_is_refused(ctx: GgmlContext, src_type: DType, dst_type: DType) -> None:
    """ggml-cpu only dequantizes to F32 and has no quantized-to-quantized copy (both abort the process)."""
    a = ctx.from_numpy(randn(rng(29), 3, 64), src_type)
    with pytest.raises(GgmlError, match="cpy"):
        a.cast(ctx, dst_type)
