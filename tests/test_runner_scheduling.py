"""runner.scheduling: batch filling, truncation, context shift and slot choice (runner-protocol.md §4.10, §5.11, §5.15)."""
from __future__ import annotations

from collections.abc import Sequence

import pytest

from runner.errors import SequenceError, SlotUnavailableError
from runner.scheduling import (Chunk, SeqState, ShiftPlan, SlotChoice, SlotState, Step, choose_slot,
                               common_prefix_len, context_shift_plan, effective_num_keep, schedule,
                               shift_whole_groups, truncate_prompt)

TEN = list(range(10))


@pytest.mark.parametrize(("num_keep", "n_prompt", "n_ctx", "expected"), [
    (4, 10, 8, 4), (-1, 10, 8, 7), (-1, 5, 8, 5), (4, 10, 3, 2), (0, 10, 8, 0),
])
def test_effective_num_keep(num_keep: int, n_prompt: int, n_ctx: int, expected: int) -> None:
    # §4.10 step 3: < 0 keeps the whole prompt; min(num_keep, n_ctx - 1)
    assert effective_num_keep(num_keep, n_prompt, n_ctx) == expected


@pytest.mark.parametrize(("tokens", "n_ctx", "keep", "same_batch", "expected"), [
    pytest.param(TEN, 10, 4, None, TEN, id="fits"),
    pytest.param(TEN, 8, 4, None, [0, 1, 2, 3, 6, 7, 8, 9], id="drop-oldest-after-keep"),
    pytest.param(TEN, 8, 0, None, TEN[2:], id="keep-0"),
    pytest.param(TEN, 8, 7, None, [0, 1, 2, 3, 4, 5, 6, 9], id="keep-whole-prompt-capped"),
    pytest.param(TEN, 6, 1, {3: 2}, [0, 6, 7, 8, 9], id="cut-inside-group-drops-rest-of-group"),
    pytest.param(TEN, 6, 1, {5: 2}, [0, 5, 6, 7, 8, 9], id="cut-at-group-start-keeps-group"),
    pytest.param(TEN, 6, 1, {8: 1}, [0, 5, 6, 7, 8, 9], id="group-after-cut-untouched"),
    pytest.param(list("abcdef"), 4, 1, None, ["a", "d", "e", "f"], id="any-element-type"),
])
def test_truncate_prompt(tokens: list[object], n_ctx: int, keep: int, same_batch: dict[int, int] | None,
                         expected: list[object]) -> None:
    # §4.10 step 4: keep inputs[:num_keep], drop the next len - n_ctx, never split a SameBatch group
    assert truncate_prompt(tokens, n_ctx, keep, same_batch) == expected


@pytest.mark.parametrize(("tokens", "n_ctx", "keep", "same_batch", "match"), [
    pytest.param(TEN, 6, 1, {0: 2}, "SameBatch may not be specified within numKeep", id="group-in-keep"),
    pytest.param(list(range(5)), 2, 0, {1: 3}, "entire prompt removed by truncation", id="everything-removed"),
])
def test_truncate_prompt_errors(tokens: list[int], n_ctx: int, keep: int, same_batch: dict[int, int],
                                match: str) -> None:
    with pytest.raises(SequenceError, match=match):
        truncate_prompt(tokens, n_ctx, keep, same_batch)


@pytest.mark.parametrize(("n_past", "n_ctx", "keep", "expected"), [
    pytest.param(2048, 2048, 4, ShiftPlan(4, 1022), id="full-keep-4"),
    pytest.param(2048, 2048, 0, ShiftPlan(0, 1024), id="full-keep-0"),
    pytest.param(10, 10, 9, ShiftPlan(9, 1), id="at-least-one"),
    pytest.param(100, 2048, 4, ShiftPlan(4, 0), id="enough-free"),
    pytest.param(1500, 2048, 4, ShiftPlan(4, 474), id="partly-free"),
])
def test_context_shift_plan(n_past: int, n_ctx: int, keep: int, expected: ShiftPlan) -> None:
    # §4.10 step 3: discard = max((n_ctx - keep) // 2, 1) - (n_ctx - n_past), at least 0
    assert context_shift_plan(n_past, n_ctx, keep) == expected


def test_context_shift_keep_too_large() -> None:
    with pytest.raises(ValueError, match="keep exceeds context"):
        context_shift_plan(10, 10, 10)


@pytest.mark.parametrize(("plan", "groups", "n_past", "expected"), [
    pytest.param(ShiftPlan(2, 4), (), 20, ShiftPlan(2, 4), id="no-images"),
    pytest.param(ShiftPlan(2, 4), ((8, 3),), 20, ShiftPlan(2, 4), id="image-after-the-range"),
    pytest.param(ShiftPlan(2, 4), ((6, 3),), 20, ShiftPlan(2, 4), id="image-starting-at-the-end-is-kept"),
    pytest.param(ShiftPlan(2, 4), ((4, 3),), 20, ShiftPlan(2, 6), id="end-inside-an-image-discards-it-whole"),
    pytest.param(ShiftPlan(2, 4), ((2, 3),), 20, ShiftPlan(2, 4), id="image-at-keep-discarded-whole"),
    pytest.param(ShiftPlan(2, 4), ((0, 3),), 20, ShiftPlan(4, 4), id="keep-inside-an-image-keeps-it-whole"),
    pytest.param(ShiftPlan(2, 4), ((0, 3), (6, 5)), 20, ShiftPlan(4, 8), id="both-ends"),
    pytest.param(ShiftPlan(2, 4), ((4, 15),), 20, ShiftPlan(2, 18), id="image-up-to-the-last-input"),
    pytest.param(ShiftPlan(2, 0), ((0, 3),), 20, ShiftPlan(2, 0), id="nothing-to-discard"),
])
def test_shift_whole_groups(plan: ShiftPlan, groups: tuple[tuple[int, int], ...], n_past: int,
                            expected: ShiftPlan) -> None:
    got = shift_whole_groups(plan, groups, n_past)
    assert got == expected
    for first, n in groups:  # every image is wholly kept or wholly discarded
        inside = [got.keep <= i < got.keep + got.discard for i in range(first, first + n + 1)]
        assert all(inside) or not any(inside)


def test_shift_whole_groups_keep_covering_everything() -> None:
    with pytest.raises(ValueError, match="keep covers an image"):
        shift_whole_groups(ShiftPlan(2, 4), ((0, 9),), 10)


def test_schedule_shifts_whole_images() -> None:
    # 10 cached of n_ctx 10, keep 0: the plain plan discards 5 (0-4), inside the image at 3-6: all of it goes
    step = schedule([SeqState(0, 10, 1, cached_groups=((3, 3),))], 8, 10)
    assert step.chunks[0].shift == ShiftPlan(0, 7) and step.chunks[0].pos == 3


S = SeqState


@pytest.mark.parametrize(("table", "batch", "n_ctx", "start", "expected"), [
    pytest.param([S(0, 10, 1)], 512, 2048, 0,
                 Step((Chunk(0, 0, 1, 10, 0, 0),), 1, (0,), 0), id="one-generating"),
    pytest.param([S(0, 0, 1000)], 512, 2048, 0,
                 Step((Chunk(0, 0, 512, 0, 0),), 512, (), 0), id="long-prompt-first-part"),
    pytest.param([S(0, 512, 488)], 512, 2048, 0,
                 Step((Chunk(0, 0, 488, 512, 0, 0),), 488, (487,), 0), id="long-prompt-last-part-gets-logits"),
    pytest.param([S(0, 0, 600), S(1, 0, 300)], 512, 2048, 0,
                 Step((Chunk(0, 0, 512, 0, 0),), 512, (), 1), id="two-prompts-second-starved-goes-next"),
    pytest.param([S(0, 512, 88), S(1, 0, 300)], 512, 2048, 1,
                 Step((Chunk(1, 1, 300, 0, 0, 0), Chunk(0, 0, 88, 512, 300, 1)), 388, (299, 387), 1),
                 id="rotated-start"),
    pytest.param([S(0, 5, 1), S(1, 0, 1000)], 512, 2048, 0,
                 Step((Chunk(0, 0, 1, 5, 0, 0), Chunk(1, 1, 511, 0, 1)), 512, (0,), 0), id="generate-plus-prompt"),
    pytest.param([None, S(3, 7, 1), None, S(5, 9, 1)], 512, 2048, 2,
                 Step((Chunk(3, 5, 1, 9, 0, 0), Chunk(1, 3, 1, 7, 1, 1)), 2, (0, 1), 2), id="free-rows-skipped"),
    pytest.param([S(0, 1, 1), S(1, 1, 1), S(2, 1, 1)], 2, 2048, 0,
                 Step((Chunk(0, 0, 1, 1, 0, 0), Chunk(1, 1, 1, 1, 1, 1)), 2, (0, 1), 2), id="round-robin-a"),
    pytest.param([S(0, 1, 1), S(1, 1, 1), S(2, 1, 1)], 2, 2048, 2,
                 Step((Chunk(2, 2, 1, 1, 0, 0), Chunk(0, 0, 1, 1, 1, 1)), 2, (0, 1), 1), id="round-robin-b"),
    pytest.param([S(0, 2048, 1, num_keep=4)], 512, 2048, 0,
                 Step((Chunk(0, 0, 1, 1026, 0, 0, ShiftPlan(4, 1022)),), 1, (0,), 0), id="context-shift-§5.11"),
    pytest.param([S(0, 2040, 20, num_keep=4)], 512, 2048, 0,
                 Step((Chunk(0, 0, 8, 2040, 0),), 8, (), 0), id="no-shift-mid-batch-stops-adding"),
    pytest.param([S(0, 2048, 12, num_keep=4)], 512, 2048, 0,
                 Step((Chunk(0, 0, 12, 1026, 0, 0, ShiftPlan(4, 1022)),), 12, (11,), 0), id="shift-then-rest"),
    pytest.param([S(0, 0, 10, same_batch=((2, 5),))], 4, 2048, 0,
                 Step((Chunk(0, 0, 2, 0, 0),), 2, (), 0), id="group-does-not-fit-after-others"),
    pytest.param([S(0, 2, 8, same_batch=((0, 5),))], 4, 2048, 0,
                 Step((Chunk(0, 0, 6, 2, 0),), 6, (), 0), id="group-exceeds-batch-when-first"),
    pytest.param([S(0, 3, 1), S(1, 0, 6, same_batch=((0, 5),))], 4, 2048, 0,
                 Step((Chunk(0, 0, 1, 3, 0, 0),), 1, (0,), 1), id="group-waits-for-empty-batch"),
    pytest.param([S(0, 3, 0), S(1, 3, 1)], 4, 2048, 0,
                 Step((Chunk(1, 1, 1, 3, 0, 0),), 1, (0,), 0), id="nothing-pending-not-starved"),
    pytest.param([], 4, 2048, 3, Step((), 0, (), 0), id="empty-table"),
])
def test_schedule(table: Sequence[SeqState | None], batch: int, n_ctx: int, start: int, expected: Step) -> None:
    assert schedule(table, batch, n_ctx, start) == expected


def test_step_positions_and_slots() -> None:
    step = schedule([S(4, 512, 2), S(6, 0, 3)], 512, 2048, 1)
    assert step.positions() == [0, 1, 2, 512, 513]
    assert step.slots() == [6, 6, 6, 4, 4]


def test_no_starvation_over_steps() -> None:
    """Three long prompts and batch 4: every sequence finishes, none waits more than two steps in a row."""
    pending = [9, 9, 9]
    cached = [0, 0, 0]
    start, waited = 0, [0, 0, 0]
    for _ in range(50):
        if not any(pending):
            break
        step = schedule([S(i, cached[i], pending[i]) if pending[i] else None for i in range(3)], 4, 2048, start)
        got = {c.seq for c in step.chunks}
        for i in range(3):
            waited[i] = 0 if i in got or not pending[i] else waited[i] + 1
            assert waited[i] <= 2
        for c in step.chunks:
            pending[c.seq] -= c.n_inputs
            cached[c.seq] += c.n_inputs
        start = step.next_start
    assert pending == [0, 0, 0]


@pytest.mark.parametrize(("batch", "n_ctx"), [(0, 10), (4, 0)])
def test_schedule_bad_limits(batch: int, n_ctx: int) -> None:
    with pytest.raises(ValueError):
        schedule([S(0, 0, 1)], batch, n_ctx)


@pytest.mark.parametrize(("a", "b", "expected"), [
    ([], [1], 0), ([1, 2, 3], [1, 2, 4], 2), ([1, 2], [1, 2, 3], 2), ((1, 2), [1, 2], 2), ("abc", "abd", 2),
    ([(1, 0), (2, 7)], [(1, 0), (2, 8)], 1),  # inputs as (token, image hash): the hash distinguishes images
])
def test_common_prefix_len(a: Sequence[object], b: Sequence[object], expected: int) -> None:
    assert common_prefix_len(a, b) == expected


def slot(i: int, inputs: list[int], in_use: bool = False, last_used: float = 0.0) -> SlotState:
    return SlotState(i, inputs, in_use, last_used)


@pytest.mark.parametrize(("prompt", "slots", "expected"), [
    pytest.param([1, 2, 3, 4, 9], [slot(0, [1, 2, 3]), slot(1, [1, 2, 3, 4, 5])], SlotChoice(1, 4),
                 id="longest-prefix"),
    pytest.param([1, 2, 3, 4, 9], [slot(0, [1, 2, 3]), slot(1, [1, 2, 3, 4, 5], in_use=True)], SlotChoice(0, 3),
                 id="in-use-skipped"),
    pytest.param([1, 2, 3], [slot(0, [1, 2]), slot(1, [1, 2, 7])], SlotChoice(0, 2), id="tie-lowest-id"),
    pytest.param([1, 2], [slot(0, [9])], SlotChoice(0, 0), id="zero-match-still-chosen"),
    pytest.param([1, 2, 3], [slot(0, [1, 2, 3])], SlotChoice(0, 2), id="whole-prompt-cached-back-off-one"),
    pytest.param([1, 2, 3], [slot(0, [1, 2, 3, 4])], SlotChoice(0, 2), id="prompt-prefix-of-history"),
    pytest.param([], [slot(0, [1])], SlotChoice(0, 0), id="empty-prompt"),
])
def test_choose_slot_default(prompt: list[int], slots: list[SlotState], expected: SlotChoice) -> None:
    # §4.10 slot assignment, default policy
    assert choose_slot(prompt, slots, multiuser=False) == expected


@pytest.mark.parametrize(("prompt", "slots", "expected"), [
    pytest.param([1, 2, 3, 4], [slot(0, [1, 2], last_used=5), slot(1, [1, 2, 3], last_used=1)], SlotChoice(1, 3),
                 id="best-covers-history-and-free"),
    pytest.param([1, 2, 3, 4], [slot(0, []), slot(1, [1, 2, 3], in_use=True, last_used=9)],
                 SlotChoice(0, 3, fork_from=1, n_fork=3), id="best-in-use-fork-into-lru"),
    pytest.param([1, 2, 9], [slot(0, [1, 2, 3, 4], last_used=10), slot(1, [5], last_used=1)],
                 SlotChoice(1, 2, fork_from=0, n_fork=2), id="partial-match-fork-into-lru"),
    pytest.param([1, 2, 9], [slot(0, [1, 2, 3, 4], last_used=1), slot(1, [5], last_used=10)], SlotChoice(0, 2),
                 id="best-is-lru-no-fork"),
    pytest.param([1], [slot(0, [7], last_used=5), slot(1, [8], last_used=3)], SlotChoice(1, 0), id="no-match-lru"),
    pytest.param([1, 2], [slot(0, []), slot(1, [])], SlotChoice(0, 0), id="empty-slots-first"),
    pytest.param([1, 2, 3], [slot(0, [], last_used=2), slot(1, [1, 2, 3], in_use=True)],
                 SlotChoice(0, 2, fork_from=1, n_fork=3), id="fork-whole-prompt-back-off-one"),
    pytest.param([1, 2], [slot(0, [1], in_use=True), slot(1, [], last_used=3), slot(2, [], last_used=3)],
                 SlotChoice(1, 1, fork_from=0, n_fork=1), id="lru-tie-first"),
])
def test_choose_slot_multiuser(prompt: list[int], slots: list[SlotState], expected: SlotChoice) -> None:
    # §4.10 slot assignment, --multiuser-cache policy
    assert choose_slot(prompt, slots, multiuser=True) == expected


@pytest.mark.parametrize("multiuser", [False, True])
def test_choose_slot_none_free(multiuser: bool) -> None:
    with pytest.raises(SlotUnavailableError):
        choose_slot([1], [slot(0, [1], in_use=True)], multiuser=multiuser)
