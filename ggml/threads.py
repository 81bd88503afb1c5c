"""How many CPU threads the next graph gets: measured, not guessed.

ggml's worker threads meet at a spinning barrier after every op (~1000 per decode step). When another process
takes a core, a thread that reached the barrier spins through its time slice while the one it waits for is not
running: with 2 threads on 2 busy cores a decode step gets several times slower, slower than 1 thread (which has no
barrier). No load figure predicts this well, so the governor tries: while the same graph runs again step after step
(decode with graph reuse, so the timings compare like with like), it now and then runs a few steps with the
neighbouring thread count and keeps whichever is faster. A trial that is clearly slower ends after one step, and
trials back off (16, 32, ... 256 steps apart) while they keep losing, so a quiet machine pays well under 1% for
them. Below the most threads the back-off stops at 64 steps: that count was taken under contention, and when the
contention ends the governor should be back within about 64 steps.

Contention shows first in the calling thread's CPU time: it is one of the compute's threads, and on a quiet machine
it computes or spins at the barriers for the whole step. A step through much of which it waited for a core
(measured: CPU time 50-60% of the wall time in the stalled steps under one busy process, 100% quiet) brings the next
trial at once.

Two things keep contention from costing much before the governor adapts. A trial of more threads runs under a
time box (`budget`): once it has taken longer than the current count's mean step, ggml stops it after the
current op and the runtime computes the graph again with the current count, so such a trial on a contended
machine (one step can take 20 times a normal one there) costs about two steps. And two or more stalled steps among
the last eight (a process has just started competing) bring the next trial forward, whatever the back-off had
reached.

The thread count never changes results: the batch-invariant kernels split work by output rows, each row computed
by one thread the same way (tests/test_thread_policy.py).
"""
from __future__ import annotations

import math


class ThreadGovernor:
    """Picks a thread count per compute from `max_threads` down by halves. Pure bookkeeping: the runtime applies
    the count (`threads`) and reports the time each comparable compute took (`observe`)."""

    WINDOW = 8  # recent steps at the current count that a trial is compared with
    # Below the most threads, trials of more come at least this often: the count was taken under contention, which
    # ends; while it lasts each such trial costs about two steps (the time box), once it ends the next one wins.
    MAX_EVERY_BELOW_TOP = 64
    DESCHEDULED = 0.7  # a step whose compute thread ran less than this share of it was contended (see observe)

    def __init__(self, max_threads: int, *, explore_every: int = 16, max_explore_every: int = 256,
                 trial_steps: int = 3, margin: float = 0.85, slow: float = 1.5) -> None:
        ladder = [max(1, max_threads)]
        while ladder[-1] > 1:
            ladder.append(ladder[-1] // 2)
        self.ladder = ladder
        self.current = ladder[0]
        self.explore_every = explore_every
        self.max_explore_every = max_explore_every
        self.trial_steps = trial_steps
        self.margin = margin
        self.slow = slow  # a step this many times the recent median is a stall (see _changed)
        self._fresh = 0  # steps at `current` since the last decision or change
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

    def budget(self, threads: int) -> float | None:
        """Seconds the next compute (with `threads`, as `threads()` just said) may take before it is stopped and
        redone with the current count: set for trials of more threads only (the ones contention makes many times
        slower), at the current count's mean step: a trial step slower than that loses the trial outright."""
        if self._trial is None or threads != self._trial or threads <= self.current or not self._samples:
            return None
        return _mean(self._samples)

    def observe(self, graph: object | None, threads: int, seconds: float, finished: bool = True,
                cpu: float | None = None) -> None:
        """A compute of `graph` with `threads` took `seconds` (ignored unless it is the graph `threads` named);
        not `finished`: its time box stopped it (a lost trial); `cpu`: the CPU seconds the calling thread (one of
        the compute's threads) got meanwhile, when known."""
        if graph is None or graph is not self._graph:
            return
        if self._trial is not None and threads == self._trial:
            self._trial_samples.append(seconds if finished else math.inf)
            # A trial of more threads lasts a whole window: each of its steps is boxed (a stall ends it at once, at
            # little cost), so it wins only if contention left none of them stalled and their mean is clearly
            # lower. A trial of fewer threads is short, and a clear loss ends it at once.
            up = self._trial > self.current
            # (not on its first step, which pays for the change: under contention, measured, the first step at one
            # thread can cost more than a contended two-thread step, and the next ones half as much)
            clear_loss = not up and len(self._trial_samples) > 1 and seconds * self.margin > _median(self._samples)
            if not finished or clear_loss or len(self._trial_samples) >= (self.WINDOW if up else self.trial_steps):
                self._decide()
        elif threads == self.current:
            self._samples = (self._samples + [seconds])[-self.WINDOW:]
            self._countdown -= 1
            self._fresh += 1
            # A compute thread that waited for a core through a good part of the step (its CPU time well under
            # the wall time; on a quiet machine it runs or spins throughout) says another process competes now,
            # whatever the back-off or the window say: the next step tries fewer threads.
            descheduled = self.current > 1 and cpu is not None and cpu < self.DESCHEDULED * seconds
            if descheduled or (self._fresh >= self.WINDOW and self._changed()):
                self._interval, self._countdown, self._fresh = self.explore_every, 0, 0

    def _changed(self) -> bool:
        """Whether the recent steps suggest the machine changed: two or more of the window's steps far slower than
        its median (a competing process makes a multi-threaded step stall now and then, not every time)."""
        typical = _median(self._samples)
        return sum(1 for x in self._samples if x > self.slow * typical) >= 2

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
        # Against the current count's mean (under contention the mean carries the occasional step that stalled many
        # times over, which is where the time goes; the median would hide it). Fewer threads win on their best step
        # (the first may pay for the change); more threads on their mean over a whole window, none of whose steps
        # may have been slower than the current mean (the time box). The asymmetry is on purpose: wrongly taking
        # fewer threads costs at most their ratio, wrongly taking more can cost 20 times a step. A step that a
        # noisy neighbour slows by a third does not sink a trial of more threads, so a false move to fewer threads
        # is undone at the next trial.
        assert self._trial is not None
        trial = _mean(self._trial_samples) if self._trial > self.current else min(self._trial_samples)
        if trial < self.margin * _mean(self._samples):
            self.current = self._trial
            self._samples = self._trial_samples[-self.WINDOW:]
            self._interval = self.explore_every
            self.n_switches += 1
        else:
            cap = (self.max_explore_every if self.current == self.ladder[0]
                   else min(self.max_explore_every, self.MAX_EVERY_BELOW_TOP))
            self._interval = min(self._interval * 2, cap)
        self._countdown = self._interval
        self._trial, self._trial_samples, self._fresh = None, [], 0


# Plain versions of statistics.fmean / median: the governor runs once per decode step, with the interpreter's caches
# cold from the graph compute, where the statistics module's generality costs tens of microseconds.
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
