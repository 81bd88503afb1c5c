"""Attention (ml.nn.attention) over what the cache returns, on the numpy fake and on ggml: a context shift
(remove with a finite end re-rotates the later keys) gives what a fresh evaluation at the shifted positions
gives; quantized K/V with flash attention stay close to f16."""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from kvcache.causal import CausalCache
from ml.dtype import DType
from ml.nn import attention
from test_kvcache_common import HEAD_DIM, N_HEAD_KV, ROPE_BASE, backend, batch_of, rope_shift

__all__ = ["backend"]

N_HEAD = 4  # grouped-query: two query heads per KV head
SCALE = 1.0 / np.sqrt(HEAD_DIM)


def _raw(n: int, seed: int) -> tuple[npt.NDArray[np.float32], ...]:
    """Un-rotated keys, values and queries (n, heads, head_dim)."""
    g = np.random.default_rng(seed)
    k = g.standard_normal((n, N_HEAD_KV, HEAD_DIM)).astype(np.float32)
    v = g.standard_normal((n, N_HEAD_KV, HEAD_DIM)).astype(np.float32)
    q = g.standard_normal((n, N_HEAD, HEAD_DIM)).astype(np.float32)
    return k, v, q


def forward(backend: Any, cache: Any, positions: list[int], seq: int, k: Any, v: Any, q: Any,
            flash: bool = False) -> npt.NDArray[np.float64]:
    """One layer-0 forward: keys and queries RoPE'd at `positions` in the graph, as a model does; returns the
    attention output (n_tokens, n_head * head_dim)."""
    ctx = backend.new_context()
    try:
        cache.start_forward(ctx, batch_of(positions, [seq] * len(positions)))
        pos = ctx.from_numpy(np.asarray(positions, np.int32))
        kt = ctx.from_numpy(np.ascontiguousarray(k)).rope(ctx, pos, HEAD_DIM, ROPE_BASE)
        qt = ctx.from_numpy(np.ascontiguousarray(q)).rope(ctx, pos, HEAD_DIM, ROPE_BASE)
        cache.put(ctx, 0, kt, ctx.from_numpy(np.ascontiguousarray(v)))
        keys, values, mask = cache.get(ctx, 0)
        out = attention(ctx, qt, keys, values, mask, SCALE, flash=flash)
        ctx.compute(out)
        return np.asarray(out.numpy(), dtype=np.float64).reshape(len(positions), -1)
    finally:
        ctx.close()


def new_cache(backend: Any, dtype: DType, flash: bool = False, **kw: Any) -> CausalCache:
    cache = CausalCache(rope_shift, kv_pad=8, flash=flash, **kw)
    cache.init(backend, dtype, 2, 64, 16)
    return cache


@pytest.mark.parametrize("dtype,tol", [(DType.F32, 1e-4), (DType.F16, 3e-3)], ids=["F32", "F16"])
@pytest.mark.parametrize("keep,discard", [(3, 4), (0, 5), (6, 1)])
def test_shift_equals_fresh_evaluation(backend: Any, dtype: DType, tol: float, keep: int, discard: int) -> None:
    n = 12
    k, v, q = _raw(n + 2, seed=keep * 10 + discard)
    shifted = new_cache(backend, dtype)
    forward(backend, shifted, list(range(n)), 0, k[:n], v[:n], q[:n])
    shifted.remove(0, keep, keep + discard)
    assert shifted.cells.seq_positions(0).tolist() == list(range(n - discard))
    kept = [i for i in range(n) if not keep <= i < keep + discard]

    fresh = new_cache(backend, dtype)
    m = len(kept)
    forward(backend, fresh, list(range(m)), 0, k[kept], v[kept], q[kept])

    # two new tokens at the shifted positions attend over the history
    new = slice(n, n + 2)
    got = forward(backend, shifted, [m, m + 1], 0, k[new], v[new], q[new])
    want = forward(backend, fresh, [m, m + 1], 0, k[new], v[new], q[new])
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def test_shift_is_not_a_no_op(backend: Any) -> None:
    """Guard for the test above: without re-rotation (positions relabelled only) the outputs differ."""
    n, keep, discard = 12, 3, 4
    k, v, q = _raw(n + 2, seed=1)
    cache = new_cache(backend, DType.F32)
    forward(backend, cache, list(range(n)), 0, k[:n], v[:n], q[:n])
    cache.shift_fn = lambda ctx, il, key, delta: key  # relabels positions, keys keep their old rotation
    cache.remove(0, keep, keep + discard)
    kept = [i for i in range(n) if not keep <= i < keep + discard]
    fresh = new_cache(backend, DType.F32)
    forward(backend, fresh, list(range(len(kept))), 0, k[kept], v[kept], q[kept])
    m = len(kept)
    got = forward(backend, cache, [m], 0, k[n:n + 1], v[n:n + 1], q[n:n + 1])
    want = forward(backend, fresh, [m], 0, k[n:n + 1], v[n:n + 1], q[n:n + 1])
    assert np.max(np.abs(got - want)) > 1e-2


def test_shift_of_a_sliding_window_cache(backend: Any) -> None:
    n, keep, discard = 14, 2, 3
    k, v, q = _raw(n + 1, seed=5)
    shifted = new_cache(backend, DType.F32, window=6)
    for p in range(n):  # decode one token at a time: eviction runs
        forward(backend, shifted, [p], 0, k[p:p + 1], v[p:p + 1], q[p:p + 1])
    held = shifted.cells.seq_positions(0).tolist()
    assert held == list(range(n - 7, n))
    shifted.remove(0, held[keep], held[keep] + discard)
    remaining = held[:keep] + held[keep + discard:]
    fresh = new_cache(backend, DType.F32, window=6)
    new_pos = [p if p < held[keep] else p - discard for p in remaining]
    forward(backend, fresh, new_pos, 0, k[remaining], v[remaining], q[remaining])
    p = n - discard
    got = forward(backend, shifted, [p], 0, k[n:], v[n:], q[n:])
    want = forward(backend, fresh, [p], 0, k[n:], v[n:], q[n:])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(DType.Q8_0, 0.015), (DType.Q4_0, 0.25)], ids=["Q8_0", "Q4_0"])
def test_quantized_flash_attention_is_close_to_f16(backend: Any, dtype: DType, tol: float) -> None:
    n = 20
    k, v, q = _raw(n + 3, seed=7)
    outs = {}
    for name, dt, flash in (("f16", DType.F16, False), ("f16-flash", DType.F16, True), ("q", dtype, True)):
        cache = new_cache(backend, dt, flash=flash)
        forward(backend, cache, list(range(n)), 0, k[:n], v[:n], q[:n], flash=flash)
        outs[name] = forward(backend, cache, [n, n + 1, n + 2], 0, k[n:], v[n:], q[n:], flash=flash)
    np.testing.assert_allclose(outs["f16-flash"], outs["f16"], rtol=0, atol=3e-3)
    err = np.max(np.abs(outs["q"] - outs["f16"]))
    assert err < tol, f"{dtype.name} flash attention differs from f16 by {err}"
    assert np.max(np.abs(outs["f16"])) > 0.1  # outputs are not trivially small
