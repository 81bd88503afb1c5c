"""CausalCache on the numpy fake and on ggml: exact K/V contents and masks seen through the cache API (one
sequence, interleaved sequences, sliding window, chunks, removal, defrag, copy_prefix, cache full), worst-case
reservation, K/V types."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvcache.causal import CausalCache
from kvcache.errors import CacheFullError, NotSupportedError
from ml.dtype import DType
from test_kvcache_common import (HEAD_DIM, N_HEAD_KV, N_LAYER, Harness, backend, batch_of, rope_shift,
                                 tensor_values, token_data)

__all__ = ["backend"]

PAD = 4


def make(backend: Any, *, capacity: int = 32, max_sequences: int = 4, max_batch: int = 8,
         dtype: DType = DType.F16, **kw: Any) -> Harness:
    cache = CausalCache(rope_shift, kv_pad=kw.pop("kv_pad", PAD), **kw)
    cache.init(backend, dtype, max_sequences, capacity, max_batch)
    return Harness(backend, cache, window=kw.get("window"), chunk=kw.get("chunk"))


def snapshot(h: Harness) -> tuple[Any, ...]:
    c = h.cache.cells
    return c.version, c.positions.copy(), c.sequences.copy()


# ---------------------------------------------------------------- contents and masks


def test_one_sequence(backend: Any) -> None:
    h = make(backend)
    view = h.step(list(range(6)), [0] * 6)  # prompt
    h.check(view)
    assert view.kv_range == (0, 8)  # extent 6 padded to 4
    # causal within the batch: token t sees exactly positions 0..t
    assert [int((view.mask[t] == 0).sum()) for t in range(6)] == [1, 2, 3, 4, 5, 6]
    for p in range(6, 10):  # decode steps
        h.check(h.step([p], [0]))
    assert h.cache.cells.seq_positions(0).tolist() == list(range(10))


def test_sequences_interleaved(backend: Any) -> None:
    h = make(backend)
    # three sequences' prompts mixed in one batch, in no particular order
    h.check(h.step([0, 0, 1, 0, 1, 2, 1, 2], [1, 0, 1, 2, 0, 1, 2, 0]))
    for step in range(3):  # decode: one token per sequence, order rotating
        order = [(step + i) % 3 for i in range(3)]
        positions = [int(h.cache.cells.max_pos(s)) + 1 for s in order]
        h.check(h.step(positions, order))
    for s in range(3):
        assert h.cache.cells.seq_positions(s).tolist() == list(range(len(h.ref[s])))


def test_sliding_window_boundary(backend: Any) -> None:
    window = 4
    h = make(backend, window=window, capacity=1000, max_sequences=2, max_batch=4)
    # sized max_sequences * window + max_batch, padded -- not the requested 1000
    assert h.cache.capacity == 12
    h.check(h.step([0, 1, 2, 3], [0] * 4))
    view = h.step([4, 5], [0, 0])
    h.check(view)
    assert sorted(view.cell_pos[view.mask[1] == 0].tolist()) == [1, 2, 3, 4, 5]  # not 0: outside the window
    for p in range(6, 14):
        view = h.step([p], [0])
        h.check(view)
        visible = sorted(view.cell_pos[view.mask[0] == 0].tolist())
        assert visible == list(range(p - window, p + 1))  # exactly window + 1 positions at the boundary
        # what no later token can see is gone: the window before this batch plus the batch
        assert h.cache.cells.seq_positions(0).tolist() == list(range(p - window, p + 1))
    assert h.cache.can_resume(0, 14)
    h.cache.remove(0, 13, None)  # back up one token: the window before 13 is still held
    assert h.cache.can_resume(0, 13)
    assert not h.cache.can_resume(0, 8)  # the window before 8 (4..7) was evicted
    assert h.cache.can_resume(1, 0)


def test_sliding_window_fills_its_capacity_with_every_sequence(backend: Any) -> None:
    """max_sequences sequences decoding in step never run out of max_sequences * window + max_batch cells."""
    h = make(backend, window=3, capacity=1000, max_sequences=3, max_batch=3, kv_pad=1)
    assert h.cache.capacity == 3 * 3 + 3
    h.step([0, 0, 0], [0, 1, 2])
    for p in range(1, 12):
        h.check(h.step([p, p, p], [0, 1, 2]))


def test_chunked(backend: Any) -> None:
    h = make(backend, chunk=4)
    view = h.step(list(range(7)), [0] * 7)
    h.check(view)
    # position 5 sees only 4 and 5 (its chunk started at 4)
    assert sorted(view.cell_pos[view.mask[5] == 0].tolist()) == [4, 5]
    for p in range(7, 10):
        h.check(h.step([p], [0]))
    assert h.cache.can_resume(0, 10)
    h.cache.remove(0, 9, None)
    h.ref_remove(0, 9, None)
    assert h.cache.can_resume(0, 9)
    h.cache.remove(0, 7, 8)  # 8 becomes 7: the sequence now ends at 7
    h.ref_remove(0, 7, 8)
    assert h.cache.can_resume(0, 8)  # a new chunk starts at 8: nothing before it is needed
    assert not h.cache.can_resume(0, 9)  # would need position 8
    h.check(h.step([8], [0]), key_atol=3e-3)
    h.check(h.step([5, 6], [1, 1]))  # a sequence holding only part of a chunk and nothing before it
    assert h.cache.can_resume(1, 8)  # 8 starts a chunk: nothing before it is needed
    assert not h.cache.can_resume(1, 7)  # needs 4..6


def test_remove_middle_shifts_later_keys(backend: Any) -> None:
    h = make(backend)
    h.step(list(range(8)), [0] * 8)
    h.step(list(range(5)), [1] * 5)
    h.cache.remove(0, 2, 5)  # drop 2, 3, 4; 5..7 become 2..4 and their keys are re-rotated by -3
    h.ref_remove(0, 2, 5)
    assert h.cache.cells.seq_positions(0).tolist() == list(range(5))
    assert h.cache.cells.seq_positions(1).tolist() == list(range(5))  # other sequence untouched
    # f16 keys rotated in f32 and stored again: one f16 rounding of values below ~5
    h.check(h.step([5, 5], [0, 1]), key_atol=3e-3)
    h.cache.remove(1, 3, None)  # open-ended: nothing shifts
    h.ref_remove(1, 3, None)
    h.check(h.step([3], [1]), key_atol=3e-3)


def test_defrag_keeps_contents_and_masks(backend: Any) -> None:
    h = make(backend, capacity=32, defrag_holes=10 ** 6)  # no automatic defrag here
    h.step(list(range(6)), [0] * 6)
    h.step(list(range(6)), [1] * 6)
    h.step(list(range(6)), [2] * 6)
    h.cache.remove(0, 0, None)
    h.cache.remove(1, 3, None)
    h.ref_remove(0, 0, None)
    h.ref_remove(1, 3, None)
    cells = h.cache.cells
    assert cells.extent == 18 and cells.n_used == 9
    keys_before, values_before = h.stored_rows()
    plan = cells.defrag_plan()
    used_before = plan.order.copy()
    assert h.cache.defrag()
    assert cells.extent == 9 and not h.cache.defrag()
    keys_after, values_after = h.stored_rows()
    for il in range(N_LAYER):  # row i now holds what row order[i] held, bit for bit
        np.testing.assert_array_equal(keys_after[il][:9], keys_before[il][used_before])
        np.testing.assert_array_equal(values_after[il][:9], values_before[il][used_before])
    # and what each token sees is unchanged (same positions, same data)
    view = h.step([3, 6, 3], [1, 2, 0])
    h.check(view)
    assert view.kv_range == (0, 12)


def test_defrag_runs_when_holes_exceed_threshold(backend: Any) -> None:
    h = make(backend, capacity=32, defrag_holes=8)
    h.step(list(range(8)), [0] * 8)
    h.step(list(range(8)), [1] * 8)
    h.cache.remove(0, 0, None)  # 8 holes below the extent
    h.ref_remove(0, 0, None)
    view = h.step([0], [0])  # seq 0 holds nothing, so its token fills the lowest hole: 7 remain < 8, no defrag
    assert h.cache.n_defrags == 0 and view.kv_range == (0, 16)
    assert h.cache.cells.seq_cells(0).tolist() == [0]
    h.check(view)
    h.cache.remove(1, 0, 2)  # two more holes (and a shift): 9 below the extent
    h.ref_remove(1, 0, 2)
    view = h.step([6], [1])  # seq 1's token goes above its cells, 9 holes would remain: compact first
    assert h.cache.n_defrags == 1
    assert view.kv_range == (0, 8) and h.cache.cells.extent == 8
    h.check(view, key_atol=3e-3)


def test_each_sequence_keeps_its_cells_in_position_order(backend: Any) -> None:
    """A token goes above every cell of its own sequence, even when lower cells are free (holes left by another
    sequence), so attention visits a sequence's cells in position order; when no cell is free above, the cache
    compacts (order kept) instead of wrapping around."""
    h = make(backend, capacity=16, defrag_holes=10 ** 6)
    h.step(list(range(4)), [0] * 4)             # seq 0: cells 0-3
    h.step(list(range(4)), [1] * 4)             # seq 1: cells 4-7
    h.cache.remove(0, 0, None)                  # holes 0-3
    h.ref_remove(0, 0, None)
    view = h.step([4, 5], [1, 1])               # seq 1 goes on above its cells, not into the holes
    assert h.cache.cells.seq_cells(1).tolist() == [4, 5, 6, 7, 8, 9]
    h.check(view)
    view = h.step([0, 0, 1], [2, 0, 0])         # sequences without cells take the lowest free ones
    assert h.cache.cells.seq_cells(0).tolist() == [0, 1] and h.cache.cells.seq_cells(2).tolist() == [2]
    h.check(view)
    view = h.step(list(range(6, 12)), [1] * 6)  # 10..15 free above seq 1: fits exactly, no compaction
    assert h.cache.n_defrags == 0 and h.cache.cells.seq_cells(1).tolist() == list(range(4, 16))
    view = h.step([1], [2])                     # seq 2 holds cell 2, and 3 is free above it
    assert h.cache.cells.seq_cells(2).tolist() == [2, 3]
    h.check(view)
    h.cache.remove(1, 0, 6)                     # frees 6 cells (4-9) and shifts the rest down
    h.ref_remove(1, 0, 6)
    view = h.step([6], [1])                     # nothing free above cell 15: compact, then place on top
    assert h.cache.n_defrags == 1
    for s in (0, 1, 2):
        cells = h.cache.cells.seq_cells(s)
        assert np.all(np.diff(h.cache.cells.positions[cells]) > 0), (s, cells)
    assert h.cache.cells.seq_cells(1).tolist() == list(range(4, 11))
    h.check(view, key_atol=3e-3)


def test_defrag_quantized_is_exact(backend: Any) -> None:
    h = make(backend, dtype=DType.Q8_0, flash=True, defrag_holes=10 ** 6)
    h.step(list(range(8)), [0] * 8)
    h.step(list(range(8)), [1] * 8)
    h.cache.remove(0, 0, None)
    keys_before, values_before = h.stored_rows()
    assert h.cache.defrag()
    keys_after, values_after = h.stored_rows()
    for il in range(N_LAYER):
        np.testing.assert_array_equal(keys_after[il][:8], keys_before[il][8:16])
        np.testing.assert_array_equal(values_after[il][:8], values_before[il][8:16])


def test_copy_prefix_shares_then_diverges(backend: Any) -> None:
    h = make(backend, capacity=16)
    h.step(list(range(6)), [0] * 6)
    h.cache.copy_prefix(0, 1, 4)
    h.ref_copy_prefix(0, 1, 4)
    assert h.cache.cells.n_used == 6  # shared, not copied
    # divergent continuation: seq 1 writes its own data at 4 and 5, seq 0 goes on at 6
    view = h.step([4, 6, 5], [1, 0, 1], origin={1: 7})
    h.check(view)
    assert h.cache.cells.n_used == 9
    assert not np.array_equal(h.ref[0][4][0][0], h.ref[1][4][0][0])
    # removing from one leaves the other intact
    h.cache.remove(1, 0, None)
    h.ref_remove(1, 0, None)
    assert h.cache.cells.n_used == 7
    h.check(h.step([7, 0], [0, 1], origin={1: 9}))
    h.cache.remove(0, 2, None)  # seq 0 gives up the rest of the shared prefix; seq 1 keeps its own
    h.ref_remove(0, 2, None)
    h.check(h.step([2, 1], [0, 1], origin={0: 5, 1: 9}))


def test_shifting_shared_cells_is_refused(backend: Any) -> None:
    h = make(backend, capacity=16)
    h.step(list(range(6)), [0] * 6)
    h.cache.copy_prefix(0, 1, 6)
    before = snapshot(h)
    keys_before, _ = h.stored_rows()
    with pytest.raises(NotSupportedError, match="shared"):
        h.cache.remove(0, 1, 3)
    after = snapshot(h)
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and np.array_equal(before[2], after[2])
    keys_after, _ = h.stored_rows()
    np.testing.assert_array_equal(keys_before[0], keys_after[0])
    h.cache.remove(0, 4, None)  # an open-ended removal shifts nothing: allowed
    assert h.cache.cells.seq_positions(1).tolist() == list(range(6))


def test_shift_without_shift_function_is_refused(backend: Any) -> None:
    cache = CausalCache(None, kv_pad=PAD)
    cache.init(backend, DType.F16, 1, 16, 8)
    h = Harness(backend, cache)
    h.step(list(range(6)), [0] * 6)
    version = cache.cells.version
    with pytest.raises(NotSupportedError, match="shift"):
        cache.remove(0, 1, 3)
    assert cache.cells.version == version and cache.cells.seq_positions(0).tolist() == list(range(6))
    cache.remove(0, 3, None)
    assert cache.cells.seq_positions(0).tolist() == [0, 1, 2]


def test_cache_full(backend: Any) -> None:
    h = make(backend, capacity=8, max_batch=8)
    h.step(list(range(5)), [0] * 5)
    h.step(list(range(3)), [1] * 3)
    before = snapshot(h)
    ctx = backend.new_context()
    try:
        with pytest.raises(CacheFullError):
            h.cache.start_forward(ctx, batch_of([5], [0]))
    finally:
        ctx.close()
    after = snapshot(h)
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and np.array_equal(before[2], after[2])
    h.cache.remove(1, 0, None)  # room again
    h.check(h.step([5, 6], [0, 0]))


def test_full_window_cache_raises_after_eviction_cannot_help(backend: Any) -> None:
    h = make(backend, window=2, capacity=4, max_sequences=1, max_batch=2, kv_pad=1)
    assert h.cache.capacity == 4
    h.step([0, 1], [0, 0])
    h.step([2, 3], [0, 0])
    ctx = backend.new_context()
    try:
        with pytest.raises(CacheFullError):
            h.cache.start_forward(ctx, batch_of([10, 11, 12, 13, 14], [0] * 5))
    finally:
        ctx.close()
    h.check(h.step([4, 5], [0, 0]))  # evicts 0 and 1 first: fits


# ---------------------------------------------------------------- reservation


def test_reserve_changes_nothing(backend: Any) -> None:
    h = make(backend, capacity=16, max_batch=8)
    h.step(list(range(5)), [0] * 5)
    before = snapshot(h)
    keys_before, values_before = h.stored_rows()
    ctx = backend.new_context()
    try:
        batch = batch_of(list(range(8)), [1] * 8)
        h.cache.start_forward(ctx, batch, reserve=True)
        outs = []
        for il in range(N_LAYER):
            k = np.full((8, N_HEAD_KV, HEAD_DIM), 7.0, np.float32)
            h.cache.put(ctx, il, ctx.from_numpy(k), ctx.from_numpy(k))
            kk, vv, mask = h.cache.get(ctx, il)
            assert kk.shape == (HEAD_DIM, 16, N_HEAD_KV) and vv.shape == (HEAD_DIM, 16, N_HEAD_KV)
            assert mask is not None and mask.shape == (16, 8)  # every cell, every token: the worst case
            outs += [kk.contiguous(ctx), vv.contiguous(ctx)]
        ctx.compute(*outs)  # even computing the reserve graph writes nothing into the cache
    finally:
        ctx.close()
    after = snapshot(h)
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and np.array_equal(before[2], after[2])
    keys_after, values_after = h.stored_rows()
    for il in range(N_LAYER):
        np.testing.assert_array_equal(keys_after[il], keys_before[il])
        np.testing.assert_array_equal(values_after[il], values_before[il])
    h.check(h.step([5], [0]))


def test_reserve_allocates_a_fresh_cache(backend: Any) -> None:
    cache = CausalCache(rope_shift, kv_pad=PAD)
    cache.init(backend, DType.F16, 2, 16, 4)
    ctx = backend.new_context()
    try:
        cache.start_forward(ctx, batch_of([0, 1, 2, 3], [0] * 4), reserve=True)
        k = ctx.from_numpy(np.ones((4, N_HEAD_KV, HEAD_DIM), np.float32))
        cache.put(ctx, 0, k, k)
    finally:
        ctx.close()
    assert 0 in cache.keys and cache.keys[0].shape == (N_HEAD_KV * HEAD_DIM, 16)
    assert cache.cells.n_used == 0 and cache.cells.version == 0
    np.testing.assert_array_equal(tensor_values(cache.keys[0]), 0.0)


# ---------------------------------------------------------------- K/V types


@pytest.mark.parametrize("dtype", [DType.Q8_0, DType.Q4_0], ids=lambda d: d.name)
def test_quantized_cache_needs_flash_attention(backend: Any, dtype: DType) -> None:
    with pytest.raises(NotSupportedError, match="flash"):
        CausalCache(rope_shift).init(backend, dtype, 1, 16, 4)
    CausalCache(rope_shift, flash=True).init(backend, dtype, 1, 16, 4)


def test_unsupported_cache_type(backend: Any) -> None:
    with pytest.raises(NotSupportedError):
        CausalCache(rope_shift, flash=True).init(backend, DType.Q4_K, 1, 16, 4)


@pytest.mark.parametrize("dtype,atol", [(DType.Q8_0, 0.05), (DType.Q4_0, 0.6)], ids=["Q8_0", "Q4_0"])
def test_quantized_contents_are_close(backend: Any, dtype: DType, atol: float) -> None:
    h = make(backend, dtype=dtype, flash=True)
    h.step(list(range(5)), [0] * 5)
    h.check(h.step([5, 0], [0, 1]), key_atol=atol, value_atol=atol)


def test_mask_type_follows_attention_kind(backend: Any) -> None:
    for flash, want in ((False, DType.F32), (True, DType.F16)):
        cache = CausalCache(rope_shift, kv_pad=PAD, flash=flash)
        cache.init(backend, DType.F16, 1, 16, 4)
        ctx = backend.new_context()
        try:
            cache.start_forward(ctx, batch_of([0, 1], [0, 0]))
            k = ctx.from_numpy(np.stack([token_data(0, p, 0)[0] for p in range(2)]).astype(np.float32))
            cache.put(ctx, 0, k, k)
            _, _, mask = cache.get(ctx, 0)
            assert mask is not None and mask.dtype == want
        finally:
            ctx.close()


def test_use_before_init_and_get_before_put(backend: Any) -> None:
    cache = CausalCache(rope_shift, kv_pad=PAD)
    with pytest.raises(RuntimeError, match="init"):
        cache.can_resume(0, 0)
    cache.init(backend, DType.F16, 1, 16, 4)
    ctx = backend.new_context()
    try:
        cache.start_forward(ctx, batch_of([0], [0]))
        with pytest.raises(RuntimeError, match="before put"):
            cache.get(ctx, 3)
    finally:
        ctx.close()


def test_many_layers(backend: Any) -> None:
    """K/V for 80 layers (llama 70B) fit the storage context; defrag and shift graphs cover them all."""
    cache = CausalCache(rope_shift, kv_pad=PAD)
    cache.init(backend, DType.F16, 1, 16, 8)
    for positions in ([0, 1, 2, 3], [4, 5]):
        ctx = backend.new_context()
        try:
            cache.start_forward(ctx, batch_of(positions, [0] * len(positions)))
            k = ctx.from_numpy(np.ones((len(positions), N_HEAD_KV, HEAD_DIM), np.float32))
            for il in range(80):
                cache.put(ctx, il, k, k)
            ctx.compute()
        finally:
            ctx.close()
    cache.remove(0, 0, 2)
    assert cache.defrag()
    assert len(cache.keys) == 80 and cache.cells.seq_positions(0).tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(tensor_values(cache.values[79])[:4], 1.0)
