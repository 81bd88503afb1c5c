"""Cell placement on a decode step: the C loop (ggml/host.py's place_decode) on CellTable's summary (used cells,
extent, each sequence's last cell, kept up to date instead of recomputed) gives the cells the general per-sequence
placement gives; and `place` is ordered_free_cells then store."""
from __future__ import annotations

import copy

import numpy as np
import numpy.typing as npt
import pytest

from ggml.host import evict_decode, place_decode
from kvcache.cells import CellTable
from kvcache.errors import CacheFullError
from kvcache.summary import CellSummary


def _random_decode_step(g: np.random.Generator) -> tuple[CellTable, npt.NDArray[np.intp], npt.NDArray[np.int32]]:
    """A random table (holes, sometimes cells shared by two sequences, sometimes full) and a decode step on it:
    distinct sequences with a position each."""
    cap, n_seq = int(g.integers(2, 40)), int(g.integers(1, 6))
    t = CellTable(cap, n_seq)
    for c in g.choice(cap, size=int(g.integers(0, cap + 1)), replace=False):
        t.store([int(c)], [int(g.integers(0, 50))], [int(g.integers(0, n_seq))])
    if n_seq > 1 and g.random() < 0.3:
        t.copy_prefix(0, 1, 25)  # cells held by two sequences
    k = int(g.integers(1, n_seq + 1))
    return t, g.permutation(n_seq)[:k].astype(np.intp), g.integers(0, 100, k).astype(np.int32)


def test_ordered_free_cells_decode_path_matches_the_general_one() -> None:
    """A decode step (one token per sequence) takes the C loop without storing; it must pick the cells the
    per-sequence loop picks, on random tables (shared cells, holes, full ones), and change nothing."""
    g = np.random.default_rng(11)
    compared = 0
    for _ in range(400):
        t, seqs, pos = _random_decode_step(g)
        k = seqs.size
        free = np.asarray(t.positions) < 0
        if int(free.sum()) < k:
            continue
        before = (np.array(t.positions), np.array(t.sequences), t.version, t._summarized().values.copy())
        fast = t.ordered_free_cells(pos, seqs)
        assert np.array_equal(t.positions, before[0]) and np.array_equal(t.sequences, before[1])
        assert t.version == before[2] and np.array_equal(t._summarized().values, before[3])
        slow = t._cells_by_sequence(pos, seqs, free.copy())
        assert (fast is None) == (slow is None)
        if fast is not None and slow is not None:
            assert fast.tolist() == slow.tolist()
            compared += 1
    assert compared > 200


def test_summary_follows_every_mutation() -> None:
    """The decode path's summary (used count, extent, each sequence's last cell) is updated by store and eviction
    and dropped by everything else: after any random mix of edits it equals one computed from the arrays, and the
    decode placement equals the general one."""
    g = np.random.default_rng(5)
    checked = 0
    for _ in range(60):
        cap, n_seq = int(g.integers(8, 48)), int(g.integers(1, 5))
        t = CellTable(cap, n_seq)
        nxt = [0] * n_seq
        for _ in range(40):
            op = g.random()
            seqs = g.permutation(n_seq)[:int(g.integers(1, n_seq + 1))]
            pos = np.array([nxt[s] for s in seqs], dtype=np.int32)
            if op < 0.5:  # a decode step, or a short prompt of one sequence
                if g.random() < 0.3:
                    s = int(seqs[0])
                    pos = np.arange(nxt[s], nxt[s] + int(g.integers(1, 6)), dtype=np.int32)
                    seqs = np.full(pos.size, s)
                if t.n_free < pos.size:
                    continue
                cells = t.ordered_free_cells(pos, seqs)
                if cells is None:
                    t.apply_moves(t.defrag_plan())
                    cells = t.ordered_free_cells(pos, seqs)
                assert cells is not None
                t.store(cells, pos, seqs)
                for s, p in zip(seqs.tolist(), pos.tolist()):
                    nxt[s] = max(nxt[s], p + 1)
            elif op < 0.65:
                t.evict_outside_window(pos, seqs, int(g.integers(0, 6)))
            elif op < 0.75:
                s = int(seqs[0])
                t.remove(s, int(g.integers(0, nxt[s] + 1)))
                nxt[s] = t.max_pos(s) + 1
            elif op < 0.85 and n_seq > 1:
                t.copy_prefix(int(seqs[0]), int(seqs[-1]), int(g.integers(0, 20)))
                nxt[int(seqs[-1])] = t.max_pos(int(seqs[-1])) + 1
            elif op < 0.95:
                t.apply_moves(t.defrag_plan())
            else:
                t.free(g.choice(cap, size=3, replace=False))
                nxt = [t.max_pos(s) + 1 for s in range(n_seq)]
            assert t._summarized() == CellSummary.of(np.asarray(t.positions), np.asarray(t.sequences).T)
            pos = np.array([nxt[s] for s in seqs], dtype=np.int32)
            if len(set(seqs.tolist())) == seqs.size and t.n_free >= seqs.size:
                fast = t.ordered_free_cells(pos, seqs)
                slow = t._cells_by_sequence(pos, seqs.astype(np.intp), np.asarray(t.positions) < 0)
                assert (None if fast is None else fast.tolist()) == (None if slow is None else slow.tolist())
                checked += 1
    assert checked > 1000


def test_place_is_ordered_free_cells_then_store() -> None:
    """`place` takes the cells ordered_free_cells picks and stores them; when the placement would leave
    `max_holes` empty cells below the extent, or finds no room above a sequence's last cell, it stores nothing."""
    t, u = CellTable(16, 2), CellTable(16, 2)
    for table in (t, u):
        table.store([0, 1, 2, 5], [0, 1, 2, 0], [0, 0, 0, 1])  # holes at 3 and 4
    pos, seqs = np.array([3, 1], np.int32), np.array([0, 1], np.int32)
    expected = u.ordered_free_cells(pos, seqs)
    assert expected is not None and expected.tolist() == [3, 6]
    u.store(expected, pos, seqs)
    version = t.version
    assert t.place(pos, seqs, max_holes=1) is None  # cell 4 would stay empty below the extent 7
    assert t.version == version and t.n_used == 4
    placed = t.place(pos, seqs, max_holes=2)
    assert placed is not None and placed.tolist() == [3, 6]
    assert np.array_equal(t.positions, u.positions) and np.array_equal(t.sequences, u.sequences)
    full = CellTable(4, 1)
    full.store([0, 3], [0, 1], [0, 0])
    assert full.place([2], [0]) is None and full.n_used == 2  # nothing free above cell 3
    with pytest.raises(ValueError):
        t.place([-1], [0])


def test_decode_placement_in_c_matches_the_general_placement() -> None:
    """`place` of a decode step runs in C (ggml/host.py's place_decode); on random tables (holes, shared cells,
    full tables, every max_holes) it takes the cells, stores the positions and membership, and leaves the summary
    that the per-sequence placement plus `store` give, or refuses exactly when that placement does."""
    g = np.random.default_rng(23)
    placed_count = refused = 0
    for _ in range(600):
        t, seqs, pos = _random_decode_step(g)
        k = seqs.size
        if t.n_free < k:
            with pytest.raises(CacheFullError):
                t.place(pos, seqs)
            continue
        max_holes = None if g.random() < 0.4 else int(g.integers(-1, 6))
        free = np.asarray(t.positions) < 0
        want = t._cells_by_sequence(pos, seqs, free.copy())
        if want is not None and max_holes is not None:
            top = max(t.extent, int(want.max()) + 1)
            if top - t.n_used - k >= max_holes:
                want = None
        before = (np.array(t.positions), np.array(t.sequences), t.version)
        t._summarized()
        got = t.place(pos, seqs, max_holes=max_holes)
        if want is None:
            assert got is None
            assert np.array_equal(t.positions, before[0]) and np.array_equal(t.sequences, before[1])
            assert t.version == before[2]
            refused += 1
            continue
        assert got is not None and got.dtype == np.int64 and got.tolist() == want.tolist()
        expect_pos, expect_member = before[0].copy(), before[1].copy()
        expect_pos[want] = pos
        expect_member[want, seqs] = True
        assert np.array_equal(t.positions, expect_pos) and np.array_equal(t.sequences, expect_member)
        assert t.version == before[2] + 1
        assert t._summarized() == CellSummary.of(np.asarray(t.positions), np.asarray(t.sequences).T)
        placed_count += 1
    assert placed_count > 150 and refused > 100, (placed_count, refused)


def test_decode_placement_checks_its_arguments() -> None:
    """The C placement follows only indices it was checked to have: anything else is a ValueError, nothing
    changed."""
    t = CellTable(8, 2)
    table = (t._pos, t._member, t._summarized().values)
    one = np.array([0], dtype=np.int32)
    for seqs, pos in ((np.array([2], dtype=np.intp), one), (np.array([-1], dtype=np.intp), one),
                      (np.array([0, 0], dtype=np.intp), np.array([0, 1], dtype=np.int32)),
                      (np.array([0], dtype=np.intp), np.array([0, 1], dtype=np.int32)),
                      (np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.int32)),
                      (np.arange(65, dtype=np.intp), np.zeros(65, dtype=np.int32))):
        with pytest.raises(ValueError):
            place_decode(*table, seqs, pos, None)
    with pytest.raises(ValueError):
        place_decode(t._pos, t._member, np.zeros(3, dtype=np.int64), np.array([0], dtype=np.intp), one, None)
    with pytest.raises(ValueError):
        place_decode(t._pos[::2], t._member[:, ::2], t._summarized().values, np.array([0], dtype=np.intp), one, None)
    corrupt = t._summarized().values.copy()
    corrupt[1] = 9  # an extent past the capacity
    lower = t._summarized().values.copy()
    lower[2] = -2  # a last cell below -1
    for summary in (corrupt, lower):
        with pytest.raises(ValueError):
            place_decode(t._pos, t._member, summary, np.array([0], dtype=np.intp), one, None)
        with pytest.raises(ValueError):
            evict_decode(t._pos, t._member, summary, np.array([0], dtype=np.intp), np.array([5], dtype=np.int64))
    with pytest.raises(ValueError):  # thresholds must be int64
        evict_decode(*table, np.array([0], dtype=np.intp), one)  # type: ignore[arg-type]
    assert t.n_used == 0 and not t._member.any()


def test_decode_eviction_in_c_matches_the_numpy_eviction() -> None:
    """A sliding window's eviction on a decode step runs in C (ggml/host.py's evict_decode); on random tables
    (shared cells, holes) it frees the cells, drops the memberships and leaves the summary that the numpy eviction
    (taken by a batch with a second token of one sequence, which has the same lowest positions) gives."""
    g = np.random.default_rng(31)
    freed_any = 0
    for _ in range(400):
        cap, n_seq = int(g.integers(4, 40)), int(g.integers(1, 5))
        t = CellTable(cap, n_seq)
        nxt = [0] * n_seq
        for _ in range(int(g.integers(0, cap))):
            s = int(g.integers(0, n_seq))
            placed = t.place([nxt[s]], [s]) if t.n_free else None
            if placed is not None:
                nxt[s] += 1
        if n_seq > 1 and g.random() < 0.3:
            t.copy_prefix(0, 1, int(g.integers(0, 10)))  # cells held by two sequences
            nxt[1] = max(nxt[1], t.max_pos(1) + 1)
        k = int(g.integers(1, n_seq + 1))
        seqs = g.permutation(n_seq)[:k].astype(np.int32)
        pos = np.array([nxt[s] for s in seqs], dtype=np.int32)
        window = int(g.integers(0, 8))
        u = copy.deepcopy(t)
        t._summarized()
        got = t.evict_outside_window(pos, seqs, window)
        want = u.evict_outside_window(np.append(pos, pos[0] + 1), np.append(seqs, seqs[0]), window)
        assert got.dtype == np.int32 and got.tolist() == want.tolist()
        assert np.array_equal(t.positions, u.positions) and np.array_equal(t.sequences, u.sequences)
        assert t._summarized() == CellSummary.of(np.asarray(t.positions), np.asarray(t.sequences).T)
        assert t.version == u.version
        freed_any += bool(got.size)
    assert freed_any > 100, freed_any
