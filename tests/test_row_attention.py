"""ggml/row_attention.c: fused attention over an F16 KV cache, each query row and head over its visible cells only.

Checked against a float64 softmax-attention reference written here (grouped heads, softcap, additive mask), and
for the property the runner needs: a row's output is bit for bit the same whatever other rows share its batch and
however many threads run it. ggml's own kernel, which sums the values in F16, agrees to within its rounding.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import ggml.tensor as tensor_module
from ggml import Runtime, RuntimeOptions, load_backend
from ggml._lib import lib
from ggml.context import GgmlContext
from ggml.tensor import GgmlTensor, _row_attention_usable
from ml.dtype import DType
from models import load_model
from runner.cli import Loaded
from runner.flags import parse_args
from test_graph_reuse import _batch
from test_models_tiny import model_logits

pytestmark = pytest.mark.skipif(not lib.pyrunner_row_attention_supported(),
                                reason="the kernel needs AVX2, FMA and F16C")

F = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def runtimes() -> Iterator[dict[tuple[int, bool], Runtime]]:
    rts = {(t, row): Runtime(RuntimeOptions(threads=t, row_attention=row, adaptive_threads=False))
           for t in (1, 2) for row in (False, True)}
    yield rts
    for rt in rts.values():
        rt.close()


def _case(seed: int, d: int, n_q: int, n_kv: int, n_head: int, n_head_kv: int,
          visible: float = 0.5) -> tuple[F, npt.NDArray[np.float16], npt.NDArray[np.float16], npt.NDArray[np.float16]]:
    """q (n_head, n_q, d) f32, k and v (n_head_kv, n_kv, d) f16, mask (n_q, n_kv) f16 of 0 / -inf / a few small
    finite biases; every row sees at least one cell."""
    g = np.random.default_rng(seed)
    q = g.standard_normal((n_head, n_q, d)).astype(np.float32)
    k = (g.standard_normal((n_head_kv, n_kv, d)) * 0.5).astype(np.float16)
    v = g.standard_normal((n_head_kv, n_kv, d)).astype(np.float16)
    seen = g.random((n_q, n_kv)) < visible
    seen[np.arange(n_q), g.integers(0, n_kv, n_q)] = True
    mask = np.where(seen, 0.0, -np.inf).astype(np.float16)
    mask[seen & (g.random((n_q, n_kv)) < 0.1)] = np.float16(-1.5)  # an additive bias, as ggml allows
    return q, k, v, mask


def _run(rt: Runtime, q: F, k: npt.NDArray[np.float16], v: npt.NDArray[np.float16], mask: npt.NDArray[np.float16],
         scale: float, softcap: float = 0.0) -> F:
    """The fused attention op on these operands; numpy order (n_q, n_head, d)."""
    ctx = GgmlContext(rt, 64)
    try:
        qt = ctx.from_numpy(q)  # ggml [d, n_q, n_head]
        out = qt.flash_attn(ctx, ctx.from_numpy(k), ctx.from_numpy(v), ctx.from_numpy(mask), scale, softcap)
        ctx.forward(out).compute(out)
        return np.array(out.numpy()).reshape(q.shape[1], q.shape[0], v.shape[2])
    finally:
        ctx.close()


def _reference(q: F, k: npt.NDArray[np.float16], v: npt.NDArray[np.float16], mask: npt.NDArray[np.float16],
               scale: float, softcap: float = 0.0) -> npt.NDArray[np.float64]:
    """softmax(q·k * scale (softcapped) + mask) · v in float64; a row that sees nothing gives zeros."""
    n_head, n_q, _ = q.shape
    group = n_head // k.shape[0]
    out = np.zeros((n_q, n_head, v.shape[2]))
    for h in range(n_head):
        kh, vh = k[h // group].astype(np.float64), v[h // group].astype(np.float64)
        s = q[h].astype(np.float64) @ kh.T * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        s = s + mask.astype(np.float64)
        for r in range(n_q):
            if np.isneginf(s[r]).all():
                continue
            w = np.exp(s[r] - s[r].max())
            out[r, h] = w @ vh / w.sum()
    return out


@pytest.mark.parametrize(("d", "n_head", "n_head_kv", "softcap"),
                         [(64, 9, 3, 0.0), (256, 4, 1, 0.0), (80, 4, 4, 0.0), (20, 6, 2, 0.0), (64, 8, 2, 30.0)])
def test_matches_the_float64_reference(runtimes: dict[tuple[int, bool], Runtime], d: int, n_head: int,
                                       n_head_kv: int, softcap: float) -> None:
    q, k, v, mask = _case(d + n_head, d, 5, 300, n_head, n_head_kv)
    scale = 1.0 / np.sqrt(d)
    got = _run(runtimes[1, True], q, k, v, mask, scale, softcap)
    want = _reference(q, k, v, mask, scale, softcap)
    assert np.abs(got - want).max() < 2e-5 * np.abs(want).max()
    ggml = _run(runtimes[1, False], q, k, v, mask, scale, softcap)  # F16 queries and value sums: their rounding
    assert np.abs(ggml - want).max() < 1e-2 * np.abs(want).max()
    assert not np.array_equal(got, ggml)  # so the two kernels were both exercised


def test_a_row_does_not_depend_on_its_batch_or_the_thread_count(runtimes: dict[tuple[int, bool], Runtime]) -> None:
    """Each row alone (a one-row batch over the same cache), then all rows together with 1 and 2 threads: the
    same bits."""
    q, k, v, mask = _case(7, 64, 6, 257, 8, 2, visible=0.3)
    together = _run(runtimes[1, True], q, k, v, mask, 0.125)
    assert np.array_equal(_run(runtimes[2, True], q, k, v, mask, 0.125), together)
    for r in range(q.shape[1]):
        alone = _run(runtimes[1, True], q[:, r:r + 1], k, v, mask[r:r + 1], 0.125)
        assert np.array_equal(alone[0], together[r]), f"row {r}"


def test_rows_that_see_nothing_give_zeros(runtimes: dict[tuple[int, bool], Runtime]) -> None:
    """A padded batch's extra mask rows are all -inf: those rows come out 0, the others as computed alone."""
    q, k, v, mask = _case(3, 64, 3, 64, 4, 2)
    mask[1] = -np.inf
    out = _run(runtimes[1, True], q, k, v, mask, 0.125)
    assert np.array_equal(out[1], np.zeros_like(out[1]))
    assert np.all(np.isfinite(out))


def test_takes_f16_caches_only(runtimes: dict[tuple[int, bool], Runtime]) -> None:
    rt = runtimes[1, True]
    ctx = GgmlContext(rt, 16)
    try:
        q = ctx.empty(DType.F32, 64, 2, 4)
        mask = ctx.empty(DType.F16, 32, 2)
        f16 = [ctx.empty(DType.F16, 64, 32, 2) for _ in range(2)]
        q8 = [ctx.empty(DType.Q8_0, 64, 32, 2) for _ in range(2)]

        def usable(a: GgmlTensor, b: GgmlTensor, m: GgmlTensor) -> bool:
            return _row_attention_usable(q._ptr, a._ptr, b._ptr, m._ptr)
        assert usable(f16[0], f16[1], mask)
        assert not usable(q8[0], q8[1], mask)  # quantized caches stay with ggml's kernel
        assert not usable(f16[0], f16[1], ctx.empty(DType.F16, 32, 2, 2))  # a per-head mask
    finally:
        ctx.close()


def _model_logits(path: Path, row_attention: bool, parts: list[tuple[list[int], int]]) -> list[npt.NDArray[Any]]:
    """Each (prompt, sequence) of `parts` from position 0, in one batch through the model at `path`; each prompt's
    last-row logits."""
    backend = load_backend(path, RuntimeOptions(threads=1, row_attention=row_attention))
    try:
        model = load_model(backend)
        cache = model.new_cache(flash=True)
        cache.init(backend, DType.F16, 2, 128, 64)
        try:
            logits = model_logits(backend, model, _batch([(prompt, 0, seq) for prompt, seq in parts]), cache)
        finally:
            cache.close()
        return list(logits)
    finally:
        backend.close()


def test_a_model_takes_it_and_stays_batch_invariant(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through SmolLM2's decoder (K and V are views of the cache there): with the option on, every layer's attention
    takes the kernel; a sequence's logits are the same alone and next to another one, bit for bit; and they stay
    close to ggml's kernel's. (A random-weight F32 model would not do: ggml's F32 mat-mul is not batch-invariant.)"""
    taken: list[bool] = []
    usable = tensor_module._row_attention_usable

    def counted(q: Any, k: Any, v: Any, mask: Any) -> bool:
        taken.append(usable(q, k, v, mask))
        return taken[-1]
    monkeypatch.setattr(tensor_module, "_row_attention_usable", counted)
    a, b = [504, 3575, 282, 4649, 314, 17, 99], [504, 3575, 282]
    (alone,) = _model_logits(smollm2_path, True, [(a, 0)])
    assert taken == [True] * 30
    together = _model_logits(smollm2_path, True, [(b, 1), (a, 0)])
    assert np.array_equal(together[1], alone)
    (ggml,) = _model_logits(smollm2_path, False, [(a, 0)])
    assert not np.array_equal(ggml, alone) and np.abs(ggml - alone).max() < 0.05 * np.abs(ggml).max()


def test_the_runner_turns_it_on_from_its_config(smollm2_path: Path) -> None:
    """OLLAMA_PYRUNNER_ROW_ATTENTION=1 reaches the runtime (runner.flags -> RunnerConfig -> Loaded)."""
    config, _ = parse_args(["--model", str(smollm2_path)], {"OLLAMA_PYRUNNER_ROW_ATTENTION": "1"})
    loaded = Loaded(config.model, 1, row_attention=config.row_attention)
    try:
        assert loaded.backend.runtime.row_attention
    finally:
        loaded.backend.close()
