"""Shared pieces of the KV cache tests (tests/test_kvcache_*.py): the two backends every cache test runs on, a
reference model of what each sequence holds, and a reader that turns one forward's `cache.get` into "what each
token of the batch attends to". This module holds no tests itself.

The check is permutation-free: for every layer and batch token, the cells its mask row leaves visible (0, every
other entry -inf), read through the K/V views `get` returns and named by the positions the cache's table gives
them, must be exactly the positions the reference says the token sees, holding exactly the data put there.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from fake_backend import FakeBackend, GgmlTestBackend
from ml.backend import Context, Tensor
from ml.batch import Batch
from ml.dtype import DType

HEAD_DIM = 32  # a multiple of the Q8_0/Q4_0 block
N_HEAD_KV = 2
N_LAYER = 2
ROPE_BASE = 10000.0

F64 = npt.NDArray[np.float64]


@pytest.fixture(scope="module", params=["fake", "ggml"])
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Each cache test runs on the numpy fake and on ggml's CPU backend."""
    if request.param == "fake":
        yield FakeBackend()
        return
    b = GgmlTestBackend(threads=1)
    yield b
    b.close()


def rope_shift(ctx: Context, il: int, key: Tensor, delta: Tensor) -> Tensor:
    """The tests' model shift function: normal RoPE over the whole head."""
    return key.rope(ctx, delta, HEAD_DIM, ROPE_BASE)


def rope_np(x: F64, pos: int | npt.NDArray[Any]) -> F64:
    """Normal (GPT-J) RoPE of x [..., n_tokens, n_head, head_dim] at positions [n_tokens] (or one position)."""
    p = np.broadcast_to(np.asarray(pos, dtype=np.float64), x.shape[:-2] if x.ndim > 2 else ())
    theta = p[..., None] * ROPE_BASE ** (-2.0 * np.arange(HEAD_DIM // 2) / HEAD_DIM)  # [..., half]
    cos, sin = np.cos(theta)[..., None, :], np.sin(theta)[..., None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x, dtype=np.float64)
    out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return out


def token_data(seq: int, pos: int, il: int, salt: int = 0) -> tuple[F64, F64]:
    """Deterministic k, v [n_head_kv, head_dim] for a token, exactly representable in f16."""
    g = np.random.default_rng([seq, pos, il, salt])
    k = g.standard_normal((N_HEAD_KV, HEAD_DIM)).astype(np.float16).astype(np.float64)
    v = g.standard_normal((N_HEAD_KV, HEAD_DIM)).astype(np.float16).astype(np.float64)
    return k, v


def tensor_values(t: Tensor) -> F64:
    raw = t.numpy()
    if t.dtype.is_quantized:
        return dequantize(np.ascontiguousarray(raw), GGMLQuantizationType(int(t.dtype))).astype(np.float64)
    return np.asarray(raw, dtype=np.float64)


def batch_of(positions: list[int], seqs: list[int], outputs: list[int] | None = None) -> Batch:
    n = len(positions)
    return Batch(np.zeros(n, np.int32), np.asarray(positions, np.int32), np.asarray(seqs, np.int32),
                 np.asarray(outputs if outputs is not None else [], np.int32))


@dataclass
class StepView:
    """What one forward's `get` showed, per layer: k/v [n_head_kv, n_kv, head_dim] and the mask (n_rows, n_kv)."""

    k: list[F64]
    v: list[F64]
    mask: F64
    kv_range: tuple[int, int]
    cell_pos: npt.NDArray[np.int32]  # table positions of the columns
    positions: list[int]
    seqs: list[int]


@dataclass
class Harness:
    """A cache plus the reference of what it should hold: ref[seq][pos] = per-layer (k, v)."""

    backend: Any
    cache: Any
    window: int | None = None
    chunk: int | None = None
    ref: dict[int, dict[int, list[tuple[F64, F64]]]] = field(default_factory=dict)
    salt: int = 0

    def step(self, positions: list[int], seqs: list[int], *, origin: dict[int, int] | None = None) -> StepView:
        """One forward of these tokens: start_forward, put each layer's k/v, read back get(). The token data is
        token_data(origin.get(seq, seq), pos, il, salt)."""
        origin = origin or {}
        ctx = self.backend.new_context()
        try:
            self.cache.start_forward(ctx, batch_of(positions, seqs))
            data = [[token_data(origin.get(s, s), p, il, self.salt) for p, s in zip(positions, seqs)]
                    for il in range(N_LAYER)]
            reads = []
            for il in range(N_LAYER):
                k = np.stack([d[0] for d in data[il]]).astype(np.float32)  # (n, h, d) = ggml [d, h, n]
                v = np.stack([d[1] for d in data[il]]).astype(np.float32)
                self.cache.put(ctx, il, ctx.from_numpy(k), ctx.from_numpy(v))
                kk, vv, mask = self.cache.get(ctx, il)
                reads.append((kk.contiguous(ctx), vv.contiguous(ctx), mask))
            ctx.compute(*[t for r in reads for t in r[:2]])
            ks = [tensor_values(r[0]).reshape(N_HEAD_KV, -1, HEAD_DIM) for r in reads]
            vs = [tensor_values(r[1]).reshape(N_HEAD_KV, -1, HEAD_DIM) for r in reads]
            m = np.asarray(reads[0][2].numpy(), dtype=np.float64)
        finally:
            ctx.close()
        for p, s, *per_layer in zip(positions, seqs, *data):
            self.ref.setdefault(s, {})[p] = list(per_layer)
        start, stop = self.cache._range
        m = m.reshape(-1, stop - start)  # a one-row mask reads back 1-D
        return StepView(ks, vs, m, (start, stop), self.cache.cells.positions[start:stop].copy(), positions, seqs)

    def visible(self, p: int, q: int) -> bool:
        if q > p:
            return False
        if self.window is not None and p - q > self.window:
            return False
        if self.chunk is not None and q // self.chunk != p // self.chunk:
            return False
        return True

    def check(self, view: StepView, *, key_atol: float = 0.0, value_atol: float = 0.0) -> None:
        """Every token sees exactly the reference's visible positions of its sequence, with their data."""
        n_kv = view.kv_range[1] - view.kv_range[0]
        assert view.mask.shape[1] == n_kv and view.mask.shape[0] >= len(view.positions)
        assert np.all((view.mask == 0) | (view.mask == -np.inf)), "mask entries must be 0 or -inf"
        assert np.all(view.mask[len(view.positions):] == -np.inf), "padding rows must be hidden"
        for il in range(N_LAYER):
            assert view.k[il].shape == (N_HEAD_KV, n_kv, HEAD_DIM)
            assert view.v[il].shape == (N_HEAD_KV, n_kv, HEAD_DIM)
            for t, (p, s) in enumerate(zip(view.positions, view.seqs)):
                cols = np.flatnonzero(view.mask[t] == 0)
                got_pos = view.cell_pos[cols]
                assert np.unique(got_pos).size == got_pos.size, f"token {t}: a position is visible twice"
                want = sorted(q for q in self.ref.get(s, {}) if self.visible(p, q))
                assert sorted(got_pos.tolist()) == want, f"layer {il} token {t} (seq {s} pos {p})"
                for c, q in zip(cols, got_pos):
                    wk, wv = self.ref[s][int(q)][il]
                    np.testing.assert_allclose(view.k[il][:, c, :], wk, rtol=0, atol=key_atol,
                                               err_msg=f"key of seq {s} pos {q}, layer {il}")
                    np.testing.assert_allclose(view.v[il][:, c, :], wv, rtol=0, atol=value_atol,
                                               err_msg=f"value of seq {s} pos {q}, layer {il}")

    # ---- reference edits, mirroring the cache's ----
    def ref_remove(self, seq: int, begin: int, end: int | None) -> None:
        held = self.ref.get(seq, {})
        kept: dict[int, list[tuple[F64, F64]]] = {}
        for p, per_layer in held.items():
            if p < begin:
                kept[p] = per_layer
            elif end is not None and p >= end:
                delta = begin - end
                kept[p + delta] = [(rope_np(k[None], delta)[0], v) for k, v in per_layer]
        self.ref[seq] = kept

    def ref_copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.ref[dst] = {p: d for p, d in self.ref.get(src, {}).items() if p < n}

    def stored_rows(self) -> tuple[list[F64], list[F64]]:
        """Every layer's whole K and V storage, (capacity, n_head_kv * head_dim)."""
        ks = [tensor_values(self.cache.keys[il]) for il in range(N_LAYER)]
        vs = [tensor_values(self.cache.values[il]) for il in range(N_LAYER)]
        return ks, vs
