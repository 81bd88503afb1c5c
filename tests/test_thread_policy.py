"""The thread governor: switches to fewer threads when they are faster, back when that changes, backs off its trials
while they lose; and the thread count it picks never changes a logit."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from ggml.backend import load_backend
from ggml.runtime import RuntimeOptions
from ggml.threads import ThreadGovernor
from ml.batch import Batch
from ml.dtype import DType
from models import load_model
from runner.forward import ForwardRunner


def _drive(gov: ThreadGovernor, graph: object, cost: dict[int, float], steps: int) -> list[int]:
    """`steps` computes of one graph whose time depends on the thread count only; the counts used."""
    used = []
    for _ in range(steps):
        n = gov.threads(graph)
        gov.observe(graph, n, cost[n])
        used.append(n)
    return used


def test_switches_to_the_faster_count_and_back() -> None:
    gov = ThreadGovernor(2, explore_every=4, trial_steps=2)
    assert gov.ladder == [2, 1]
    g = object()
    used = _drive(gov, g, {2: 0.050, 1: 0.012}, 20)  # contended: 2 threads 4x slower than 1
    assert used[:4] == [2, 2, 2, 1] and gov.current == 1 and gov.n_switches == 1  # first trial after 3 steps
    used = _drive(gov, g, {2: 0.007, 1: 0.012}, 40)  # quiet again
    assert gov.current == 2 and gov.n_switches == 2


def test_losing_trials_back_off() -> None:
    gov = ThreadGovernor(2, explore_every=4, max_explore_every=32, trial_steps=2)
    used = _drive(gov, object(), {2: 0.007, 1: 0.012}, 400)
    assert gov.current == 2 and gov.n_switches == 0
    trials = sum(1 for n in used if n == 1)
    # trials every 4, 8, 16, then 32 steps: about 2 * (3 + 400 / 32) steps at one thread, not 2 * 400 / 4
    assert 0 < trials <= 2 * (3 + 400 // 32 + 1)



def test_stalls_now_and_then_count() -> None:
    """Contention makes most two-thread steps a little slower and one in five very slow: the median barely moves,
    the mean triples; one thread (steady 7 ms) is faster on average, and the governor takes it."""
    gov = ThreadGovernor(2, explore_every=4, trial_steps=2)
    g = object()
    for i in range(40):
        n = gov.threads(g)
        gov.observe(g, n, 0.007 if n == 1 else (0.080 if i % 5 == 4 else 0.0085))
    assert gov.current == 1


def test_a_change_of_load_brings_the_next_trial_forward() -> None:
    """After many lost trials the back-off has reached its longest interval; when stalls start, the next trial
    comes within a window of steps, not hundreds of steps later."""
    gov = ThreadGovernor(2, explore_every=4, max_explore_every=256, trial_steps=2)
    g = object()
    _drive(gov, g, {2: 0.004, 1: 0.007}, 600)  # quiet: one thread always loses
    assert gov.current == 2 and gov._interval == 256
    used = []
    for i in range(40):  # a competing process starts: a stall every third step at two threads
        n = gov.threads(g)
        gov.observe(g, n, 0.007 if n == 1 else (0.100 if i % 3 == 2 else 0.005))
        used.append(n)
    assert gov.current == 1 and used.index(1) < 2 * ThreadGovernor.WINDOW, used


def test_a_step_whose_thread_waited_for_a_core_brings_the_next_trial() -> None:
    """Long backed off on a quiet machine, the governor sees one step in which the calling thread ran for half the
    wall time (another process took its core): the very next step tries one thread, which wins. A step that ran
    throughout, however slow, brings nothing forward."""
    gov = ThreadGovernor(2, explore_every=4, max_explore_every=256, trial_steps=2)
    g = object()
    _drive(gov, g, {2: 0.004, 1: 0.007}, 600)
    assert gov.current == 2 and gov._interval == 256 and gov._countdown > 10
    n = gov.threads(g)
    gov.observe(g, n, 0.009, cpu=0.0089)  # slower, but the thread ran throughout: no evidence of contention
    assert gov.threads(g) == 2
    gov.observe(g, 2, 0.004, cpu=0.004)
    gov.observe(g, gov.threads(g), 0.060, cpu=0.030)  # a stall: it waited for a core half of the step
    assert gov.threads(g) == 1
    for _ in range(3):
        n = gov.threads(g)
        gov.observe(g, n, 0.007 if n == 1 else 0.060, cpu=0.007 if n == 1 else 0.030)
    assert gov.current == 1 and gov.n_switches == 1


def test_the_count_taken_under_contention_is_left_soon_after_it_ends() -> None:
    """Long contention keeps the governor at one thread, its boxed trials of two spaced no more than 64 steps apart
    (each lost at its first step); when the machine is quiet again it is back at two threads within about that many
    steps, not the 256 of the back-off on a quiet machine."""
    gov = ThreadGovernor(2)
    g = object()
    cost = {2: 0.050, 1: 0.012}
    used = []
    while len(used) < 2000 or used[-1] != 2:  # until just after a lost trial: the longest wait for the next one
        n = gov.threads(g)
        box = gov.budget(n)
        seconds = cost[n] if box is None else min(cost[n], box * 1.01)
        gov.observe(g, n, seconds, finished=box is None or cost[n] <= box)
        used.append(n)
    assert gov.current == 1
    trials = sum(1 for n in used[1000:] if n == 2)
    assert 0 < trials <= 1000 // 64 + 1, trials
    cost = {2: 0.007, 1: 0.012}
    steps = 0
    while gov.current == 1:
        n = gov.threads(g)
        box = gov.budget(n)
        gov.observe(g, n, cost[n], finished=box is None or cost[n] <= box)
        steps += 1
        assert steps <= 64 + 2 * ThreadGovernor.WINDOW


def test_a_noisy_neighbour_does_not_keep_the_governor_at_fewer_threads() -> None:
    """After a false move to one thread, two threads are faster on average even though every fourth step is slowed
    by a third (6.7 ms, and 9 ms, against one thread's 10 ms): the next trial of two threads wins. Judged by its
    slowest step, as before, it lost every time."""
    gov = ThreadGovernor(2, explore_every=4, trial_steps=2)
    gov.current = 1
    g = object()
    steps = {1: 0, 2: 0}
    for _ in range(60):
        n = gov.threads(g)
        steps[n] += 1
        seconds = 0.010 if n == 1 else (0.009 if steps[2] % 4 == 0 else 0.0067)
        box = gov.budget(n)
        gov.observe(g, n, seconds, finished=box is None or seconds <= box)
    assert gov.current == 2 and gov.n_switches == 1


def test_the_first_step_at_fewer_threads_does_not_end_the_trial() -> None:
    """Measured under contention: two threads take ~11.5 ms a step; the first step after dropping to one takes
    13.6 ms, the next ones 7 ms. The first trial keeps going past that first step and switches."""
    gov = ThreadGovernor(2, explore_every=4)
    g = object()
    at_one = 0
    for _ in range(12):
        n = gov.threads(g)
        at_one = at_one + 1 if n == 1 else 0
        gov.observe(g, n, 0.0112 if n == 2 else (0.0136 if at_one == 1 else 0.007))
    assert gov.current == 1 and gov.n_switches == 1


def test_only_trials_of_more_threads_get_a_time_box() -> None:
    gov = ThreadGovernor(2, explore_every=4, trial_steps=2)
    g = object()
    seen = []
    for _ in range(60):
        n = gov.threads(g)
        seen.append((n, gov.current, gov.budget(n)))
        gov.observe(g, n, 0.007 if n == 1 else 0.020)
    assert gov.current == 1
    boxed = [(n, cur, b) for n, cur, b in seen if b is not None]
    assert boxed and all(n == 2 and cur == 1 for n, cur, _ in boxed)
    assert all(b == pytest.approx(0.007) for _, _, b in boxed)  # a step slower than the current mean loses outright
    assert all(b is None for n, cur, b in seen if n <= cur)


def test_other_graphs_are_not_compared() -> None:
    gov = ThreadGovernor(4, explore_every=2, trial_steps=2)
    assert gov.ladder == [4, 2, 1]
    for _ in range(50):  # a new graph every step (nothing repeats): nothing to compare, nothing tried
        g = object()
        n = gov.threads(g)
        gov.observe(g, n, 0.01)
        assert n == 4
    assert gov.threads(None) == 4


def test_single_thread_has_nothing_to_try() -> None:
    gov = ThreadGovernor(1)
    g = object()
    assert _drive(gov, g, {1: 0.01}, 50) == [1] * 50


def _greedy_logits(backend: Any, seed: int, n_steps: int,
                   each_step: Callable[[], None] = lambda: None) -> npt.NDArray[np.float32]:
    """SmolLM2 through a ForwardRunner: a 40-token random prompt, then `n_steps` greedy decode steps (each_step
    after each); the logits of every forward, stacked."""
    model = load_model(backend)
    cache = model.new_cache(flash=True)
    cache.init(backend, DType.F16, 1, 512, 512)
    runner = ForwardRunner(backend, model, cache)
    try:
        prompt = [int(t) for t in np.random.default_rng(seed).integers(300, 30000, 40)]
        out = [runner.logits(Batch.single(prompt))]
        for i in range(n_steps):
            out.append(runner.logits(Batch.single([int(np.argmax(out[-1][0]))], start=40 + i)))
            each_step()
        return np.stack([o[0] for o in out])
    finally:
        runner.close()
        cache.close()


def test_thread_count_does_not_change_logits(smollm2_path: Path) -> None:
    """The same steps with 1 and 2 threads, and with the governor forced to switch every few steps, give the
    same logits bit for bit (per-row kernels: a row is computed by one thread whatever the count)."""
    results = []
    for threads, switch in ((1, False), (2, False), (2, True)):
        backend = load_backend(smollm2_path, RuntimeOptions(threads=threads))
        try:
            gov = backend.runtime.governor
            if switch:  # a governor that tries the other count every other step and always switches
                assert gov is not None
                gov.explore_every, gov.trial_steps, gov.margin = 1, 1, 1e9
                gov._interval = gov._countdown = 1
                gov.budget = lambda threads: None  # type: ignore[method-assign]  # no time box: trials finish
            used: set[int] = set()
            # 20 steps: a trial of more threads lasts a window (8 steps)
            results.append(_greedy_logits(backend, 5, 20, lambda: used.add(backend.runtime.threads_now)))
            if switch:
                assert used == {1, 2} and gov is not None and gov.n_switches >= 2
        finally:
            backend.close()
    for r in results[1:]:
        assert np.array_equal(r, results[0])


@pytest.mark.parametrize("threads", [1, 2])
def test_governor_only_with_several_threads(threads: int, smollm2_path: Path) -> None:
    backend = load_backend(smollm2_path, RuntimeOptions(threads=threads))
    try:
        assert (backend.runtime.governor is not None) == (threads > 1)
    finally:
        backend.close()


def test_a_stopped_trial_is_computed_again_to_the_same_logits(smollm2_path: Path) -> None:
    """A governor at one thread that tries two on every step, under a time box too short for the first op: ggml
    stops each trial and the runtime computes the graph again with one thread. The logits equal those of plain
    one-thread computes bit for bit (a stopped graph leaves nothing that the redo reads before rewriting it)."""
    results, stopped = [], []
    for boxed in (False, True):
        backend = load_backend(smollm2_path, RuntimeOptions(threads=2))
        try:
            gov = backend.runtime.governor
            assert gov is not None
            gov.current = 1
            if boxed:  # a trial of two threads on every step, each given a time box of ~1e-15 s
                gov.explore_every = gov.max_explore_every = gov.trial_steps = 1
                gov._interval = gov._countdown = 1
                box = gov.budget
                gov.budget = lambda threads: None if box(threads) is None else 1e-15  # type: ignore[method-assign]
            else:  # never a trial (one rung: not even a burst of stalls on a busy machine brings one)
                gov.ladder = [1]
            outcomes: list[bool] = []
            observe = gov.observe

            def counted(graph: object | None, threads: int, seconds: float, finished: bool = True,
                        cpu: float | None = None) -> None:
                outcomes.append(finished)
                observe(graph, threads, seconds, finished, cpu)
            gov.observe = counted  # type: ignore[method-assign]
            results.append(_greedy_logits(backend, 7, 12))
            stopped.append(outcomes.count(False))
            assert gov.current == 1 and backend.runtime.threads_now == 1
        finally:
            backend.close()
    assert stopped[0] == 0 and stopped[1] >= 6, stopped  # trials come once 3 steps have set the pace
    assert np.array_equal(results[1], results[0])
