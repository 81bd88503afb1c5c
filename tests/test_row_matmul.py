"""The row kernels (ggml/row_matmul.c) compute every element bit for bit as ggml's reference mat-mul does, for any
number of columns and threads, and the runner's models take them for their Q4_1 / Q8_0 / Q4_K / Q6_K weights.

The reference is ggml_mul_mat itself, with the row kernels switched off (RuntimeOptions.row_matmul): it calls the
weight type's vec_dot once per element (ggml's llamafile GEMM, which takes Q8_0 batches, matches vec_dot bit for
bit, which the batch-size sweep also shows). Row counts that are no multiple of the kernels' 2-row and 64-row
tiles and column counts on both sides of their 4-column tiles exercise every remainder path.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import ggml.row_matmul as row_matmul
from ggml import Runtime, RuntimeOptions
from ggml.backend import load_backend
from ggml.context import GgmlContext
from ggml._lib import lib
from ml.batch import Batch
from ml.dtype import DType
from models import load_model

TYPES = [DType.Q4_1, DType.Q8_0, DType.Q4_K, DType.Q6_K]
COLUMNS = (1, 2, 3, 4, 5, 7, 8, 33)

pytestmark = pytest.mark.skipif(not lib.pyrunner_row_matmul_supports(int(DType.Q4_1)),
                                reason="the row kernels need AVX2, FMA and F16C")


def _runtime(threads: int, row: bool) -> Runtime:
    return Runtime(RuntimeOptions(threads=threads, row_matmul=row, adaptive_threads=False))


def _matmul(rt: Runtime, w: np.ndarray, dtype: DType, x: np.ndarray) -> np.ndarray:
    """w (m, k) quantized to dtype, times x (..., k) in f32; numpy order (..., m)."""
    wctx, ctx = GgmlContext(rt, 4), GgmlContext(rt, 16)
    try:
        wt = wctx.from_numpy(w, dtype)
        out = wt.matmul(ctx, ctx.from_numpy(x))
        ctx.forward(out).compute(out)
        return np.array(out.numpy()).reshape(*x.shape[:-1], w.shape[0])
    finally:
        ctx.close()
        wctx.close()


@pytest.fixture(scope="module")
def runtimes() -> Iterator[dict[tuple[int, bool], Runtime]]:
    rts = {(t, row): _runtime(t, row) for t in (1, 2) for row in (False, True)}
    yield rts
    for rt in rts.values():
        rt.close()


def _shapes(dtype: DType) -> list[tuple[int, int]]:
    """(rows, row length): row counts off the 2-row and 64-row tiles; lengths of one and of several blocks."""
    return [(131, 512), (70, 256), (300, 1536)] if dtype.block_size == 256 else [(131, 576), (1000, 64)]


VARIANTS = [False] + ([True] if row_matmul.vnni() else [])  # the Q4_1 / Q8_0 kernels' AVX2 and AVX-VNNI builds


@pytest.mark.parametrize("m,k,dtype,use_vnni", [(m, k, d, v) for d in TYPES for m, k in _shapes(d)
                                                for v in (VARIANTS if d.block_size == 32 else [False])],
                         ids=lambda v: v.name if isinstance(v, DType) else str(v))
def test_equals_ggml_reference_for_every_batch_size(runtimes: dict[tuple[int, bool], Runtime], dtype: DType,
                                                    m: int, k: int, use_vnni: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Both builds of the Q4_1 / Q8_0 kernels (AVX2 and AVX-VNNI integer sums) equal ggml's reference."""
    monkeypatch.setattr(row_matmul, "vnni", lambda: use_vnni)
    g = np.random.default_rng(m + k)
    w = (g.standard_normal((m, k)) * 0.05).astype(np.float32)
    x = g.standard_normal((max(COLUMNS), k)).astype(np.float32)
    alone = _matmul(runtimes[1, True], w, dtype, x[:1])[0]
    for n in COLUMNS:
        ref = _matmul(runtimes[1, False], w, dtype, x[:n])
        for threads in (1, 2):
            got = _matmul(runtimes[threads, True], w, dtype, x[:n])
            assert np.array_equal(got, ref), f"{n} columns, {threads} threads"
        assert np.array_equal(got[0], alone), f"column 0 changed next to {n - 1} others"


@pytest.mark.parametrize("dtype", TYPES, ids=lambda d: d.name)
def test_3d_activations(runtimes: dict[tuple[int, bool], Runtime], dtype: DType) -> None:
    g = np.random.default_rng(5)
    k = 256 if dtype.block_size == 256 else 96
    w = (g.standard_normal((70, k)) * 0.05).astype(np.float32)
    x = g.standard_normal((2, 3, k)).astype(np.float32)
    ref = _matmul(runtimes[1, False], w, dtype, x)
    assert ref.shape == (2, 3, 70)
    assert np.array_equal(_matmul(runtimes[2, True], w, dtype, x), ref)


def test_mat_muls_of_one_input_share_its_cast(runtimes: dict[tuple[int, bool], Runtime]) -> None:
    """Two mat-muls of one input quantize it once (one cast node for both: the q/k/v and gate/up projections of a
    layer), two of different inputs twice; the products equal those of separate graphs bit for bit."""
    g = np.random.default_rng(8)
    w1, w2 = ((g.standard_normal((64, 128)) * 0.05).astype(np.float32) for _ in range(2))
    x, y = (g.standard_normal((3, 128)).astype(np.float32) for _ in range(2))
    rt = runtimes[1, True]
    for second, nodes in ((x, 3), (y, 4)):
        wctx, ctx = GgmlContext(rt, 4), GgmlContext(rt, 16)
        try:
            a, b = wctx.from_numpy(w1, DType.Q4_1), wctx.from_numpy(w2, DType.Q4_1)
            xt = ctx.from_numpy(x)
            o1, o2 = a.matmul(ctx, xt), b.matmul(ctx, xt if second is x else ctx.from_numpy(second))
            ctx.forward(o1, o2).compute(o1, o2)
            assert ctx.n_nodes == nodes
            assert np.array_equal(np.array(o1.numpy()).reshape(3, 64), _matmul(rt, w1, DType.Q4_1, x))
            assert np.array_equal(np.array(o2.numpy()).reshape(3, 64), _matmul(rt, w2, DType.Q4_1, second))
        finally:
            ctx.close()
            wctx.close()


def test_routing(runtimes: dict[tuple[int, bool], Runtime], monkeypatch: pytest.MonkeyPatch) -> None:
    """Q4_1/Q8_0/Q4_K/Q6_K weights take the row kernels when the runtime allows them; other types and fast
    kernels not."""
    calls: list[int] = []
    inner = row_matmul.matmul

    def counting(ctx: object, w: object, b: object, casts: object) -> object:
        calls.append(1)
        return inner(ctx, w, b, casts)  # type: ignore[arg-type]
    monkeypatch.setattr(row_matmul, "matmul", counting)
    g = np.random.default_rng(6)
    w = (g.standard_normal((8, 64)) * 0.05).astype(np.float32)
    x = g.standard_normal((3, 64)).astype(np.float32)
    w256 = (g.standard_normal((8, 256)) * 0.05).astype(np.float32)
    x256 = g.standard_normal((3, 256)).astype(np.float32)
    for dtype, rt, want in ((DType.Q4_1, runtimes[1, True], 1), (DType.Q8_0, runtimes[1, True], 1),
                            (DType.Q4_K, runtimes[1, True], 1), (DType.Q6_K, runtimes[1, True], 1),
                            (DType.Q5_K, runtimes[1, True], 0),
                            (DType.Q4_0, runtimes[1, True], 0), (DType.F32, runtimes[1, True], 0),
                            (DType.Q4_1, runtimes[1, False], 0)):
        calls.clear()
        k_quant = dtype.block_size == 256
        _matmul(rt, w256 if k_quant else w, dtype, x256 if k_quant else x)
        assert len(calls) == want, (dtype, rt.row_matmul)
    wide = int(lib.pyrunner_row_matmul_max_k()) + 32  # rows longer than the kernels' scale buffer
    calls.clear()
    _matmul(runtimes[1, True], (g.standard_normal((2, wide)) * 0.05).astype(np.float32), DType.Q8_0,
            g.standard_normal((1, wide)).astype(np.float32))
    assert not calls
    fast = Runtime(RuntimeOptions(threads=1, fast_kernels=True))
    try:
        assert not fast.row_matmul
    finally:
        fast.close()


def _logits(path: Path, row: bool) -> list[np.ndarray]:
    """A 2-sequence prefill, then 3 decode steps of both sequences together and 2 of sequence 0 alone."""
    backend = load_backend(path, RuntimeOptions(threads=2, row_matmul=row))
    try:
        model = load_model(backend)
        cache = model.new_cache(flash=True)
        cache.init(backend, DType.F16, 2, 256, 256)
        g = np.random.default_rng(8)
        toks = [int(t) for t in g.integers(300, 20000, 40)]
        steps = [Batch(np.array(toks, np.int32), np.array(list(range(20)) * 2, np.int32),
                       np.array([0] * 20 + [1] * 20, np.int32), np.array([19, 39], np.int32))]
        steps += [Batch(np.array([toks[i], toks[i + 1]], np.int32), np.array([20 + i] * 2, np.int32),
                        np.array([0, 1], np.int32), np.array([0, 1], np.int32)) for i in range(3)]
        steps += [Batch(np.array([toks[5 + i]], np.int32), np.array([23 + i], np.int32), np.array([0], np.int32),
                        np.array([0], np.int32)) for i in range(2)]
        out = []
        for batch in steps:
            ctx = backend.new_context()
            try:
                t = model.forward(ctx, batch, cache)
                ctx.forward(t).compute(t)
                out.append(np.array(t.numpy()))
            finally:
                ctx.close()
        cache.close()
        return out
    finally:
        backend.close()


def test_gemma3_logits_unchanged(gemma3_path: Path) -> None:
    """Gemma 3 (Q4_K, Q6_K and Q8_0 weights on the row kernels, Q5_0 on ggml's): logits bit for bit as ggml's."""
    for got, ref in zip(_logits(gemma3_path, True), _logits(gemma3_path, False), strict=True):
        assert np.array_equal(got, ref)


def test_smollm2_logits_unchanged(smollm2_path: Path) -> None:
    """SmolLM2 (Q4_1 blocks, Q8_0 output): the runner's logits are those of ggml's own kernels, bit for bit."""
    for got, ref in zip(_logits(smollm2_path, True), _logits(smollm2_path, False), strict=True):
        assert np.array_equal(got, ref)
