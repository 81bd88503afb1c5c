"""Pure scheduling decisions: what goes into the next forward pass, prompt truncation, context shift, slot choice.

Mirrors the Go new-engine runner (runner-protocol.md §4.10, §5 items 11 and 15) on plain counts and token lists,
so it can be tested with tables. No tensors, no KV cache objects: the caller applies the returned plans.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from runner.errors import SequenceError, SlotUnavailableError

T = TypeVar("T")


# --- truncation and context shift -----------------------------------------------------------------------------

def effective_num_keep(num_keep: int, n_prompt: int, n_ctx: int) -> int:
    """num_keep as the runner uses it: < 0 keeps the whole prompt; capped at n_ctx - 1 so a shift can always
    discard at least one input (§4.10 "Sequence creation" step 3)."""
    keep = n_prompt if num_keep < 0 else num_keep
    return min(keep, n_ctx - 1)


def truncate_prompt(tokens: Sequence[T], n_ctx: int, num_keep: int,
                    same_batch: Mapping[int, int] | None = None) -> list[T]:
    """Fit a prompt into n_ctx inputs: keep the first num_keep, drop the oldest inputs after them (§4.10 step 4).

    No room is reserved for generation: a prompt of exactly n_ctx inputs is kept whole and the first generated
    token triggers a context shift. `num_keep` is taken as given (pass `effective_num_keep(...)`).
    same_batch maps an input index to the number of inputs after it that must share its batch (an image): such a
    group is never split; if the cut falls inside one, the whole rest of the group is dropped too.

    Raises:
        SequenceError: a same-batch group starts inside num_keep, or nothing of the prompt would be left.
    """
    if n_ctx <= 0:
        raise ValueError(f"n_ctx must be positive, got {n_ctx}")
    if len(tokens) <= n_ctx:
        return list(tokens)
    groups = same_batch or {}
    start = num_keep + len(tokens) - n_ctx
    remaining = 0  # inputs left in the group being walked
    for i in range(len(tokens)):
        if remaining > 0:
            remaining -= 1
            if start == i:
                start += 1  # the cut fell inside a group: move it past this member
        elif start == i:
            break
        n = groups.get(i, 0)
        if n:
            if i < num_keep:
                raise SequenceError(f"SameBatch may not be specified within numKeep "
                                    f"(index: {i} numKeep: {num_keep} SameBatch: {n})")
            remaining = n
    if start >= len(tokens):
        raise SequenceError("entire prompt removed by truncation")
    return list(tokens[:num_keep]) + list(tokens[start:])


@dataclass(frozen=True, slots=True)
class ShiftPlan:
    """Remove the `discard` cached inputs after the first `keep` (positions keep … keep+discard-1) and move the
    rest down by `discard`; discard 0 means nothing to do."""

    keep: int
    discard: int


def context_shift_plan(n_past: int, n_ctx: int, num_keep: int) -> ShiftPlan:
    """How much to discard when a slot holding n_past inputs has no room for the next one (§4.10 step 3).

    Targets max((n_ctx - num_keep) // 2, 1) free cells: discard = target - (n_ctx - n_past), at least 0. For a
    full slot (n_past == n_ctx) that is (n_ctx - num_keep) // 2.

    Raises:
        ValueError: num_keep >= n_ctx (nothing could be discarded).
    """
    if num_keep >= n_ctx:
        raise ValueError(f"unable to shift context - keep exceeds context (keep: {num_keep} context: {n_ctx})")
    target = max((n_ctx - num_keep) // 2, 1)
    return ShiftPlan(keep=num_keep, discard=max(target - (n_ctx - n_past), 0))


def shift_whole_groups(plan: ShiftPlan, groups: Sequence[tuple[int, int]], n_past: int) -> ShiftPlan:
    """`plan` widened so that it cuts no same-batch group (an image) of the cached inputs; `groups` holds
    (index of a group's first cached input, number of inputs after it in the group). A group the discarded range
    ends inside is discarded whole (discard grows to its end), as Ollama's ShiftDiscard discards a SameBatch run
    together; one that `keep` falls inside is kept whole (keep moves past it: num_keep asked for its start).

    Raises:
        ValueError: nothing is left to discard after the kept group.
    """
    if not plan.discard or not groups:
        return plan
    keep = plan.keep
    for first, n in groups:
        if first < keep <= first + n:
            keep = first + n + 1
    end = keep + plan.discard
    for first, n in groups:
        if first < end <= first + n:
            end = first + n + 1
    end = min(end, n_past)
    if end <= keep:
        raise ValueError(f"unable to shift context - keep covers an image up to {keep} of {n_past} inputs")
    return ShiftPlan(keep=keep, discard=end - keep)


# --- batch scheduling -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SeqState:
    """What the scheduler needs to know about one active sequence.

    n_pending: inputs still to evaluate, in order (the prompt remainder; 1 while generating: the last sampled
    token). same_batch: (offset into the pending inputs, n) pairs; the input at that offset and the n after it
    must go into one forward pass. cached_groups: the same for the cached inputs (offsets from the first), which
    a context shift keeps or discards whole; only needed when a shift may come.
    """

    slot: int
    n_cached: int
    n_pending: int
    num_keep: int = 0
    same_batch: tuple[tuple[int, int], ...] = ()
    cached_groups: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """The inputs one sequence contributes to a step: its first `n_inputs` pending inputs, placed at batch
    indices batch_offset … and positions pos …; `output` is its row in the step's logits when its last pending
    input is included (then it samples after the step). `shift` must be applied to its slot first."""

    seq: int
    slot: int
    n_inputs: int
    pos: int
    batch_offset: int
    output: int | None = None
    shift: ShiftPlan | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One forward pass. outputs: batch indices whose logits are wanted, in row order."""

    chunks: tuple[Chunk, ...]
    n_tokens: int
    outputs: tuple[int, ...]
    next_start: int = 0

    def positions(self) -> list[int]:
        """Position of every batch entry, in batch order."""
        return [c.pos + i for c in self.chunks for i in range(c.n_inputs)]

    def slots(self) -> list[int]:
        """KV slot id of every batch entry, in batch order."""
        return [c.slot for c in self.chunks for _ in range(c.n_inputs)]


def schedule(table: Sequence[SeqState | None], batch_size: int, n_ctx: int, start: int = 0) -> Step:
    """Fill one batch from the sequence table, round-robin from index `start` (§4.10 "Batch loop" step 3).

    Each sequence adds its pending inputs in order until the batch holds batch_size inputs; a same-batch group
    may exceed batch_size only when it is the first thing in the batch. A sequence whose working set would pass
    n_ctx gets a context shift (before its first input of this step) or stops adding. `next_start` is the first
    sequence that got nothing (so it goes first next time and cannot starve), else `start` unchanged.
    Entries that are None are free table rows. Sequences that reached num_predict must be removed beforehand.

    Raises:
        ValueError: batch_size or n_ctx not positive, or a needed shift with num_keep >= n_ctx.
    """
    if batch_size <= 0 or n_ctx <= 0:
        raise ValueError(f"batch_size and n_ctx must be positive (got {batch_size}, {n_ctx})")
    n_seqs = len(table)
    chunks: list[Chunk] = []
    outputs: list[int] = []
    n_batch = 0
    resume = -1
    for k in range(n_seqs):
        idx = (start + k) % n_seqs
        seq = table[idx]
        if seq is None:
            continue
        groups = dict(seq.same_batch)
        limit = batch_size
        n_cached = seq.n_cached
        taken = 0
        shift: ShiftPlan | None = None
        for i in range(seq.n_pending):
            min_batch = 1 + groups.get(i, 0)
            limit = max(limit, min_batch)  # a group larger than the batch goes alone into an empty batch
            if n_batch + taken + min_batch > limit:
                if taken == 0 and resume == -1:
                    resume = idx
                break
            if n_cached + taken + min_batch > n_ctx:
                if taken:
                    break
                shift = shift_whole_groups(context_shift_plan(n_cached, n_ctx, seq.num_keep), seq.cached_groups,
                                           n_cached)
                n_cached -= shift.discard
            taken += 1
        if taken == 0:
            continue
        output = None
        if taken == seq.n_pending:
            outputs.append(n_batch + taken - 1)
            output = len(outputs) - 1
        chunks.append(Chunk(seq=idx, slot=seq.slot, n_inputs=taken, pos=n_cached, batch_offset=n_batch,
                            output=output, shift=shift))
        n_batch += taken
    next_start = resume if resume != -1 else (start % n_seqs if n_seqs else 0)
    return Step(tuple(chunks), n_batch, tuple(outputs), next_start)


# --- prefix reuse -----------------------------------------------------------------------------------------------

def common_prefix_len(a: Sequence[object], b: Sequence[object]) -> int:
    """Number of leading inputs two sequences share (inputs compared with ==: token id and image hash)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class SlotState:
    """A KV cache slot as the chooser sees it: its cached inputs, whether a sequence uses it, when last used."""

    id: int
    inputs: Sequence[object]
    in_use: bool = False
    last_used: float = 0.0


@dataclass(frozen=True, slots=True)
class SlotChoice:
    """Where a new sequence goes. First, if `fork_from` is set, copy that slot's first `n_fork` inputs into
    `slot` (cache copy_prefix); then drop the slot's cached inputs from `n_past` on; evaluate prompt[n_past:]."""

    slot: int
    n_past: int
    fork_from: int | None = None
    n_fork: int = 0


def choose_slot(prompt: Sequence[object], slots: Sequence[SlotState], multiuser: bool) -> SlotChoice:
    """Pick a KV slot for a prompt (§4.10 "Slot assignment").

    Default: the free slot with the longest common prefix (ties: the first; 0 shared inputs still qualifies).
    multiuser: the slot with the longest prefix over all slots, if that prefix is its whole history and it is
    free; otherwise the least-recently-used free slot, forked from the best slot when they share a prefix.
    A fully cached prompt re-evaluates its last input, since its logits are needed. Whether the cache can
    resume at n_past (sliding window) is the caller's check.

    Raises:
        SlotUnavailableError: no free slot.
    """
    free = [s for s in slots if not s.in_use]
    if not free:
        raise SlotUnavailableError("no available cache slots")
    fork_from: int | None = None
    n_fork = 0
    if not multiuser:
        best = max(free, key=lambda s: common_prefix_len(s.inputs, prompt))  # max keeps the first of equals
        chosen, n_past = best.id, common_prefix_len(best.inputs, prompt)
    else:
        lengths = [common_prefix_len(s.inputs, prompt) for s in slots]
        i_best = max(range(len(slots)), key=lambda i: lengths[i])
        best, longest = slots[i_best], lengths[i_best]
        if longest == len(best.inputs) and not best.in_use:
            chosen, n_past = best.id, longest
        else:
            oldest = min(free, key=lambda s: s.last_used)
            chosen, n_past = oldest.id, longest
            if longest > 0 and oldest.id != best.id:
                fork_from, n_fork = best.id, longest
    if n_past == len(prompt):
        n_past = max(n_past - 1, 0)
    return SlotChoice(slot=chosen, n_past=n_past, fork_from=fork_from, n_fork=n_fork)
