"""A kept graph run again with refreshed inputs gives the logits of a freshly built graph, bit for bit.

Two ForwardRunners over two caches of the same model take the same steps: one builds every graph, the other keeps
the last one and only refreshes its inputs. The steps cover what makes a kept graph stale: the attended cell range
growing past a 256-cell boundary, a sequence leaving (fewer tokens per step), a sequence joining with its prompt
next to a decoding one (a mixed step), and a defrag between steps (another graph takes the scheduler's buffers).
The second runner must actually reuse (else the comparison proves nothing) and rebuild at each of those points.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ggml.backend import load_backend
from ggml.tensor import GgmlTensor
from ggml.runtime import RuntimeOptions
from ml.batch import Batch
from ml.dtype import DType
from ml.errors import GgmlError
from models import load_model
from runner.forward import ForwardRunner


def _tokens(n_vocab: int, n: int, seed: int) -> list[int]:
    g = np.random.default_rng(seed)
    return [int(t) for t in g.integers(300, min(n_vocab, 30000) - 300, n)]


def _batch(parts: list[tuple[list[int], int, int]]) -> Batch:
    """(tokens, start position, sequence) parts; logits of each part's last token."""
    toks: list[int] = []
    pos: list[int] = []
    seqs: list[int] = []
    outs: list[int] = []
    for tokens, start, seq in parts:
        toks += tokens
        pos += range(start, start + len(tokens))
        seqs += [seq] * len(tokens)
        outs.append(len(toks) - 1)
    return Batch(np.array(toks, np.int32), np.array(pos, np.int32), np.array(seqs, np.int32),
                 np.array(outs, np.int32))


class Twin:
    """One model loaded twice (a scheduler each: computing one graph drops the other's allocation), two caches:
    `fresh` builds every graph, `kept` reuses."""

    def __init__(self, path: Path) -> None:
        self.backends = [load_backend(path, RuntimeOptions(threads=1)) for _ in range(2)]
        models = [load_model(b) for b in self.backends]
        self.n_vocab = int(models[0].params.n_vocab)
        self.caches = []
        for b, m in zip(self.backends, models):
            c = m.new_cache(flash=True)
            c.init(b, DType.F16, 4, 1024, 512)
            self.caches.append(c)
        self.fresh = ForwardRunner(self.backends[0], models[0], self.caches[0], reuse=False)
        self.kept = ForwardRunner(self.backends[1], models[1], self.caches[1])
        assert self.kept.reuse and not self.fresh.reuse
        self.n_steps = 0
        self.views = True  # whether copy=False on a kept graph gives a view (its output is in host memory)

    def step(self, parts: list[tuple[list[int], int, int]]) -> list[int]:
        """Both runners take the step (separate Batch objects); logits must match bit for bit. Greedy tokens."""
        a = self.fresh.logits(_batch(parts))
        copy = self.n_steps % 2 == 0  # every other step the batch loop's way: a view, no copy
        reused = self.kept.n_reused
        b = self.kept.logits(_batch(parts), copy=copy)
        viewed = not copy and self.kept.n_reused > reused and self.views  # a view of a kept graph's output
        assert b.flags.writeable != viewed
        assert a.shape == b.shape == (len(parts), self.n_vocab)
        assert np.all(np.isfinite(a))
        diff = float(np.abs(a - b).max())
        assert np.array_equal(a, b), f"step {self.n_steps}: kept graph's logits differ by up to {diff:.3g}"
        self.n_steps += 1
        return [int(t) for t in np.argmax(a, axis=1)]

    def remove(self, seq: int) -> None:
        for c in self.caches:
            c.remove(seq, 0, None)

    def defrag(self) -> list[bool]:
        """Compact each cache (a wrapper's members one by one); whether anything moved, per cache."""
        return [any([m.defrag() for m in getattr(c, "caches", [c])]) for c in self.caches]

    def close(self) -> None:
        self.fresh.close()
        self.kept.close()
        for c in self.caches:
            c.close()
        for b in self.backends:
            b.close()


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_kept_graph_matches_fresh_graph(model: str, request: pytest.FixtureRequest) -> None:
    t = Twin(request.getfixturevalue(f"{model}_path"))
    try:
        p0, p1, p2 = (_tokens(t.n_vocab, n, seed) for n, seed in ((200, 0), (40, 1), (30, 2)))
        last = t.step([(p0, 0, 0), (p1, 0, 1)])
        n0, n1 = len(p0), len(p1)
        built = t.kept.n_built
        for _ in range(24):  # 240 cells + 2 per step: crosses 256 after 8 steps
            last = t.step([([last[0]], n0, 0), ([last[1]], n1, 1)])
            n0, n1 = n0 + 1, n1 + 1
        assert t.kept.n_built == built + 2, "a new graph for the first decode step and at the 256-cell boundary"
        assert t.kept.n_reused == 22

        t.remove(1)  # sequence 1 leaves
        built, reused = t.kept.n_built, t.kept.n_reused
        for _ in range(6):
            last = t.step([([last[0]], n0, 0)])
            n0 += 1
        assert (t.kept.n_built, t.kept.n_reused) == (built + 1, reused + 5)

        assert t.defrag() == [True, True]  # computes its own graph: the kept one is stale
        built = t.kept.n_built
        last = t.step([([last[0]], n0, 0)])
        n0 += 1
        assert t.kept.n_built == built + 1

        # Sequence 2 joins: its prompt next to sequence 0's decode step, then both decode.
        first = t.step([([last[0]], n0, 0), (p2, 0, 2)])
        n0, n2 = n0 + 1, len(p2)
        last = [first[0], first[1]]
        built, reused = t.kept.n_built, t.kept.n_reused
        for _ in range(8):
            last = t.step([([last[0]], n0, 0), ([last[1]], n2, 2)])
            n0, n2 = n0 + 1, n2 + 1
        assert (t.kept.n_built, t.kept.n_reused) == (built + 1, reused + 7)
    finally:
        t.close()


def test_a_view_of_the_logits_lasts_until_the_next_forward(smollm2_path: Path) -> None:
    """copy=False hands out the kept graph's output memory itself (read-only): the next step overwrites it, while a
    copy keeps its values."""
    backend = load_backend(smollm2_path, RuntimeOptions(threads=1))
    model = load_model(backend)
    cache = model.new_cache(flash=True)
    cache.init(backend, DType.F16, 1, 256, 64)
    runner = ForwardRunner(backend, model, cache)
    try:
        prompt = _tokens(int(model.params.n_vocab), 20, 4)
        runner.logits(_batch([(prompt, 0, 0)]))
        runner.logits(_batch([([5], 20, 0)]))  # builds the decode graph
        copied = runner.logits(_batch([([6], 21, 0)]))
        kept = copied.copy()
        view = runner.logits(_batch([([7], 22, 0)]), copy=False)
        assert not view.flags.writeable and np.array_equal(copied, kept)
        before = view.copy()
        again = runner.logits(_batch([([8], 23, 0)]), copy=False)
        assert np.shares_memory(view, again)
        assert not np.array_equal(view, before) and np.array_equal(view, again)  # overwritten in place
        assert np.array_equal(copied, kept)
    finally:
        runner.close()
        cache.close()
        backend.close()


def test_an_output_that_cannot_be_viewed_is_copied(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the output is not in host memory (a GPU's), copy=False falls back to copying it out, with the same
    values as a graph built afresh."""
    def not_host(self: GgmlTensor) -> None:
        raise GgmlError("not host memory")
    monkeypatch.setattr(GgmlTensor, "host_view", not_host)
    t = Twin(smollm2_path)
    t.views = False
    try:
        prompt = _tokens(t.n_vocab, 12, 9)
        last = t.step([(prompt, 0, 0)])
        for i in range(4):  # the Twin alternates copy=True and copy=False on the kept runner
            last = t.step([([last[0]], 12 + i, 0)])
        assert t.kept.n_reused == 3
    finally:
        t.close()
