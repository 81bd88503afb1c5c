"""A sequence's logits are bit-identical however it is batched: alone, token by token, next to other sequences,
after other sequences filled and left the cache. This is what makes `--parallel`, the batch size and other users
invisible in a greedy or seeded text (the runner's tests check the texts; these check the logits).

Two things make it hold (measured: every case but the last differs without the first, the last without the
second):
* the CPU kernels run batch-invariant (RuntimeOptions.fast_kernels off): ggml otherwise picks tiled attention for
  64+ query rows, KV-split attention for one query over 512+ cells, and GEMM vs GEMV kernels for repacked
  weights by the number of rows;
* each sequence's KV cells stay in position order (CellTable.ordered_free_cells): attention visits cells in
  index order, and a reordered sum differs in its last bits.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ggml.backend import load_backend
from ggml.runtime import RuntimeOptions
from ml.batch import Batch
from ml.dtype import DType
from models import load_model

N_PROMPT = 72  # 64+ rows: ggml's fast kernels would take their tiled attention path
CAPACITY = 1024


class Runner:
    def __init__(self, path: Path, fast_kernels: bool = False) -> None:
        self.backend = load_backend(path, RuntimeOptions(threads=1, fast_kernels=fast_kernels))
        self.model = load_model(self.backend)
        self.n_vocab = int(self.model.params.n_vocab)
        g = np.random.default_rng(3)
        lo, hi = 300, min(self.n_vocab, 30000) - 300  # ordinary tokens, away from the special ones
        self.prompt = [int(t) for t in g.integers(lo, hi, N_PROMPT)]
        self.other = [int(t) for t in g.integers(lo, hi, 300)]  # with the prompt: 512 cells attended

    def cache(self) -> Any:
        c = self.model.new_cache(flash=True)
        c.init(self.backend, DType.F16, 4, CAPACITY, 1024)
        return c

    def forward(self, cache: Any, parts: list[tuple[list[int], int, int]]) -> np.ndarray:
        """One forward of (tokens, start position, sequence) parts; the logits of the last token of each part."""
        toks, pos, seqs, outs = [], [], [], []
        for tokens, start, seq in parts:
            toks += tokens
            pos += range(start, start + len(tokens))
            seqs += [seq] * len(tokens)
            outs.append(len(toks) - 1)
        batch = Batch(np.array(toks, np.int32), np.array(pos, np.int32), np.array(seqs, np.int32),
                      np.array(outs, np.int32))
        ctx = self.backend.new_context()
        try:
            out = self.model.forward(ctx, batch, cache)
            ctx.forward(out).compute(out)
            return np.array(out.numpy()).reshape(len(parts), self.n_vocab)
        finally:
            ctx.close()

    def scenarios(self) -> dict[str, np.ndarray]:
        """The last prompt token's logits of sequence 0, computed in several ways."""
        p, n = self.prompt, N_PROMPT
        out: dict[str, np.ndarray] = {}
        c = self.cache()
        out["whole prompt alone"] = self.forward(c, [(p, 0, 0)])[0]
        c = self.cache()
        self.forward(c, [(p[:n - 8], 0, 0)])
        for i in range(n - 8, n - 1):
            self.forward(c, [(p[i:i + 1], i, 0)])
        out["token by token"] = self.forward(c, [(p[-1:], n - 1, 0)])[0]
        c = self.cache()
        self.forward(c, [(self.other[:40], 0, 1), (p[:n // 2], 0, 0)])
        out["chunks next to another sequence"] = self.forward(c, [(p[n // 2:], n // 2, 0), ([7, 8, 9], 40, 1)])[0]
        c = self.cache()
        self.forward(c, [(self.other, 0, 1)])
        self.forward(c, [(p[:-1], 0, 0)])
        out["one query over 512 cells"] = self.forward(c, [(p[-1:], n - 1, 0)])[0]
        c = self.cache()
        self.forward(c, [(self.other[:30], 0, 1)])
        self.forward(c, [(p[:n // 2], 0, 0)])
        c.remove(1, 0, None)  # 30 free cells below seq 0's: the rest of its prompt must not go there
        out["after a neighbour left"] = self.forward(c, [(p[n // 2:], n // 2, 0)])[0]
        return out

    def close(self) -> None:
        self.backend.close()


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def runner(request: pytest.FixtureRequest) -> Iterator[Runner]:
    r = Runner(request.getfixturevalue(f"{request.param}_path"))
    yield r
    r.close()


def test_logits_do_not_depend_on_batching(runner: Runner) -> None:
    got = runner.scenarios()
    ref = got.pop("whole prompt alone")
    assert np.all(np.isfinite(ref)) and ref.std() > 0.1
    for name, logits in got.items():
        diff = float(np.abs(logits - ref).max())
        assert diff == 0.0, f"{name}: logits differ by up to {diff:.3g}"


def test_fast_kernels_do_depend_on_batching(smollm2_path: Path) -> None:
    """The check above can fail: with ggml's batch-shape-dependent kernels the same scenarios differ."""
    r = Runner(smollm2_path, fast_kernels=True)
    try:
        got = r.scenarios()
    finally:
        r.close()
    ref = got.pop("whole prompt alone")
    assert any(not np.array_equal(v, ref) for v in got.values())
