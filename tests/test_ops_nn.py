"""softmax (mask, scale, softcap), rms_norm, layer_norm, rope (normal / NeoX, partial, freq_factors, YaRN) and
flash_attn against numpy references."""
from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from ggml.context import GgmlContext
from ml.dtype import DType
from test_ops_common import check, ctx, pad4, randn, rng, rt, run, stored, trim, values

__all__ = ["ctx", "rt"]

F64 = npt.NDArray[np.float64]


def _softmax(x: F64) -> F64:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


# ---------------------------------------------------------------- softmax

# numpy shapes of x (ne3, ne2, ne1, ne0) and of the mask, or None
SOFTMAX_CASES = {
    "1d": ((10,), None),
    "2d": ((5, 33), None),
    "2d-mask": ((5, 33), (5, 33)),
    "padded-mask": ((3, 16), (8, 16)),               # mask has more rows than x (ne11 >= ne01)
    "4d-mask-bcast": ((2, 4, 3, 12), (1, 1, 3, 12)),  # one mask for every head and sequence
    "4d-mask-per-head": ((2, 4, 3, 12), (1, 2, 3, 12)),  # ne02 % ne12 == 0: tiled over heads
    "4d-mask-per-seq": ((2, 2, 3, 12), (2, 1, 5, 12)),
}


@pytest.mark.parametrize("scale,softcap", [(1.0, 0.0), (0.125, 0.0), (0.5, 5.0), (1.0, 30.0)],
                         ids=["plain", "scale", "softcap5", "softcap30"])
@pytest.mark.parametrize("case,mask_type", [
    (c, t) for c in sorted(SOFTMAX_CASES) for t in (DType.F32, DType.F16) if SOFTMAX_CASES[c][1] or t == DType.F32
], ids=lambda v: v.name if isinstance(v, DType) else v)
def test_softmax(ctx: GgmlContext, case: str, mask_type: DType, scale: float, softcap: float) -> None:
    xs, ms = SOFTMAX_CASES[case]
    g = rng(30)
    x = randn(g, *xs, scale=4.0)
    mask_np = None
    if ms is not None:
        mask_np = randn(g, *ms)
        mask_np[..., 1::3] = -np.inf  # masked positions, as a causal mask has
        mask_np[..., 0] = 0.0  # keep every row with at least one finite score
    out = ctx.from_numpy(x).softmax(ctx, None if mask_np is None else ctx.from_numpy(mask_np, mask_type),
                                    scale=scale, softcap=softcap)
    (got,) = run(ctx, out)
    s = x.astype(np.float64) * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    if mask_np is not None:
        # mask rows past x's rows are unused; dims 2 and 3 broadcast by modulo (tiling), like binary ops
        m = pad4(stored(mask_np, mask_type))[:, :, :pad4(x).shape[2], :]
        m = np.tile(m, (pad4(x).shape[0] // m.shape[0], pad4(x).shape[1] // m.shape[1], 1, 1))
        s = (pad4(s) + m).reshape(s.shape)
    ref = _softmax(s)
    check(got, ref, 1e-7, f"softmax {case} {mask_type.name} mask")
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-5)
    if mask_np is not None:
        assert np.all(got[..., 1::3] == 0.0), "masked positions must get zero probability"


# ---------------------------------------------------------------- norms

NORM_SHAPES = [(13,), (4, 64), (2, 3, 257), (2, 2, 3, 31)]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rms_norm(ctx: GgmlContext, shape: tuple[int, ...], eps: float) -> None:
    x = randn(rng(31), *shape, scale=0.3) + 0.1
    (got,) = run(ctx, ctx.from_numpy(x).rms_norm(ctx, eps))
    xd = x.astype(np.float64)
    ref = xd / np.sqrt(np.mean(xd * xd, axis=-1, keepdims=True) + eps)
    check(got, ref, 1e-7, "rms_norm")


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("eps", [1e-5, 1e-1])
def test_layer_norm(ctx: GgmlContext, shape: tuple[int, ...], eps: float) -> None:
    x = randn(rng(32), *shape, scale=2.0) + 3.0
    (got,) = run(ctx, ctx.from_numpy(x).layer_norm(ctx, eps))
    xd = x.astype(np.float64)
    c = xd - xd.mean(axis=-1, keepdims=True)
    ref = c / np.sqrt(np.mean(c * c, axis=-1, keepdims=True) + eps)
    check(got, ref, 1e-7, "layer_norm")


# ---------------------------------------------------------------- rope


def _yarn_corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float,
                    beta_slow: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the dims where YaRN's ramp starts and ends."""
    def corr(n_rot: float) -> float:
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    return max(0.0, math.floor(corr(beta_fast))), min(n_dims - 1.0, math.ceil(corr(beta_slow)))


def rope_ref(x: F64, pos: npt.NDArray[np.int32], n_dims: int, base: float, *, neox: bool,
             freq_factors: F64 | None = None, freq_scale: float = 1.0, n_ctx_orig: int = 0,
             ext_factor: float = 0.0, attn_factor: float = 1.0, beta_fast: float = 32.0,
             beta_slow: float = 1.0) -> F64:
    """x numpy (..., n_tokens, n_head, head_dim); rotates the first n_dims of each head.

    Pair i (i < n_dims/2) at position p turns by theta = p * base^(-2i/n_dims) / ff[i]. YaRN mixes interpolated
    (theta*freq_scale) and extrapolated angles: ramp(i) = 1 - clamp((i - low) / max(0.001, high - low), 0, 1),
    mix = ramp*ext_factor, theta' = theta*freq_scale*(1 - mix) + theta*mix, and scales cos/sin by
    attn_factor * (1 + 0.1 ln(1/freq_scale)) when ext_factor != 0. Normal mode pairs (2i, 2i+1); NeoX pairs
    (i, i + n_dims/2). Dims past n_dims pass through."""
    half = n_dims // 2
    i = np.arange(half, dtype=np.float64)
    theta = pos.astype(np.float64)[:, None] * base ** (-2.0 * i / n_dims)  # (n_tokens, half)
    if freq_factors is not None:
        theta = theta / freq_factors[:half]
    mscale = attn_factor
    if ext_factor != 0.0:
        low, high = _yarn_corr_dims(n_dims, n_ctx_orig, base, beta_fast, beta_slow)
        mix = (1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)) * ext_factor
        theta = theta * freq_scale * (1.0 - mix) + theta * mix
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    else:
        theta = theta * freq_scale
    cos = (np.cos(theta) * mscale)[:, None, :]  # broadcast over heads
    sin = (np.sin(theta) * mscale)[:, None, :]
    out = x.copy()
    if neox:
        i0, i1 = np.arange(half), np.arange(half) + half
    else:
        i0, i1 = np.arange(half) * 2, np.arange(half) * 2 + 1
    x0, x1 = x[..., i0], x[..., i1]
    out[..., i0] = x0 * cos - x1 * sin
    out[..., i1] = x0 * sin + x1 * cos
    return out


YARN = dict(freq_scale=0.25, n_ctx_orig=4096, ext_factor=1.0, attn_factor=1.0, beta_fast=32.0, beta_slow=1.0)
ROPE_CASES = {
    "plain": dict(n_dims=64),
    "partial": dict(n_dims=32),
    "base-1e6": dict(n_dims=64, base=1e6),
    "freq-factors": dict(n_dims=64, ff=True),
    "linear-scale": dict(n_dims=64, freq_scale=0.5),
    "attn-factor": dict(n_dims=64, attn_factor=0.7),
    "yarn": dict(n_dims=64, **YARN),
    "yarn-partial-ff": dict(n_dims=32, ff=True, **{**YARN, "ext_factor": 0.5, "attn_factor": 1.2}),
}


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16], ids=lambda d: d.name)
@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope(ctx: GgmlContext, case: str, neox: bool, dtype: DType) -> None:
    params = dict(ROPE_CASES[case])
    n_dims = int(params.pop("n_dims"))
    base = float(params.pop("base", 10000.0))
    use_ff = bool(params.pop("ff", False))
    head_dim, n_head, n_tokens = 64, 3, 5
    g = rng(33)
    x = randn(g, n_tokens, n_head, head_dim)             # ggml [head_dim, n_head, n_tokens]
    pos = np.array([0, 1, 7, 100, 3000], np.int32)
    ff = (1.0 + g.random(n_dims // 2) * 8.0).astype(np.float32) if use_ff else None
    out = ctx.from_numpy(x, dtype).rope(ctx, ctx.from_numpy(pos), n_dims, base, neox=neox,
                                        freq_factors=None if ff is None else ctx.from_numpy(ff), **params)
    assert out.dtype == dtype and out.shape == (head_dim, n_head, n_tokens)
    (got,) = run(ctx, out)
    ref = rope_ref(stored(x, dtype), pos, n_dims, base, neox=neox,
                   freq_factors=None if ff is None else ff.astype(np.float64), **params)
    # f32 angles of positions in the thousands lose ~1e-4 rad; f16 storage adds its rounding.
    check(got, ref, 1e-6 if dtype == DType.F32 else 2e-6, f"rope {case}")


def test_rope_4d_batch(ctx: GgmlContext) -> None:
    """ggml [head_dim, n_head, n_tokens, 2]: every dim-3 slice uses the same positions."""
    g = rng(34)
    x = randn(g, 2, 4, 3, 32)
    pos = np.array([5, 6, 9, 40], np.int32)
    (got,) = run(ctx, ctx.from_numpy(x).rope(ctx, ctx.from_numpy(pos), 32, 10000.0, neox=True))
    ref = np.stack([rope_ref(x[b].astype(np.float64), pos, 32, 10000.0, neox=True) for b in range(2)])
    check(got, ref, 1e-7, "rope 4d")


def test_rope_position_zero_is_identity(ctx: GgmlContext) -> None:
    x = randn(rng(35), 1, 2, 16)
    (got,) = run(ctx, ctx.from_numpy(x).rope(ctx, ctx.from_numpy(np.zeros(1, np.int32)), 16, 10000.0))
    np.testing.assert_allclose(got, x.reshape(2, 16), rtol=0, atol=1e-7)


# ---------------------------------------------------------------- flash attention


def attention_ref(q: F64, k: F64, v: F64, mask: F64 | None, scale: float, softcap: float) -> F64:
    """q (n_head, n_tokens, d), k/v (n_head_kv, n_kv, d), mask (>= n_tokens, n_kv) -> (n_tokens, n_head, d_v)."""
    n_head, n_tokens = q.shape[:2]
    group = n_head // k.shape[0]
    out = np.empty((n_tokens, n_head, v.shape[-1]))
    for h in range(n_head):
        s = q[h] @ k[h // group].T * scale
        if softcap > 0:
            s = softcap * np.tanh(s / softcap)
        if mask is not None:
            s = s + mask[:n_tokens]
        out[:, h] = _softmax(s) @ v[h // group]
    return out


FA_CASES = {
    # name: (n_head, n_head_kv, n_tokens, n_kv, mask rows or 0 for no mask, softcap)
    "decode": (4, 4, 1, 10, 1, 0.0),
    "gqa-prefill-causal": (4, 2, 7, 7, 7, 0.0),
    "padded-mask": (2, 1, 3, 33, 8, 0.0),
    "no-mask": (2, 2, 5, 16, 0, 0.0),
    "softcap": (4, 2, 4, 20, 4, 20.0),
}


@pytest.mark.parametrize("kv_type", [DType.F16, DType.Q8_0], ids=lambda d: d.name)
@pytest.mark.parametrize("case", sorted(FA_CASES))
def test_flash_attn(ctx: GgmlContext, case: str, kv_type: DType) -> None:
    n_head, n_head_kv, n_tokens, n_kv, mask_rows, softcap = FA_CASES[case]
    d = 64
    g = rng(36)
    qn = randn(g, n_head, n_tokens, d)                      # ggml [d, n_tokens, n_head]
    k = ctx.from_numpy(randn(g, n_head_kv, n_kv, d), kv_type)
    v = ctx.from_numpy(randn(g, n_head_kv, n_kv, d), kv_type)
    mask_np = None
    if mask_rows:
        # causal over the last n_tokens cache cells, plus some random -inf
        mask_np = np.zeros((mask_rows, n_kv), np.float32)
        for t in range(min(mask_rows, n_tokens)):
            mask_np[t, n_kv - n_tokens + t + 1:] = -np.inf
        mask_np[:, 1:n_kv - n_tokens:3] = -np.inf
    scale = 1.0 / math.sqrt(d)
    out = ctx.from_numpy(qn).flash_attn(ctx, k, v, None if mask_np is None else ctx.from_numpy(mask_np, DType.F16),
                                        scale, softcap)
    assert out.shape == trim((d, n_head, n_tokens))
    (got,) = run(ctx, out)
    got = got.reshape(n_tokens, n_head, d)
    kv_shape = (n_head_kv, n_kv, d)
    ref = attention_ref(qn.astype(np.float64), values(k).reshape(kv_shape), values(v).reshape(kv_shape),
                        None if mask_np is None else mask_np.astype(np.float64), scale, softcap)
    # Q is converted to K's dot type (F16 or Q8_0), as test-backend-ops allows (5e-4).
    check(got, ref, 5e-4, f"flash_attn {case}")


def test_flash_attn_matches_softmax_path(ctx: GgmlContext) -> None:
    """flash_attn equals the unfused graph softmax(K^T Q * scale + mask) V built from the same ops."""
    g = rng(37)
    d, n_head, n_tokens, n_kv = 32, 2, 3, 9
    qn = randn(g, n_head, n_tokens, d)
    kn, vn = randn(g, n_head, n_kv, d), randn(g, n_head, n_kv, d)
    mask_np = np.triu(np.full((n_tokens, n_kv), -np.inf, np.float32), k=n_kv - n_tokens + 1)
    q, mask = ctx.from_numpy(qn), ctx.from_numpy(mask_np, DType.F16)
    k, v = ctx.from_numpy(kn, DType.F16), ctx.from_numpy(vn, DType.F16)
    fused = q.flash_attn(ctx, k, v, mask, 0.2)
    kq = k.matmul(ctx, q).softmax(ctx, mask, scale=0.2)                  # [n_kv, n_tokens, n_head]
    kqv = v.transpose(ctx).contiguous(ctx).matmul(ctx, kq)              # [d, n_tokens, n_head]
    unfused = kqv.permute(ctx, 0, 2, 1, 3).contiguous(ctx)              # [d, n_head, n_tokens]
    a, b = run(ctx, fused, unfused)
    check(a, b, 5e-4, "fused vs unfused")
