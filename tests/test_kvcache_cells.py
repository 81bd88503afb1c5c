"""Exact table tests of the KV cell bookkeeping (kvcache.cells / masks / plans).

Masks are compared as grids: one string per token row, one character per
cell column, ``o`` = 0.0 (visible), ``.`` = -inf (hidden).  :func:`grid`
also asserts that no other value occurs.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from ggml.host import attention_mask
from kvcache.cells import CellTable
from kvcache.errors import CacheFullError, KVCacheError, NotSupportedError
from kvcache.masks import build_mask, round_up
from kvcache.plans import DefragPlan

NEG = -np.inf


def grid(mask: NDArray[Any]) -> list[str]:
    assert np.all((mask == 0) | np.isneginf(mask)), "mask holds values other than 0/-inf"
    return ["".join("o" if v == 0 else "." for v in row) for row in mask]


def snapshot(t: CellTable) -> tuple[list[int], list[list[bool]], int]:
    return t.positions.tolist(), t.sequences.tolist(), t.version


def seqs_of(t: CellTable) -> list[list[int]]:
    """Per cell, the sorted sequence ids holding it."""
    return [np.flatnonzero(row).tolist() for row in t.sequences]


def filled(capacity: int, max_seqs: int, cells: list[int], pos: list[int], seqs: list[int]) -> CellTable:
    t = CellTable(capacity, max_seqs)
    t.store(np.array(cells), np.array(pos), np.array(seqs))
    return t


# --------------------------------------------------------------------- masks


def test_one_sequence_prefill_then_decode() -> None:
    t = CellTable(8, 1)
    start = t.find_slot(4)
    assert start == 0
    cells = t.store(start, [0, 1, 2, 3], [0, 0, 0, 0])
    assert cells.tolist() == [0, 1, 2, 3]
    m = t.mask([0, 1, 2, 3], [0, 0, 0, 0], kv_pad=8)
    expected = np.array(
        [
            [0, NEG, NEG, NEG, NEG, NEG, NEG, NEG],
            [0, 0, NEG, NEG, NEG, NEG, NEG, NEG],
            [0, 0, 0, NEG, NEG, NEG, NEG, NEG],
            [0, 0, 0, 0, NEG, NEG, NEG, NEG],
        ],
        dtype=np.float32,
    )
    assert m.dtype == np.float32 and m.flags.c_contiguous
    np.testing.assert_array_equal(m, expected)

    assert t.free_cells(1).tolist() == [4]
    t.store(t.free_cells(1), [4], [0])
    assert grid(t.mask([4], [0], kv_pad=8)) == ["ooooo..."]
    assert t.max_pos(0) == 4
    assert t.seq_positions(0).tolist() == [0, 1, 2, 3, 4]


def test_interleaved_sequences_in_one_batch() -> None:
    t = CellTable(8, 2)
    pos, seq = [0, 0, 1, 1, 2], [0, 1, 0, 1, 0]
    t.store(0, pos, seq)
    assert grid(t.mask(pos, seq, kv_pad=8)) == [
        "o.......",
        ".o......",
        "o.o.....",
        ".o.o....",
        "o.o.o...",
    ]
    assert t.seq_cells(0).tolist() == [0, 2, 4]
    assert t.seq_cells(1).tolist() == [1, 3]


def test_sliding_window_boundary_shows_window_plus_one() -> None:
    t = CellTable(6, 1)
    pos = list(range(6))
    t.store(0, pos, [0] * 6)
    m = t.mask(pos, [0] * 6, kv_range=(0, 6), window=2)
    assert grid(m) == [
        "o.....",
        "oo....",
        "ooo...",
        ".ooo..",
        "..ooo.",
        "...ooo",
    ]
    assert (m == 0).sum(axis=1).max() == 3  # window + 1
    assert grid(t.mask([5], [0], kv_range=(0, 6), window=0)) == [".....o"]


def test_chunked_attention() -> None:
    t = CellTable(7, 1)
    pos = list(range(7))
    t.store(0, pos, [0] * 7)
    assert grid(t.mask(pos, [0] * 7, kv_range=(0, 7), chunk=3)) == [
        "o......",
        "oo.....",
        "ooo....",
        "...o...",
        "...oo..",
        "...ooo.",
        "......o",
    ]
    # Non-causal rows see their whole chunk and nothing else.
    assert grid(t.mask([1, 4], [0, 0], kv_range=(0, 7), chunk=3, causal=False)) == [
        "ooo....",
        "...ooo.",
    ]
    # Window and chunk together: both lower bounds apply.
    assert grid(t.mask([5], [0], kv_range=(0, 7), chunk=3, window=1)) == ["....oo."]


def test_non_causal_rows() -> None:
    t = CellTable(5, 1)
    t.store(0, [0, 1, 2, 3, 4], [0] * 5)
    # e.g. image tokens at positions 1..3 attend to each other both ways.
    causal = np.array([True, False, False, False, True])
    assert grid(t.mask([0, 1, 2, 3, 4], [0] * 5, kv_range=(0, 5), causal=causal)) == [
        "o....",
        "ooooo",
        "ooooo",
        "ooooo",
        "ooooo",
    ]
    assert grid(t.mask([0], [0], kv_range=(0, 5), causal=False)) == ["ooooo"]


def test_padding_rows_and_columns() -> None:
    t = CellTable(16, 1)
    t.store(0, [0, 1, 2], [0, 0, 0])
    assert t.kv_range(8) == (0, 8)
    m = t.mask([0, 1, 2], [0, 0, 0], kv_pad=8, row_pad=4)
    assert m.shape == (4, 8)
    assert grid(m) == [
        "o.......",
        "oo......",
        "ooo.....",
        "........",
    ]
    h = t.mask([0, 1, 2], [0, 0, 0], kv_pad=8, row_pad=4, dtype=np.float16)
    assert h.dtype == np.float16 and grid(h) == grid(m)
    assert np.isneginf(h[3]).all()
    # The padded width is clipped to the capacity.
    small = CellTable(6, 1)
    small.store(0, [0, 1, 2], [0, 0, 0])
    assert small.kv_range(8) == (0, 6)
    assert small.mask([2], [0], kv_pad=8).shape == (1, 6)
    assert CellTable(6, 1).kv_range(8) == (0, 0)


def test_kv_range_for_sequences_and_offset_columns() -> None:
    t = CellTable(1024, 2)
    t.store(0, [0, 1], [0, 0])
    t.store(np.array([300, 301, 302]), [0, 1, 2], [1, 1, 1])
    assert t.kv_range(256) == (0, 512)
    assert t.kv_range(256, seqs=[1]) == (256, 512)
    assert t.kv_range(256, seqs=[0]) == (0, 256)
    m = t.mask([2], [1], kv_range=(296, 304))
    assert grid(m) == ["....ooo."]  # column j is cell 296 + j


def test_mask_matches_reference_rule_on_random_states() -> None:
    """Every visibility rule and mixture of them (per-row or uniform causality, window, chunk, image spans), over
    random tables, cell ranges and both mask types, against the rule written out cell by cell; the table's mask
    (read in place) and build_mask over the gathered rows agree."""
    rng = np.random.default_rng(1234)
    for _ in range(200):
        cap, ns = 64, 3
        t = CellTable(cap, ns)
        n = int(rng.integers(1, cap))
        cells = rng.choice(cap, size=n, replace=False)
        t.store(cells, rng.integers(0, 40, size=n), rng.integers(0, ns, size=n))
        nt = int(rng.integers(1, 6))
        pos = rng.integers(0, 45, size=nt).astype(np.int32)
        seq = rng.integers(0, ns, size=nt).astype(np.int32)
        window = None if rng.random() < 0.5 else int(rng.integers(0, 10))
        chunk = None if rng.random() < 0.5 else int(rng.integers(1, 8))
        kind = rng.integers(0, 3)
        causal: bool | np.ndarray = bool(kind) if kind < 2 else rng.random(nt) < 0.7
        spans = None
        if rng.random() < 0.3:
            first = pos - rng.integers(0, 4, size=nt)
            spans = np.stack([first, pos + rng.integers(0, 4, size=nt)], axis=1).astype(np.int32)
        start = int(rng.integers(0, cap))
        stop = int(rng.integers(start, cap + 1))
        dtype = np.float16 if rng.random() < 0.5 else np.float32
        got = t.mask(pos, seq, kv_range=(start, stop), window=window, chunk=chunk, causal=causal, spans=spans,
                     row_pad=8, dtype=dtype)
        want = np.full((8, stop - start), NEG, dtype=dtype)
        cp, member = t.positions, t.sequences
        for i in range(nt):
            p = int(pos[i])
            row_causal = causal if isinstance(causal, bool) else bool(causal[i])
            for c in range(start, stop):
                q = int(cp[c])
                in_span = spans is not None and spans[i, 0] <= q <= spans[i, 1]
                ok = (not row_causal or q <= p) and (window is None or p - q <= window)
                ok = (ok or in_span) and (chunk is None or q // chunk == p // chunk)
                if bool(member[c, seq[i]]) and ok:
                    want[i, c - start] = 0
        assert got.dtype == dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got.view(np.uint16 if dtype is np.float16 else np.uint32),
                                      want.view(np.uint16 if dtype is np.float16 else np.uint32))  # +0, not -0
        gathered = build_mask(cp[start:stop], member[start:stop, seq].T, pos, window=window, chunk=chunk,
                              causal=causal, spans=spans, n_rows=8, dtype=dtype)
        np.testing.assert_array_equal(gathered, got)


def test_mask_loop_checks_its_indices() -> None:
    """The C loop behind the masks is handed only indices it can follow: anything else is a ValueError."""
    cp = np.zeros(8, dtype=np.int32)
    member = np.ones((2, 8), dtype=np.bool_)
    rows = np.array([0, 1], dtype=np.intp)
    hi = np.array([0, 0], dtype=np.int32)
    assert attention_mask(cp, member, 2, 6, rows, None, hi, 3, np.float32).shape == (3, 6)
    bad: list[tuple[object, ...]] = [
        (cp, member, 3, 6, rows, None, hi, 2, np.float32),  # cells past the capacity
        (cp, member, -1, 2, rows, None, hi, 2, np.float32),
        (cp, member, 0, 8, np.array([0, 2], dtype=np.intp), None, hi, 2, np.float32),  # no sequence 2
        (cp, member, 0, 8, np.array([-1, 0], dtype=np.intp), None, hi, 2, np.float32),
        (cp, member, 0, 8, rows, None, hi, 1, np.float32),  # fewer rows than tokens
        (cp, member, 0, 8, rows, None, hi[:1], 2, np.float32),  # a bound per token
        (cp, member, 0, 8, rows, hi.astype(np.int64), None, 2, np.float32),
        (cp.astype(np.int64), member, 0, 8, rows, None, hi, 2, np.float32),
        (cp, member[:, :4], 0, 4, rows, None, hi, 2, np.float32),  # membership of another capacity
        (cp, member[:, ::2].repeat(2, axis=1)[:, :8].T.copy().T, 0, 8, rows, None, hi, 2, np.float32),  # strided
        (cp, member, 0, 8, rows, None, hi, 2, np.float64),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            attention_mask(*args)  # type: ignore[arg-type]


def test_build_mask_rejects_bad_arguments() -> None:
    cp = np.array([0, 1], dtype=np.int32)
    member = np.ones((1, 2), dtype=np.bool_)
    with pytest.raises(ValueError):
        build_mask(cp, member, np.array([0], dtype=np.int32), n_rows=0)
    with pytest.raises(ValueError):
        build_mask(cp, member, np.array([0, 1], dtype=np.int32))
    with pytest.raises(ValueError):
        build_mask(cp, member, np.array([0], dtype=np.int32), dtype=np.float64)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_mask(cp, member, np.array([0], dtype=np.int32), causal=np.array([True, False]))
    with pytest.raises(ValueError):
        build_mask(cp, member.copy(), np.array([0], dtype=np.int32), window=-1)
    assert [round_up(n, 4) for n in (0, 1, 4, 5)] == [0, 4, 4, 8]


# ------------------------------------------------------------------- removal


def test_remove_middle_shifts_later_positions() -> None:
    t = CellTable(8, 1)
    t.store(0, list(range(8)), [0] * 8)
    plan = t.remove(0, 2, 5)
    assert plan is not None
    assert plan.seq == 0
    assert plan.cells.tolist() == [5, 6, 7]
    assert plan.delta == -3
    assert plan.new_positions.tolist() == [2, 3, 4]
    assert plan.cell_range == (5, 8)
    assert plan.offsets(0, 8).tolist() == [0, 0, 0, 0, 0, -3, -3, -3]
    assert plan.offsets(6, 8).tolist() == [-3, -3]
    assert t.positions.tolist() == [0, 1, -1, -1, -1, 2, 3, 4]
    assert seqs_of(t) == [[0], [0], [], [], [], [0], [0], [0]]

    # Continue at position 5 in the first free cell: the gap is invisible.
    cells = t.free_cells(1)
    assert cells.tolist() == [2]
    t.store(cells, [5], [0])
    assert grid(t.mask([5], [0], kv_range=(0, 8))) == ["ooo..ooo"]


def test_remove_to_end_and_edge_cases() -> None:
    t = CellTable(6, 1)
    t.store(0, list(range(6)), [0] * 6)
    assert t.remove(0, 4) is None
    assert t.positions.tolist() == [0, 1, 2, 3, -1, -1]
    assert t.remove(0, 1, 1) is None  # empty range: nothing changes
    assert t.positions.tolist() == [0, 1, 2, 3, -1, -1]
    assert t.remove(0, 3, 10) is None  # removes the tail, nothing to shift
    assert t.positions.tolist() == [0, 1, 2, -1, -1, -1]
    with pytest.raises(ValueError):
        t.remove(0, 3, 2)
    with pytest.raises(ValueError):
        t.remove(1, 0)
    assert t.remove(0, 0) is None
    assert t.n_used == 0 and t.extent == 0 and t.max_pos(0) == -1


def test_remove_from_shared_cell_drops_only_that_sequence() -> None:
    t = CellTable(6, 2)
    t.store(0, [0, 1, 2, 3], [0, 0, 0, 0])
    t.copy_prefix(0, 1, 2)  # seq 1 shares cells 0, 1
    plan = t.remove(0, 0, 2)  # shared cells lose seq 0; cells 2, 3 are seq 0's alone
    assert plan is not None
    assert plan.cells.tolist() == [2, 3] and plan.delta == -2
    assert plan.new_positions.tolist() == [0, 1]
    assert t.positions.tolist() == [0, 1, 0, 1, -1, -1]
    assert seqs_of(t) == [[1], [1], [0], [0], [], []]


def test_refused_shift_of_shared_cells_leaves_state_untouched() -> None:
    t = CellTable(8, 2)
    t.store(0, [0, 1, 2, 3], [0, 0, 0, 0])
    t.copy_prefix(0, 1, 3)  # cells 0..2 shared
    before = snapshot(t)
    with pytest.raises(NotSupportedError, match=r"cells \[2\].*shared with sequences \[1\]"):
        t.remove(0, 1, 2)  # would shift shared cell 2 (pos 2)
    assert snapshot(t) == before
    with pytest.raises(NotSupportedError):
        t.remove(1, 0, 1)
    assert snapshot(t) == before
    assert isinstance(NotSupportedError("x"), KVCacheError)


# ------------------------------------------------------------ defragmentation


def test_defrag_plan_runs_and_metadata() -> None:
    t = CellTable(12, 2)
    t.store(np.array([0, 1, 4, 5, 6, 9]), [0, 1, 2, 3, 4, 0], [0, 0, 0, 0, 0, 1])
    before_mask = t.mask([4, 0], [0, 1], kv_range=(0, 12))
    before_pos = t.positions.copy()
    before_seqs = t.sequences.copy()
    live = t.positions
    plan = t.defrag_plan()
    assert plan.order.tolist() == [0, 1, 4, 5, 6, 9]
    assert plan.src.tolist() == [4, 5, 6, 9]
    assert plan.dst.tolist() == [2, 3, 4, 5]
    assert plan.runs == [(4, 2, 3), (9, 5, 1)]
    assert plan.n_used == 6 and not plan.is_noop
    t.apply_moves(plan)
    assert t.positions.tolist() == [0, 1, 2, 3, 4, 0] + [-1] * 6
    assert seqs_of(t) == [[0]] * 5 + [[1]] + [[]] * 6
    assert live.tolist() == t.positions.tolist()  # views handed out stay live
    # Same cell contents, in the same order, now at the front.
    np.testing.assert_array_equal(t.positions[:6], before_pos[plan.order])
    np.testing.assert_array_equal(t.sequences[:6], before_seqs[plan.order])
    # Same mask, columns permuted accordingly; the rest is hidden.
    after_mask = t.mask([4, 0], [0, 1], kv_range=(0, 12))
    np.testing.assert_array_equal(after_mask[:, :6], before_mask[:, plan.order])
    assert np.isneginf(after_mask[:, 6:]).all()
    assert grid(before_mask) == ["oo..ooo.....", ".........o.."]
    assert grid(after_mask) == ["ooooo.......", ".....o......"]
    assert t.defrag_plan().is_noop and t.defrag_plan().runs == []


def test_find_slot_fragmented_then_defrag() -> None:
    t = CellTable(8, 2)
    t.store(np.array([0, 2, 4, 6]), [0, 1, 2, 3], [0, 0, 0, 0])
    t.store(np.array([1, 3, 5, 7]), [0, 1, 2, 3], [1, 1, 1, 1])
    assert t.remove(1, 0) is None
    assert t.n_free == 4
    assert t.find_slot(1) == 1
    assert t.find_slot(2) is None  # 4 free cells, but scattered
    assert t.free_cells(2).tolist() == [1, 3]
    plan = t.defrag_plan()
    assert plan.runs == [(2, 1, 1), (4, 2, 1), (6, 3, 1)]
    t.apply_moves(plan)
    assert t.positions.tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
    assert t.find_slot(4) == 4
    with pytest.raises(CacheFullError):
        t.find_slot(5)


def test_ordered_free_cells_keep_each_sequence_in_position_order() -> None:
    t = CellTable(8, 3)
    t.store(np.array([2, 5]), [0, 1], [0, 0])    # seq 0 holds cells 2 and 5
    t.store(np.array([0]), [0], [1])             # seq 1 holds cell 0
    before = snapshot(t)
    # seq 0 only gets cells above 5; its tokens come out of order in the batch and get cells in position order;
    # seq 1 takes the lowest free cells above 0 that seq 0 left; seq 2 (nothing held) the lowest free overall
    cells = t.ordered_free_cells([3, 2, 1, 0], [0, 0, 1, 2])
    assert cells is not None and cells.tolist() == [7, 6, 1, 3]
    assert snapshot(t) == before                 # a query: nothing stored
    assert t.ordered_free_cells([2, 3, 4], [0, 0, 0]) is None  # only 6 and 7 lie above seq 0's cell 5
    with pytest.raises(CacheFullError):
        t.ordered_free_cells(list(range(6)), [2] * 6)   # 5 cells free at all
    t.apply_moves(t.defrag_plan())               # order kept: seq 1 at 0, seq 0 at 1-2, free 3-7
    cells = t.ordered_free_cells([2, 3, 4], [0, 0, 0])
    assert cells is not None and cells.tolist() == [3, 4, 5]
    with pytest.raises(ValueError):
        t.ordered_free_cells([0, 1], [0, 3])     # no sequence 3


def test_stale_defrag_plan_is_refused() -> None:
    t = CellTable(4, 1)
    t.store(np.array([1]), [0], [0])
    plan = t.defrag_plan()
    t.store(np.array([3]), [1], [0])
    before = snapshot(t)
    with pytest.raises(ValueError, match="stale"):
        t.apply_moves(plan)
    assert snapshot(t) == before
    assert isinstance(plan, DefragPlan)


# ---------------------------------------------------------------- copy_prefix


def test_copy_prefix_then_divergent_continuation() -> None:
    t = CellTable(8, 2)
    t.store(0, [0, 1, 2, 3], [0, 0, 0, 0])
    t.copy_prefix(0, 1, 3)
    assert seqs_of(t)[:4] == [[0, 1], [0, 1], [0, 1], [0]]
    assert t.seq_positions(1).tolist() == [0, 1, 2]
    assert t.can_resume(1, 3)

    # Both continue: seq 0 at position 4, seq 1 diverges at position 3.
    t.store(t.free_cells(2), [4, 3], [0, 1])
    assert t.positions.tolist() == [0, 1, 2, 3, 4, 3, -1, -1]
    assert grid(t.mask([4, 3], [0, 1], kv_range=(0, 8))) == [
        "ooooo...",
        "ooo..o..",
    ]

    # Dropping seq 1 frees only its private cell.
    assert t.remove(1, 0) is None
    assert t.positions.tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    assert seqs_of(t)[:6] == [[0], [0], [0], [0], [0], []]


def test_copy_prefix_replaces_destination_cells() -> None:
    t = CellTable(6, 3)
    t.store(0, [0, 1, 2], [0, 0, 0])
    t.store(3, [0, 1], [1, 1])
    t.copy_prefix(0, 1, 2)  # seq 1's own cells 3, 4 become empty
    assert t.positions.tolist() == [0, 1, 2, -1, -1, -1]
    assert seqs_of(t)[:3] == [[0, 1], [0, 1], [0]]
    t.copy_prefix(1, 1, 1)  # src == dst truncates
    assert seqs_of(t)[:3] == [[0, 1], [0], [0]]
    t.copy_prefix(2, 0, 5)  # empty source: seq 0 ends up empty, seq 1 keeps cell 0
    assert t.positions.tolist() == [0, -1, -1, -1, -1, -1]
    assert seqs_of(t)[0] == [1]


# ------------------------------------------------------ capacity and storing


def test_cache_full_raises() -> None:
    t = CellTable(4, 1)
    t.store(0, [0, 1, 3], [0, 0, 0])  # cells 0..2
    before = snapshot(t)
    with pytest.raises(CacheFullError, match="need 2 cells, only 1 of 4 free"):
        t.free_cells(2)
    with pytest.raises(CacheFullError):
        t.find_slot(2)
    assert snapshot(t) == before
    assert t.find_slot(1) == 3
    t.store(3, [4], [0])
    with pytest.raises(CacheFullError):
        t.find_slot(1)
    assert issubclass(CacheFullError, KVCacheError)


def test_store_validates_before_mutating() -> None:
    t = CellTable(4, 2)
    t.store(0, [0], [0])
    before = snapshot(t)
    with pytest.raises(ValueError, match="already in use"):
        t.store(np.array([1, 0]), [1, 2], [0, 0])
    with pytest.raises(ValueError):
        t.store(np.array([1, 1]), [1, 2], [0, 0])
    with pytest.raises(ValueError):
        t.store(3, [1, 2], [0, 0])  # runs past the capacity
    with pytest.raises(ValueError):
        t.store(1, [1], [2])  # no such sequence
    with pytest.raises(ValueError):
        t.store(1, [-1], [0])
    with pytest.raises(ValueError):
        t.store(1, [1, 2], [0])
    assert snapshot(t) == before
    with pytest.raises(ValueError):
        t.positions[0] = 5  # read-only view


def test_free_and_clear() -> None:
    t = CellTable(4, 2)
    cells = t.store(0, [0, 1, 0], [0, 0, 1])
    t.free(cells[1:])
    assert t.positions.tolist() == [0, -1, -1, -1]
    t.clear()
    assert t.n_used == 0 and not t.sequences.any()


# ---------------------------------------------------- sliding-window support


def test_can_resume() -> None:
    t = CellTable(16, 2)
    t.store(0, list(range(10)), [0] * 10)
    assert t.can_resume(0, 10) and t.can_resume(0, 5) and t.can_resume(0, 0)
    assert not t.can_resume(0, 11)  # position 10 was never stored
    assert t.can_resume(1, 0) and not t.can_resume(1, 1)

    freed = t.evict_outside_window([10], [0], window=3)
    assert freed.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert t.seq_positions(0).tolist() == [7, 8, 9]
    assert t.can_resume(0, 10, window=3)  # needs 7, 8, 9
    assert not t.can_resume(0, 9, window=3)  # needs 6
    assert not t.can_resume(0, 10)  # full attention needs 0..9
    assert t.can_resume(0, 8, window=1)  # needs 7


def test_evict_outside_window_per_sequence() -> None:
    t = CellTable(12, 3)
    t.store(0, [0, 1, 2, 3, 4], [0] * 5)  # cells 0..4
    t.copy_prefix(0, 2, 2)  # seq 2 shares cells 0, 1
    t.store(5, [0, 1, 2, 3], [1] * 4)  # cells 5..8
    # Batch: seq 0 at positions 5, 6 (lowest 5), seq 1 at 4; window 2.
    freed = t.evict_outside_window([6, 5, 4], [0, 0, 1], window=2)
    # seq 0 keeps >= 3; seq 1 keeps >= 2; cells 0, 1 survive for seq 2.
    assert freed.tolist() == [2, 5, 6]
    assert t.positions.tolist() == [0, 1, -1, 3, 4, -1, -1, 2, 3, -1, -1, -1]
    assert seqs_of(t)[:5] == [[2], [2], [], [0], [0]]
    assert t.evict_outside_window([], [], window=2).tolist() == []


def test_sliding_window_cache_size_suffices() -> None:
    # Two sequences decoding in lock-step plus one prefill batch, in a table of
    # max_sequences * window + max_batch cells, never run out of room.
    window, max_batch, ns = 4, 3, 2
    t = CellTable(ns * window + max_batch, ns)
    nxt = [0, 0]
    for step in range(40):
        if step == 0:
            pos, seq = np.array([0, 1, 2]), np.array([0, 0, 0])
        else:
            pos = np.array(nxt)
            seq = np.array([0, 1])
        t.evict_outside_window(pos, seq, window)
        t.store(t.free_cells(pos.size), pos, seq)
        m = t.mask(pos, seq, kv_range=(0, t.capacity), window=window)
        assert ((m == 0).sum(axis=1) == np.minimum(pos, window) + 1).all()
        for s, p in zip(seq, pos):
            nxt[s] = max(nxt[s], int(p) + 1)
        assert t.can_resume(0, nxt[0], window)
