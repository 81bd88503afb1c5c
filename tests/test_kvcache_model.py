"""The caches under real models on ggml: computes that produce no output (a prompt split over several forwards;
the cache's own defrag and shift graphs) need no special-casing; a context shift gives what a fresh evaluation
gives (one-layer random llama) and, in the middle of greedy decoding with SmolLM2 (when present), keeps the
sequence's positions contiguous."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fake_backend import GgmlTestBackend
from ggml.backend import load_backend
from ggml.runtime import RuntimeOptions
from kvcache.causal import CausalCache
from ml.batch import Batch
from ml.dtype import DType
from models import load_model
from tiny_gguf import llama_spec, write_gguf


class Runner:
    """A model, its backend and helpers to run batches the way runner/engine.py does."""

    def __init__(self, backend: Any, model: Any) -> None:
        self.backend, self.model = backend, model
        self.n_vocab = int(model.params.n_vocab)

    def cache(self, dtype: DType = DType.F32, max_sequences: int = 2, capacity: int = 512,
              max_batch: int = 64) -> Any:
        c = self.model.new_cache()
        c.init(self.backend, dtype, max_sequences, capacity, max_batch)
        return c

    def forward(self, cache: Any, batch: Batch, *, no_tensors: bool = False) -> np.ndarray:
        """Logits (n_outputs, n_vocab). The engine's pattern: compute the logits tensor even when the batch wants
        none (it then has zero columns); with no_tensors, ctx.compute() is called with nothing."""
        ctx = self.backend.new_context()
        try:
            out = self.model.forward(ctx, batch, cache)
            if no_tensors:
                ctx.compute()
                return np.zeros((0, self.n_vocab))
            ctx.forward(out).compute(out)
            return np.array(out.numpy(), dtype=np.float64).reshape(-1, self.n_vocab)
        finally:
            ctx.close()


def seq_batch(tokens: list[int], start: int, seq: int, outputs: bool = True) -> Batch:
    b = Batch.single(tokens, start, seq)
    return b if outputs else Batch(b.tokens, b.positions, b.seqs, np.zeros(0, np.int32))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    path = tmp_path_factory.mktemp("kvcache") / "llama.gguf"
    write_gguf(path, llama_spec(n_layer=3), seed=11)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        yield Runner(backend, load_model(backend, strict=True))
    finally:
        backend.close()


PROMPT = [(7 * i + 3) % 60 + 2 for i in range(23)]


# ---------------------------------------------------------------- computes with no output


def test_compute_with_no_tensors() -> None:
    backend = GgmlTestBackend()
    try:
        ctx = backend.new_context()
        ctx.compute()  # an empty graph
        ctx.close()
        store = backend.new_context()
        rows = store.zeros(DType.F16, 4, 3)
        ctx = backend.new_context()
        src = ctx.from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4))
        ctx.forward(rows.set_rows(ctx, src, ctx.from_numpy(np.array([2, 0], np.int64)))).compute()
        ctx.close()
        np.testing.assert_array_equal(rows.numpy(), [[4, 5, 6, 7], [0, 0, 0, 0], [0, 1, 2, 3]])
        store.close()
    finally:
        backend.close()


@pytest.mark.parametrize("no_tensors", [False, True], ids=["zero-width-logits", "compute-nothing"])
def test_prompt_over_several_forwards(tiny: Runner, no_tensors: bool) -> None:
    """A prompt longer than the batch: the first forwards want no logits, only their K/V."""
    whole = tiny.cache()
    want = tiny.forward(whole, seq_batch(PROMPT, 0, 0))
    split = tiny.cache()
    for start in range(0, 20, 5):
        got = tiny.forward(split, seq_batch(PROMPT[start:start + 5], start, 0, outputs=False), no_tensors=no_tensors)
        assert got.shape == (0, tiny.n_vocab)
    got = tiny.forward(split, seq_batch(PROMPT[20:], 20, 0))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert split.cells.seq_positions(0).tolist() == list(range(len(PROMPT)))


def test_defrag_inside_a_forward(tiny: Runner) -> None:
    """Holes left by a finished sequence are compacted by start_forward (its own graph, no output) and the
    continuing sequence's logits do not change."""
    alone = tiny.cache()
    want = [tiny.forward(alone, seq_batch(PROMPT[:12], 0, 0))]
    cache: CausalCache = tiny.cache()
    cache.defrag_holes = 4
    tiny.forward(cache, seq_batch(PROMPT[12:], 0, 1, outputs=False))  # another sequence first: cells 0..10
    got = [tiny.forward(cache, seq_batch(PROMPT[:12], 0, 0))]  # cells 11..22
    cache.remove(1, 0, None)
    assert cache.cells.extent - cache.cells.n_used == 11
    for p in range(12, 15):
        tok = int(np.argmax(want[-1][-1]))
        want.append(tiny.forward(alone, seq_batch([tok], p, 0)))
        got.append(tiny.forward(cache, seq_batch([tok], p, 0)))
    assert cache.n_defrags == 1 and cache.cells.extent == cache.cells.n_used == 15
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    path = tmp_path_factory.mktemp("kvcache") / "llama1.gguf"
    write_gguf(path, llama_spec(n_layer=1), seed=12)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        yield Runner(backend, load_model(backend, strict=True))
    finally:
        backend.close()


@pytest.mark.parametrize("dtype,tol", [(DType.F32, 1e-4), (DType.F16, 5e-3)], ids=["F32", "F16"])
def test_context_shift_equals_fresh_evaluation(one_layer: Runner, dtype: DType, tol: float) -> None:
    """With one layer, cached K/V depend on their token and position only, so after a shift (keys re-rotated
    through the model's own shift function) the next tokens see what a fresh evaluation of the remaining tokens
    gives. (With more layers they would not: later layers' K/V carry the discarded context.)"""
    tiny = one_layer
    keep, discard = 4, 9
    cache = tiny.cache(dtype)
    tiny.forward(cache, seq_batch(PROMPT[:20], 0, 0))
    cache.remove(0, keep, keep + discard)
    assert cache.cells.seq_positions(0).tolist() == list(range(20 - discard))
    rest = PROMPT[:keep] + PROMPT[keep + discard:20]
    got = tiny.forward(cache, seq_batch(PROMPT[20:], len(rest), 0))
    fresh = tiny.cache(dtype)
    want = tiny.forward(fresh, seq_batch(rest + PROMPT[20:], 0, 0))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    unshifted = tiny.cache(dtype)  # guard: the same tokens at their old positions predict something else
    tiny.forward(unshifted, seq_batch(PROMPT[:keep], 0, 0, outputs=False))
    tiny.forward(unshifted, seq_batch(PROMPT[keep + discard:20], keep + discard, 0, outputs=False))
    other = tiny.forward(unshifted, seq_batch(PROMPT[20:], len(rest), 0))
    assert np.max(np.abs(other - want)) > 10 * tol


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Iterator[Runner]:
    backend = load_backend(smollm2_path, RuntimeOptions(threads=2))
    try:
        yield Runner(backend, load_model(backend))
    finally:
        backend.close()


@pytest.mark.slow
def test_smollm2_context_shift_during_greedy_decoding(smollm2: Runner) -> None:
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
              8182, 2, 198, 1, 4093, 198, 21575, 549, 253, 1345, 2376, 563, 260, 4578, 30, 2, 198]
    n_ctx, keep = 48, 5
    cache = smollm2.cache(DType.F16, max_sequences=1, capacity=n_ctx, max_batch=64)
    logits = smollm2.forward(cache, seq_batch(prompt, 0, 0))
    tokens, pos, shifts = list(prompt), len(prompt), 0
    for _ in range(30):
        tok = int(np.argmax(logits[-1]))
        assert 0 <= tok < smollm2.n_vocab
        if pos == n_ctx:  # the runner's context shift: keep the first tokens, drop half of the rest
            discard = (pos - keep) // 2
            cache.remove(0, keep, keep + discard)
            tokens = tokens[:keep] + tokens[keep + discard:]
            pos -= discard
            shifts += 1
            assert cache.cells.seq_positions(0).tolist() == list(range(pos))
        logits = smollm2.forward(cache, seq_batch([tok], pos, 0))
        assert np.all(np.isfinite(logits))
        tokens.append(tok)
        pos += 1
        assert cache.cells.seq_positions(0).tolist() == list(range(pos))
    assert shifts >= 1
