"""EncoderCache (cross-attention K/V) on the numpy fake and on ggml: stored whole, no mask, invalidated when
the position of the input that produced it is removed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from kvcache.encoder import EncoderCache
from kvcache.errors import NotSupportedError
from ml.dtype import DType
from ml.nn import attention
from test_kvcache_common import HEAD_DIM, N_HEAD_KV, backend, batch_of, tensor_values

__all__ = ["backend"]


@dataclass
class MMBatch:
    """A batch that says which of its tokens carry encoder input (Ollama's Batch.Multimodal)."""

    positions: npt.NDArray[np.int32]
    seqs: npt.NDArray[np.int32]
    multimodal: list[int]

    @property
    def n_tokens(self) -> int:
        return int(self.positions.size)


def image_batch(positions: list[int], image_index: int) -> Any:
    return MMBatch(np.asarray(positions, np.int32), np.zeros(len(positions), np.int32), [image_index])


def enc_kv(n: int, seed: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    g = np.random.default_rng(seed)
    k = g.standard_normal((n, N_HEAD_KV, HEAD_DIM)).astype(np.float16).astype(np.float32)
    v = g.standard_normal((n, N_HEAD_KV, HEAD_DIM)).astype(np.float16).astype(np.float32)
    return k, v


def run(backend: Any, cache: EncoderCache, batch: Any, kv: tuple[Any, Any] | None, *, reserve: bool = False,
        layers: tuple[int, ...] = (0, 1)) -> list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], Any]]:
    """start_forward; put kv on every layer when given (the batch ran the encoder); read back get()."""
    ctx = backend.new_context()
    try:
        cache.start_forward(ctx, batch, reserve)
        reads = []
        for il in layers:
            if kv is not None:
                cache.put(ctx, il, ctx.from_numpy(kv[0]), ctx.from_numpy(kv[1]))
            k, v, mask = cache.get(ctx, il)
            reads.append((k.contiguous(ctx), v.contiguous(ctx), mask))
        ctx.compute(*[t for r in reads for t in r[:2]])
        return [(tensor_values(k), tensor_values(v), m) for k, v, m in reads]
    finally:
        ctx.close()


def new_cache(backend: Any, dtype: DType = DType.F16, flash: bool = False) -> EncoderCache:
    cache = EncoderCache(flash=flash)
    cache.init(backend, dtype, 1, 64, 16)
    return cache


def test_stores_whole_and_returns_no_mask(backend: Any) -> None:
    cache = new_cache(backend)
    k, v = enc_kv(5, seed=1)
    reads = run(backend, cache, image_batch([10, 11, 12], image_index=1), (k, v))
    for got_k, got_v, mask in reads:
        assert mask is None
        np.testing.assert_array_equal(got_k, k.transpose(1, 0, 2))  # [head_dim, n_enc, n_head_kv]
        np.testing.assert_array_equal(got_v, v.transpose(1, 0, 2))
    assert cache.encoder_cached and cache.encoder_pos == 11
    # a later batch without encoder input reads the same K/V, wherever it sits
    for got_k, got_v, mask in run(backend, cache, batch_of([13], [0]), None):
        assert mask is None
        np.testing.assert_array_equal(got_k, k.transpose(1, 0, 2))
        np.testing.assert_array_equal(got_v, v.transpose(1, 0, 2))


def test_batch_without_multimodal_records_first_position(backend: Any) -> None:
    cache = new_cache(backend)
    run(backend, cache, batch_of([4, 5], [0, 0]), enc_kv(3, seed=2))
    assert cache.encoder_pos == 4


@pytest.mark.parametrize("begin,end,stays", [(12, None, True), (0, 11, True), (11, 12, False), (5, None, False),
                                             (0, 100, False), (11, 11, True)])
def test_removing_the_image_position_invalidates(backend: Any, begin: int, end: int | None, stays: bool) -> None:
    cache = new_cache(backend)
    run(backend, cache, image_batch([10, 11, 12], image_index=1), enc_kv(4, seed=3))
    cache.remove(0, begin, end)
    assert cache.encoder_cached is stays


@pytest.mark.parametrize("begin,end,pos", [(0, 5, 6), (0, 11, 0), (3, 4, 10), (12, 20, 11)])
def test_a_shift_below_the_image_moves_its_position(backend: Any, begin: int, end: int, pos: int) -> None:
    """Removing positions below the image shifts it down with its row (a context shift): still cached."""
    cache = new_cache(backend)
    run(backend, cache, image_batch([10, 11, 12], image_index=1), enc_kv(4, seed=3))
    cache.remove(0, begin, end)
    assert cache.encoder_cached and cache.encoder_pos == pos


def test_copy_prefix_and_sequences(backend: Any) -> None:
    cache = new_cache(backend)
    run(backend, cache, image_batch([0, 1, 2], image_index=2), enc_kv(4, seed=4))
    cache.copy_prefix(0, 0, 3)  # truncation that keeps the image position
    assert cache.encoder_cached
    cache.copy_prefix(0, 0, 2)  # truncation that drops it
    assert not cache.encoder_cached
    with pytest.raises(ValueError):
        cache.copy_prefix(0, 1, 2)
    assert cache.can_resume(0, 50)
    with pytest.raises(NotSupportedError):
        EncoderCache().init(backend, DType.F16, 2, 64, 16)
    with pytest.raises(NotSupportedError, match="flash"):
        EncoderCache().init(backend, DType.Q8_0, 1, 64, 16)


def test_new_image_replaces_and_reshapes(backend: Any) -> None:
    cache = new_cache(backend)
    run(backend, cache, image_batch([0, 1], image_index=0), enc_kv(4, seed=5))
    k2, v2 = enc_kv(7, seed=6)
    reads = run(backend, cache, image_batch([20, 21], image_index=1), (k2, v2))
    np.testing.assert_array_equal(reads[0][0], k2.transpose(1, 0, 2))
    np.testing.assert_array_equal(reads[1][1], v2.transpose(1, 0, 2))
    assert cache.encoder_pos == 21


def test_reserve_changes_nothing(backend: Any) -> None:
    cache = new_cache(backend)
    k, v = enc_kv(4, seed=7)
    run(backend, cache, image_batch([3, 4], image_index=0), (k, v))
    cache.remove(0, 0, None)
    assert not cache.encoder_cached
    k9, v9 = enc_kv(9, seed=8)  # another shape too: the stored tensors must not be re-made
    reads = run(backend, cache, image_batch([9], image_index=0), (k9, v9), reserve=True)
    np.testing.assert_array_equal(reads[0][0], k9.transpose(1, 0, 2))  # the reserve graph sees its own K/V
    assert not cache.encoder_cached and cache.encoder_pos == 3
    np.testing.assert_array_equal(tensor_values(cache.keys[0]), k)
    np.testing.assert_array_equal(tensor_values(cache.values[1]), v)


def test_cross_attention_without_mask(backend: Any) -> None:
    """Decoder tokens attend over every encoder entry (mask None) with ml.nn.attention."""
    cache = new_cache(backend)
    n_enc, n_tok, n_head = 6, 3, 4
    k, v = enc_kv(n_enc, seed=9)
    q = np.random.default_rng(10).standard_normal((n_tok, n_head, HEAD_DIM)).astype(np.float32)
    ctx = backend.new_context()
    try:
        cache.start_forward(ctx, image_batch([0, 1, 2], image_index=0))
        cache.put(ctx, 0, ctx.from_numpy(k), ctx.from_numpy(v))
        kk, vv, mask = cache.get(ctx, 0)
        out = attention(ctx, ctx.from_numpy(q), kk, vv, mask, 0.2)
        ctx.compute(out)
        got = np.asarray(out.numpy(), dtype=np.float64).reshape(n_tok, n_head, HEAD_DIM)
    finally:
        ctx.close()
    group = n_head // N_HEAD_KV
    for h in range(n_head):
        s = q[:, h, :].astype(np.float64) @ k[:, h // group, :].T * 0.2
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(got[:, h, :], p @ v[:, h // group, :], rtol=0, atol=2e-3)


def test_a_quantized_cache_refuses_heads_it_cannot_hold(backend: Any) -> None:
    """ggml aborts the process when rows of 8 are copied into Q8_0 blocks of 32: the put refuses first."""
    cache = new_cache(backend, DType.Q8_0, flash=True)
    ctx = backend.new_context()
    try:
        cache.start_forward(ctx, batch_of([0], [0]))
        k = ctx.from_numpy(np.zeros((3, 2, 8), np.float32))  # [head_dim 8, 2 heads, 3 tokens]
        with pytest.raises(NotSupportedError, match="multiples of 32, not 8/8"):
            cache.put(ctx, 0, k, k)
    finally:
        ctx.close()
