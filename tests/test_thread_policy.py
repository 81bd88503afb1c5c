"""The thread governor: switches to fewer threads when they are faster, back when that changes, backs off its trials
while they lose; and the thread count it picks never changes a logit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
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


def test_thread_count_does_not_change_logits(smollm2_path: Path) -> None:
    """The same steps with 1 and 2 threads, and with the governor forced to switch every few steps, give the
    same logits bit for bit (per-row kernels: a row is computed by one thread whatever the count)."""
    results = []
    for threads, switch in ((1, False), (2, False), (2, True)):
        backend = load_backend(smollm2_path, RuntimeOptions(threads=threads))
        try:
            model = load_model(backend)
            cache = model.new_cache(flash=True)
            cache.init(backend, DType.F16, 1, 512, 512)
            runner = ForwardRunner(backend, model, cache)
            gov = backend.runtime.governor
            if switch:  # a governor that tries the other count every other step and always switches
                assert gov is not None
                gov.explore_every, gov.trial_steps, gov.margin = 1, 1, 1e9
                gov._interval = gov._countdown = 1
            g = np.random.default_rng(5)
            prompt = [int(t) for t in g.integers(300, 30000, 40)]
            out = [runner.logits(Batch.single(prompt))]
            tok = int(np.argmax(out[-1][0]))
            used = set()
            for i in range(12):
                out.append(runner.logits(Batch.single([tok], start=40 + i)))
                used.add(backend.runtime.threads_now)
                tok = int(np.argmax(out[-1][0]))
            if switch:
                assert used == {1, 2} and gov is not None and gov.n_switches >= 2
            results.append(np.stack([o[0] for o in out]))
            runner.close()
            cache.close()
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
