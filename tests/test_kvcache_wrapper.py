"""WrapperCache routes each layer to its member (gemma: sliding-window and global layers; mllama: encoder and
causal layers) and applies runner edits to all members; every cache satisfies the one Cache interface."""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

from kvcache.base import Cache
from kvcache.causal import CausalCache
from kvcache.encoder import EncoderCache
from kvcache.errors import NotSupportedError
from kvcache.wrapper import WrapperCache
from ml.dtype import DType
from test_kvcache_common import HEAD_DIM, N_HEAD_KV, backend, batch_of, rope_shift, token_data

__all__ = ["backend"]

N_LAYERS = 4


def put_all(backend: Any, cache: Any, positions: list[int], seqs: list[int],
            layers: range = range(N_LAYERS)) -> dict[int, Any]:
    """One forward over the layers; returns each layer's mask as numpy (None when the cache gives none)."""
    ctx = backend.new_context()
    try:
        cache.start_forward(ctx, batch_of(positions, seqs))
        masks: dict[int, Any] = {}
        for il in layers:
            k = np.stack([token_data(s, p, il)[0] for p, s in zip(positions, seqs)]).astype(np.float32)
            cache.put(ctx, il, ctx.from_numpy(k), ctx.from_numpy(k))
            kk, vv, mask = cache.get(ctx, il)
            masks[il] = None if mask is None else np.asarray(mask.numpy(), np.float64).reshape(len(positions), -1)
        ctx.compute()
        return masks
    finally:
        ctx.close()


def gemma_like(backend: Any, window: int = 2) -> tuple[WrapperCache, CausalCache, CausalCache]:
    swa = CausalCache(rope_shift, window=window, kv_pad=4)
    full = CausalCache(rope_shift, kv_pad=4)
    cache = WrapperCache([swa, full], lambda il: 0 if il % 2 == 0 else 1)
    cache.init(backend, DType.F16, 2, 32, 8)
    return cache, swa, full


def test_routes_layers(backend: Any) -> None:
    cache, swa, full = gemma_like(backend)
    assert swa.capacity == 2 * 2 + 8 and full.capacity == 32
    masks = put_all(backend, cache, list(range(6)), [0] * 6)
    assert sorted(swa.keys) == [0, 2] and sorted(full.keys) == [1, 3]
    for il in range(N_LAYERS):
        visible = (masks[il][5] == 0).sum()
        assert visible == (3 if il % 2 == 0 else 6), f"layer {il}"  # window 2: positions 3..5
    # stored data went to the routed member only
    got = np.asarray(swa.keys[2].numpy(), np.float64)[:6].reshape(6, N_HEAD_KV, HEAD_DIM)
    want = np.stack([token_data(0, p, 2)[0] for p in range(6)])
    np.testing.assert_array_equal(got, want)


def test_runner_edits_reach_every_member(backend: Any) -> None:
    cache, swa, full = gemma_like(backend, window=8)
    put_all(backend, cache, list(range(6)), [0] * 6)
    cache.copy_prefix(0, 1, 4)
    assert swa.cells.seq_positions(1).tolist() == full.cells.seq_positions(1).tolist() == [0, 1, 2, 3]
    with pytest.raises(NotSupportedError):
        cache.remove(0, 1, 3)  # seq 0's cell at 3 would shift, but seq 1 shares it
    with pytest.raises(NotSupportedError):
        cache.remove(1, 0, 1)  # likewise seq 1's cells 1..3
    cache.remove(1, 0, None)
    cache.remove(0, 1, 3)  # nothing shared any more: 3..5 become 1..3 in both members
    assert swa.cells.seq_positions(0).tolist() == full.cells.seq_positions(0).tolist() == [0, 1, 2, 3]
    assert cache.can_resume(0, 4) and not cache.can_resume(0, 5)
    cache.clear()
    assert swa.cells.n_used == full.cells.n_used == 0


def test_refused_remove_changes_no_member(backend: Any) -> None:
    """The second member cannot shift (no shift function): the first must not have shifted either."""
    a = CausalCache(rope_shift, kv_pad=4)
    b = CausalCache(None, kv_pad=4)
    cache = WrapperCache([a, b], lambda il: il % 2)
    cache.init(backend, DType.F16, 1, 16, 8)
    put_all(backend, cache, list(range(6)), [0] * 6)
    versions = (a.cells.version, b.cells.version)
    with pytest.raises(NotSupportedError):
        cache.remove(0, 1, 3)
    assert (a.cells.version, b.cells.version) == versions
    assert a.cells.seq_positions(0).tolist() == b.cells.seq_positions(0).tolist() == list(range(6))


def test_encoder_and_causal_layers(backend: Any) -> None:
    """mllama-style: cross-attention layers on an encoder cache (no mask), the rest causal."""
    enc = EncoderCache()
    causal = CausalCache(rope_shift, kv_pad=4)
    cache = WrapperCache([causal, enc], lambda il: 1 if il == 1 else 0)
    cache.init(backend, DType.F16, 1, 16, 8)
    masks = put_all(backend, cache, [0, 1, 2], [0, 0, 0])
    assert masks[1] is None and masks[0] is not None and masks[0].shape[0] == 3
    assert enc.encoder_cached and enc.encoder_pos == 0
    cache.remove(0, 1, None)
    assert enc.encoder_cached
    cache.remove(0, 0, None)
    assert not enc.encoder_cached and causal.cells.n_used == 0


@pytest.mark.parametrize("cls", [CausalCache, EncoderCache, WrapperCache])
def test_every_cache_has_the_interface(cls: type) -> None:
    """Same methods, same parameter names and defaults as the Cache protocol (mypy checks the types)."""
    methods = [n for n, f in vars(Cache).items() if inspect.isfunction(f) and not n.startswith("_")]
    assert {"put", "get", "init", "start_forward", "remove", "copy_prefix", "can_resume", "clear",
            "close"} <= set(methods)
    for name in methods:
        want = inspect.signature(getattr(Cache, name))
        got = inspect.signature(getattr(cls, name))
        assert [(p.name, p.default) for p in got.parameters.values()][:len(want.parameters)] == \
            [(p.name, p.default) for p in want.parameters.values()], f"{cls.__name__}.{name}"
        extra = list(got.parameters.values())[len(want.parameters):]
        assert all(p.default is not inspect.Parameter.empty for p in extra), f"{cls.__name__}.{name}"
