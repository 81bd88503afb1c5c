"""Context behaviour and the element-wise ops (binary with broadcasting, unary, scale, clamp, fused GLUs) against
numpy references, over F32 / F16 / BF16. Other op families: tests/test_ops_{matmul,nn,layout,vision}.py."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from ggml import GgmlError, Runtime
from ggml.context import GgmlContext
from ml.backend import Context, Tensor
from ml.dtype import DType
from test_ops_common import (ELEMENTWISE_NMSE, FLOAT_TYPES, QUANT_TYPES, bf16_round, check, ctx, dequant, randn,
                             rng, rt, run, skip, stored)

__all__ = ["ctx", "rt"]  # fixtures re-exported from test_ops_common

F64 = npt.NDArray[np.float64]


# ---------------------------------------------------------------- Context


def test_context_satisfies_protocols(ctx: GgmlContext) -> None:
    t = ctx.zeros(DType.F32, 4)
    assert isinstance(t, Tensor)
    c: Context = ctx  # static check: GgmlContext implements ml.Context
    assert c is ctx


@pytest.mark.parametrize("dtype,shape", [
    (DType.F32, (7,)), (DType.F16, (5, 3)), (DType.BF16, (4, 3, 2)), (DType.I32, (2, 3, 4, 5)),
    (DType.Q8_0, (64, 3)), (DType.Q4_K, (256, 2, 2)),
], ids=lambda v: v.name if isinstance(v, DType) else "x".join(map(str, v)))
def test_empty_and_zeros(ctx: GgmlContext, dtype: DType, shape: tuple[int, ...]) -> None:
    e = ctx.empty(dtype, *shape)
    assert e.shape == shape and e.dtype == dtype
    row = dtype.row_bytes(shape[0])
    assert e.stride(0) == dtype.block_bytes  # an element, or a whole block for quantized types
    assert e.stride(1) == row
    assert e.nbytes == row * int(np.prod(shape[1:]))
    z = ctx.zeros(dtype, *shape)
    raw = z.numpy()
    assert not np.any(np.asarray(raw).view(np.uint8)), "zeros() is not all zero bytes"
    if dtype.is_quantized:
        assert raw.shape == tuple(reversed(shape[1:])) + (row,)
    else:
        assert raw.shape == tuple(reversed(shape))


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16, np.int32, np.int64, np.int8, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_from_numpy_roundtrip(ctx: GgmlContext, np_dtype: Any) -> None:
    x = (rng(1).standard_normal((3, 4, 5)) * 50).astype(np_dtype)
    t = ctx.from_numpy(x)
    assert t.shape == (5, 4, 3)
    got = t.numpy()
    assert got.dtype == x.dtype and np.array_equal(got, x)


def test_from_numpy_bf16_rounds_to_nearest_even(ctx: GgmlContext) -> None:
    x = np.array([1.0, 1.00390625, 1.01171875, -3.14159, 1e30, -1e-30, 0.0], np.float32)
    got = ctx.from_numpy(x, DType.BF16).numpy()
    assert got.dtype == np.float32
    assert np.array_equal(got, bf16_round(x))
    assert got[1] == 1.0 and got[2] == 1.015625  # ties go to even


def test_from_numpy_f16_conversion_and_scalar(ctx: GgmlContext) -> None:
    x = randn(rng(2), 6, 9)
    assert np.array_equal(ctx.from_numpy(x, DType.F16).numpy(), x.astype(np.float16))
    s = ctx.from_numpy(np.float32(2.5))
    assert s.shape == (1,) and s.numpy().tolist() == [2.5]


@pytest.mark.parametrize("dtype", QUANT_TYPES, ids=lambda d: d.name)
def test_from_numpy_quantized(ctx: GgmlContext, dtype: DType) -> None:
    x = randn(rng(3), 3, 512)
    t = ctx.from_numpy(x, dtype)
    raw = t.numpy()
    assert raw.dtype == np.uint8 and raw.shape == (3, dtype.row_bytes(512))
    got = dequant(raw, dtype)
    err = float(np.mean((got - x) ** 2) / np.mean(x * x))
    assert err < 0.02, f"{dtype.name} round trip nmse {err}"
    # Raw block bytes are taken as they are.
    again = ctx.from_numpy(raw, dtype)
    assert np.array_equal(again.numpy(), raw)


@pytest.mark.parametrize("dtype,args", [
    (DType.F32, (0, 10)), (DType.F32, (-1.5, 2.0, 0.25)), (DType.F16, (0, 8, 0.5)), (DType.I32, (3, 20, 4)),
    (DType.I64, (0, 5)),
], ids=["f32", "f32-step", "f16", "i32", "i64"])
def test_arange(ctx: GgmlContext, dtype: DType, args: tuple[float, ...]) -> None:
    t = ctx.arange(*args, dtype=dtype)
    assert t.dtype == dtype
    np.testing.assert_array_equal(t.numpy(), np.arange(*args).astype(dtype.numpy))


def test_forward_chains_and_computes_several_outputs(ctx: GgmlContext) -> None:
    x, y = randn(rng(4), 3, 8), randn(rng(5), 3, 8)
    a, b = ctx.from_numpy(x), ctx.from_numpy(y)
    s, p, n = a.add(ctx, b), a.mul(ctx, b), a.neg(ctx)
    assert ctx.forward(s) is ctx
    assert ctx.forward(p).forward(n) is ctx
    ctx.compute(s, p, n)
    check(s.numpy(), x.astype(np.float64) + y, 1e-12, "add")
    check(p.numpy(), x.astype(np.float64) * y, 1e-12, "mul")
    assert np.array_equal(n.numpy(), -x)
    assert ctx.n_nodes >= 3


def test_compute_twice_reuses_graph(ctx: GgmlContext) -> None:
    x = randn(rng(6), 4, 4)
    a = ctx.from_numpy(x)
    out = a.sqr(ctx)
    ctx.compute(out)
    first = out.numpy().copy()
    ctx.set(a, x * 2)
    ctx.compute(out)
    check(first, x.astype(np.float64) ** 2, 1e-12, "first")
    check(out.numpy(), (2.0 * x) ** 2, 1e-12, "second")


def test_compute_again_after_adding_nodes(rt: Runtime) -> None:
    """A context computes, gains more nodes, computes again: the earlier nodes are placed anew with the new ones
    (not left at the first allocation's addresses, where the allocator would put the new nodes over them, or in a
    compute buffer it freed when it grew), and every output is right."""
    from ggml._lib import ffi
    g = rng(7)
    with GgmlContext(rt) as c:
        x = randn(g, 24, 64)
        small = c.from_numpy(x).sqr(c)
        c.compute(small)
        wide = [c.from_numpy(randn(g, 96, 64)).mul(c, c.from_numpy(randn(g, 96, 64))) for _ in range(4)]
        c.compute(small, *wide)  # a graph needing a larger compute buffer than the first
        spans = sorted((int(ffi.cast("uintptr_t", t._ptr.data)), t.nbytes) for t in (small, *wide))
        assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])), "two results share memory"
        check(small.numpy(), x.astype(np.float64) ** 2, 1e-12, "first output, recomputed")
        c.compute(small)
        check(small.numpy(), x.astype(np.float64) ** 2, 1e-12, "third compute")


def test_numpy_before_compute_raises(ctx: GgmlContext) -> None:
    a = ctx.from_numpy(randn(rng(7), 2, 3))
    out = a.add(ctx, a)
    with pytest.raises(GgmlError, match="compute"):
        out.numpy()
    ctx.forward(out)
    with pytest.raises(GgmlError):
        out.numpy()  # in the graph but not computed yet


def test_non_contiguous_numpy_raises(ctx: GgmlContext) -> None:
    a = ctx.from_numpy(randn(rng(8), 3, 5))
    t = a.transpose(ctx)
    with pytest.raises(GgmlError, match="contiguous"):
        ctx.compute(t)  # values are copied out at compute, which needs a contiguous tensor
    ctx.compute()
    with pytest.raises(GgmlError, match="contiguous"):
        t.numpy()
    (got,) = run(ctx, t.contiguous(ctx))
    np.testing.assert_array_equal(got, a.numpy().T)


def test_close_then_use_raises(rt: Runtime) -> None:
    c = GgmlContext(rt)
    a = c.from_numpy(np.arange(4, dtype=np.float32))
    out = a.scale(c, 3.0)
    c.compute(out)
    c.close()
    np.testing.assert_array_equal(out.numpy(), np.arange(4) * 3.0)  # computed values were copied out
    with pytest.raises(GgmlError, match="closed"):
        c.empty(DType.F32, 4)
    with pytest.raises(GgmlError, match="closed"):
        c.from_numpy(np.zeros(3, np.float32))
    with pytest.raises(GgmlError, match="closed"):
        a.add(c, a)
    with pytest.raises(GgmlError, match="closed"):
        c.forward(out)
    with pytest.raises(GgmlError, match="closed"):
        c.compute(out)
    with pytest.raises(GgmlError, match="closed"):
        a.numpy()  # an input tensor: its buffer was freed with the context
    c.close()  # closing twice is harmless


def test_context_manager_and_layer_view(rt: Runtime) -> None:
    with GgmlContext(rt) as c:
        lc = c.layer(0)
        t = lc.from_numpy(np.ones((2, 3), np.float32))
        out = t.add(lc, t)
        lc.compute(out)
        np.testing.assert_array_equal(out.numpy(), np.full((2, 3), 2.0))
        assert c.n_nodes == lc.n_nodes  # one graph
    with pytest.raises(GgmlError):
        c.empty(DType.F32, 1)


def test_bad_shapes_raise(ctx: GgmlContext) -> None:
    with pytest.raises(ValueError):
        ctx.empty(DType.F32, 1, 2, 3, 4, 5)
    with pytest.raises(GgmlError):
        ctx.set(ctx.empty(DType.F32, 4), np.zeros(5, np.float32))
    with pytest.raises(ValueError):
        ctx.stack(0)


# ---------------------------------------------------------------- binary ops (b broadcasts onto a by repetition)

BINARY: dict[str, Callable[[F64, F64], F64]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
}
# numpy shapes of (a, b); b tiles onto a, including ggml's modulo repetition where b's dim divides a's.
BCAST_SHAPES = [
    ((7,), (7,)), ((3, 5), (1, 5)), ((4, 6), (2, 3)), ((2, 3, 33), (3, 1)), ((2, 3, 4, 8), (1, 3, 1, 8)),
    ((2, 2, 3, 5), (1,)),
]
BINARY_TYPES = [(DType.F32, DType.F32), (DType.F16, DType.F16), (DType.BF16, DType.BF16),
                (DType.F16, DType.F32), (DType.BF16, DType.F32)]


def _tile(b: F64, like: tuple[int, ...]) -> F64:
    b = b.reshape((1,) * (len(like) - b.ndim) + b.shape)
    return np.tile(b, tuple(n // m for n, m in zip(like, b.shape)))


@pytest.mark.parametrize("shapes", BCAST_SHAPES,
                         ids=lambda s: f"{'x'.join(map(str, s[0]))}-by-{'x'.join(map(str, s[1]))}")
@pytest.mark.parametrize("types", BINARY_TYPES, ids=lambda t: f"{t[0].name}-{t[1].name}")
@pytest.mark.parametrize("op", sorted(BINARY))
def test_binary(ctx: GgmlContext, op: str, types: tuple[DType, DType], shapes: tuple[tuple[int, ...], ...]) -> None:
    g = rng(10)
    ta, tb = types
    xa = randn(g, *shapes[0])
    xb = randn(g, *shapes[1])
    if op == "div":  # keep divisors away from zero
        xb = (np.sign(xb) + (xb == 0)) * (0.5 + np.abs(xb) % 1.0)
    a, b = ctx.from_numpy(xa, ta), ctx.from_numpy(xb, tb)
    out = getattr(a, op)(ctx, b)
    assert out.dtype == ta and out.shape == a.shape
    (got,) = run(ctx, out)
    ref = BINARY[op](stored(xa, ta), _tile(stored(xb, tb), xa.shape))
    check(got, ref, ELEMENTWISE_NMSE[ta], f"{op} {ta.name}/{tb.name}")


# ---------------------------------------------------------------- unary ops

GELU_C = np.sqrt(2.0 / np.pi)


def _gelu(x: F64) -> F64:  # tanh approximation, as ggml
    return 0.5 * x * (1.0 + np.tanh(GELU_C * x * (1.0 + 0.044715 * x * x)))


def _sigmoid(x: F64) -> F64:
    return 1.0 / (1.0 + np.exp(-x))


UNARY: dict[str, tuple[Callable[[F64], F64], Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]]] = {
    # op: (reference, input transform keeping the op's domain)
    "neg": (np.negative, lambda x: x),
    "sqr": (np.square, lambda x: x),
    "sqrt": (np.sqrt, lambda x: np.abs(x) * 4),
    "sin": (np.sin, lambda x: x * 4),
    "cos": (np.cos, lambda x: x * 4),
    "tanh": (np.tanh, lambda x: x * 2),
    "sigmoid": (_sigmoid, lambda x: x * 4),
    "relu": (lambda x: np.maximum(x, 0.0), lambda x: x),
    "silu": (lambda x: x * _sigmoid(x), lambda x: x * 4),
    "gelu": (_gelu, lambda x: x * 4),
    "gelu_quick": (lambda x: x * _sigmoid(1.702 * x), lambda x: x * 4),
}
# gelu / gelu_quick on F32 look up a table indexed by the f16-rounded input: f16-level error.
UNARY_F32_NMSE = {"gelu": 1e-6, "gelu_quick": 1e-6}
UNARY_SHAPES = [(1,), (37,), (3, 65), (2, 3, 17), (2, 2, 3, 9)]


@pytest.mark.parametrize("shape", UNARY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary(ctx: GgmlContext, op: str, dtype: DType, shape: tuple[int, ...]) -> None:
    ref_fn, prep = UNARY[op]
    x = prep(randn(rng(11), *shape))
    t = ctx.from_numpy(x, dtype)
    out = getattr(t, op)(ctx)
    assert out.dtype == dtype and out.shape == t.shape
    (got,) = run(ctx, out)
    tol = max(ELEMENTWISE_NMSE[dtype], UNARY_F32_NMSE.get(op, 0.0))
    check(got, ref_fn(stored(x, dtype)), tol, f"{op} {dtype.name}")


@pytest.mark.parametrize("shape", [(5,), (3, 33), (2, 2, 4, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [
    DType.F32, DType.BF16,  # F16 aborts ggml-cpu: refused, see UNSUPPORTED
], ids=lambda d: d.name)
@pytest.mark.parametrize("s", [0.125, -3.0, 0.0])
def test_scale(ctx: GgmlContext, dtype: DType, shape: tuple[int, ...], s: float) -> None:
    x = randn(rng(12), *shape)
    (got,) = run(ctx, ctx.from_numpy(x, dtype).scale(ctx, s))
    ref = stored(x, dtype) * s
    if s == 0.0:
        assert not np.any(got)
    else:
        check(got, ref, ELEMENTWISE_NMSE[dtype], f"scale {dtype.name}")


@pytest.mark.parametrize("dtype", [
    DType.F32, DType.F16,  # BF16 aborts ggml-cpu: refused, see UNSUPPORTED
], ids=lambda d: d.name)
@pytest.mark.parametrize("lo,hi", [(-0.5, 0.5), (0.0, 10.0), (-1e30, 1e30)], ids=["sym", "pos", "wide"])
def test_clamp(ctx: GgmlContext, dtype: DType, lo: float, hi: float) -> None:
    x = randn(rng(13), 3, 4, 19) * 2
    (got,) = run(ctx, ctx.from_numpy(x, dtype).clamp(ctx, lo, hi))
    check(got, np.clip(stored(x, dtype), lo, hi), ELEMENTWISE_NMSE[dtype], f"clamp {dtype.name}")


@pytest.mark.parametrize("shape", [(6,), (3, 64), (2, 3, 17)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("glu", ["swiglu", "geglu"])
def test_glu(ctx: GgmlContext, glu: str, dtype: DType, shape: tuple[int, ...]) -> None:
    g = rng(14)
    xg, xu = randn(g, *shape) * 3, randn(g, *shape)
    gate, up = ctx.from_numpy(xg, dtype), ctx.from_numpy(xu, dtype)
    out = getattr(gate, glu)(ctx, up)
    (got,) = run(ctx, out)
    a, b = stored(xg, dtype), stored(xu, dtype)
    act = a * _sigmoid(a) if glu == "swiglu" else _gelu(a)
    tol = max(ELEMENTWISE_NMSE[dtype], 1e-6 if glu == "geglu" else 0.0)
    check(got, act * b, tol, f"{glu} {dtype.name}")


# ---------------------------------------------------------------- combinations ggml-cpu lacks

# (op, input type): ggml-cpu has no kernel and would abort the whole process (GGML_ABORT); ggml/guards.py refuses
# each one with a GgmlError before ggml sees it. Without the guard, these tests would kill the test process.
_F32_ONLY = ["rms_norm", "layer_norm", "softmax", "sum_rows", "mean", "argmax", "top_k", "pad", "im2col"]
UNSUPPORTED = [
    *[(op, d, "ggml-cpu implements it for F32 input only") for op in _F32_ONLY for d in (DType.F16, DType.BF16)],
    ("rope", DType.BF16, "ggml-cpu rope supports F32/F16 only"),
    ("scale", DType.F16, "ggml-cpu scale supports F32/BF16 only"),
    ("clamp", DType.BF16, "ggml-cpu clamp supports F32/F16 only"),
    *[(op, DType.Q8_0, "no element-wise kernels for quantized tensors")
      for op in ("add", "mul", "sqr", "silu", "repeat", "pad")],
]


@pytest.mark.parametrize("op,dtype", [pytest.param(op, d, id=f"{op}-{d.name}") for op, d, _ in UNSUPPORTED])
def test_unsupported_type_combinations_are_refused(ctx: GgmlContext, op: str, dtype: DType) -> None:
    """Each combination ggml-cpu would abort on raises GgmlError when the op is built (see UNSUPPORTED)."""
    t = ctx.from_numpy(randn(rng(15), 4, 64), dtype)
    args: dict[str, tuple[Any, ...]] = {
        "rms_norm": (1e-5,), "layer_norm": (1e-5,), "top_k": (2,), "pad": (1,), "add": (t,), "mul": (t,),
        "repeat": (t,), "im2col": (ctx.zeros(DType.F16, 3, 3, 1, 1), 1, 1, 0, 0),
        "rope": (ctx.from_numpy(np.zeros(4, np.int32)), 64, 10000.0), "scale": (0.5,), "clamp": (-1.0, 1.0),
    }
    with pytest.raises(GgmlError, match={"layer_norm": "norm", "softmax": "soft_max"}.get(op, op)):
        run(ctx, getattr(t, op)(ctx, *args.get(op, ())))
