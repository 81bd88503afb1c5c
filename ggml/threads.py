"""How many CPU threads the next graph gets: measured, not guessed.

ggml's worker threads meet at a spinning barrier after every op (~1000 per decode step). When another process
takes a core, a thread that reached the barrier spins through its time slice while the one it waits for is not
running: with 2 threads on 2 busy cores a decode step gets several times slower, slower than 1 thread (which has no
barrier). No load figure predicts this well, so the governor tries: while the same graph runs again step after step
(decode with graph reuse, so the timings compare like with like), it now and then runs a few steps with the
neighbouring thread count and keeps whichever is faster. A trial that is clearly slower ends after one step, and
trials back off (16, 32, ... 256 steps apart) while they keep losing, so a quiet machine pays well under 1% for
them.

The thread count never changes results: the batch-invariant kernels split work by output rows, each row computed
by one thread the same way (tests/test_thread_policy.py).
"""
from __future__ import annotations

import statistics


class ThreadGovernor:
    """Picks a thread count per compute from `max_threads` down by halves. Pure bookkeeping: the runtime applies
    the count (`threads`) and reports the time each comparable compute took (`observe`)."""

    def __init__(self, max_threads: int, *, explore_every: int = 16, max_explore_every: int = 256,
                 trial_steps: int = 3, margin: float = 0.85) -> None:
        ladder = [max(1, max_threads)]
        while ladder[-1] > 1:
            ladder.append(ladder[-1] // 2)
        self.ladder = ladder
        self.current = ladder[0]
        self.explore_every = explore_every
        self.max_explore_every = max_explore_every
        self.trial_steps = trial_steps
        self.margin = margin
        self._interval = explore_every
        self._countdown = 3  # the first trial comes early: a contended start should not last 16 slow steps
        self._graph: object | None = None
        self._samples: list[float] = []  # seconds per compute at `current`, this graph
        self._trial: int | None = None
        self._trial_samples: list[float] = []
        self._up_next = False  # alternate trials below and above the current count
        self.n_switches = 0

    def threads(self, graph: object | None) -> int:
        """Threads for the next compute; `graph` names the graph when its timing compares with the last ones
        (the same graph run again), else None (nothing is tried then)."""
        if graph is None or len(self.ladder) == 1:
            return self.current
        if graph is not self._graph:
            self._graph = graph
            self._samples, self._trial, self._trial_samples = [], None, []
        if self._trial is None and self._countdown <= 0 and len(self._samples) >= 3:
            self._trial = self._neighbour()
        return self._trial if self._trial is not None else self.current

    def observe(self, graph: object | None, threads: int, seconds: float) -> None:
        """A compute of `graph` with `threads` took `seconds` (ignored unless it is the graph `threads` named)."""
        if graph is None or graph is not self._graph:
            return
        if self._trial is not None and threads == self._trial:
            self._trial_samples.append(seconds)
            # A clear loss ends the trial at once: under contention a trial of more threads costs several steps.
            if (len(self._trial_samples) >= self.trial_steps
                    or seconds * self.margin > statistics.median(self._samples)):
                self._decide()
        elif threads == self.current:
            self._samples = (self._samples + [seconds])[-8:]
            self._countdown -= 1

    def _neighbour(self) -> int:
        i = self.ladder.index(self.current)
        lower = self.ladder[i + 1] if i + 1 < len(self.ladder) else None
        higher = self.ladder[i - 1] if i > 0 else None
        self._up_next = not self._up_next
        if higher is not None and (self._up_next or lower is None):
            return higher
        assert lower is not None
        return lower

    def _decide(self) -> None:
        assert self._trial is not None
        if min(self._trial_samples) < self.margin * statistics.median(self._samples):
            self.current = self._trial
            self._samples = self._trial_samples[-8:]
            self._interval = self.explore_every
            self.n_switches += 1
        else:
            self._interval = min(self._interval * 2, self.max_explore_every)
        self._countdown = self._interval
        self._trial, self._trial_samples = None, []
