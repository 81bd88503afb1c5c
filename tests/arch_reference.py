"""A float64 numpy reference for the decoder families beyond llama/qwen2/gemma (qwen3, qwen3moe, granite, olmo2,
phi3) and for RoPE scaling, written from the papers and the Hugging Face definitions, not from `models/`:

- RoPE takes explicit per-pair inverse frequencies and a magnitude factor; the scaling types build them:
  linear (Chen et al. 2023, position interpolation: inv / factor), YaRN (Peng et al. 2023: NTK-by-parts blend of
  interpolated and extrapolated frequencies over the correction range set by beta_fast / beta_slow, magnitude
  0.1 ln(factor) + 1), llama3 (Meta's Llama 3.1 rule on wavelengths: low frequencies / factor, high kept, a smooth
  blend between) and LongRoPE (Ding et al. 2024, Phi-3: per-dimension rescale factors, magnitude
  sqrt(1 + ln(scale) / ln(original context))).
- MoE (Qwen3-MoE's sparse block): softmax router, top-k experts, weights renormalised over the k when asked, each
  expert a SwiGLU FFN, outputs summed with the weights.
- Granite's multipliers (embedding, residual, attention scale, logits divided by logit_scale), OLMo 2's post-norm
  block (no pre-norms; RMSNorm of the whole q and k projections), Phi-3's fused QKV and gate/up (gate first).

Weights are read by GGUF name (numpy order: a ggml [n_in, n_out] matrix is an (n_out, n_in) array).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from test_models_tiny import attention, rms_norm, rotate, silu, softmax


# ---- RoPE ----------------------------------------------------------------------------------------------------------

def inv_freq_plain(base: float, n_rot: int) -> np.ndarray:
    return np.asarray(base ** (-2.0 * np.arange(n_rot // 2) / n_rot))


def inv_freq_yarn(base: float, n_rot: int, factor: float, n_ctx_orig: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0) -> np.ndarray:
    """YaRN's frequencies (HF _compute_yarn_parameters with truncation): dimensions rotating fewer than beta_slow
    times over the original context are interpolated (/ factor), those rotating more than beta_fast times are
    kept, a linear ramp between."""
    extrap = inv_freq_plain(base, n_rot)
    interp = extrap / factor

    def correction_dim(n_rotations: float) -> float:
        return n_rot * math.log(n_ctx_orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), n_rot - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(n_rot // 2) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # the share of the extrapolated (unscaled) frequency
    return np.asarray(interp * (1.0 - keep) + extrap * keep)


def yarn_magnitude(factor: float, log_mul: float = 0.0) -> float:
    def m(scale: float, mscale: float) -> float:
        return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0
    return m(factor, 1.0) / m(factor, log_mul) if log_mul else m(factor, 1.0)


def inv_freq_llama3(base: float, n_rot: int, factor: float, low_freq_factor: float, high_freq_factor: float,
                    old_ctx: int) -> np.ndarray:
    inv = inv_freq_plain(base, n_rot)
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_ctx / low_freq_factor, old_ctx / high_freq_factor
    smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > low_wavelen, inv / factor, inv)
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.asarray(np.where(mid, blended, out))


def longrope_magnitude(n_ctx: int, n_ctx_orig: int) -> float:
    scale = n_ctx / n_ctx_orig
    return math.sqrt(1 + math.log(scale) / math.log(n_ctx_orig)) if scale > 1.0 else 1.0


rope = rotate  # (T, H, D) by pos * inv_freq, NeoX or normal pairs, scaled by a magnitude


# ---- the forward ---------------------------------------------------------------------------------------------------

@dataclass
class Ref:
    """One architecture's reference settings (the model side reads the same facts from the GGUF)."""

    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    eps: float
    neox: bool
    inv_freq: Callable[[int], np.ndarray]  # layer -> per-pair inverse frequencies
    magnitude: Callable[[int], float] = lambda il: 1.0
    window: Callable[[int], int] = lambda il: 0  # layer -> sliding window (0: none)
    attn_scale: float = 0.0  # 0: 1 / sqrt(head_dim)
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    n_expert_used: int = 0
    expert_norm: bool = False
    q_temp: Callable[[np.ndarray], np.ndarray] | None = None  # positions -> query scale (mistral3, llama4)
    nope: Callable[[int], bool] = lambda il: False  # llama4: layers without RoPE (the temperature goes there)
    chunk: Callable[[int], int] = lambda il: 0  # llama4: chunked attention (0: none)
    qk_rms: bool = False  # llama4: weightless RMSNorm of q and k after RoPE, on RoPE layers
    moe_sigmoid: bool = False  # llama4: sigmoid router weights applied to the expert input, plus a shared expert
    off: dict[str, bool] = field(default_factory=dict)  # features switched off, to prove the tests notice


def forward(r: Ref, w: dict[str, np.ndarray], tokens: list[int],
            chosen: list[list[tuple[int, ...]]] | None = None) -> np.ndarray:
    """Logits (n_tokens, n_vocab) for tokens at positions 0..; `chosen` collects each MoE layer's experts per
    token (sorted tuples)."""
    W = {k: v.astype(np.float64) for k, v in w.items()}
    off = r.off
    pos = np.arange(len(tokens))
    n = len(tokens)
    x = W["token_embd.weight"][np.asarray(tokens)] * (1.0 if off.get("no_embed_scale") else r.embed_scale)
    res_scale = 1.0 if off.get("no_residual_scale") else r.residual_scale
    n_layer = 1 + max(int(k.split(".")[1]) for k in W if k.startswith("blk."))

    def lin(name: str, h: np.ndarray) -> np.ndarray:
        y = h @ W[name + ".weight"].T
        b = W.get(name + ".bias")
        return y if b is None else y + b

    for il in range(n_layer):
        p = f"blk.{il}."
        h = rms_norm(x, W[p + "attn_norm.weight"], r.eps) if p + "attn_norm.weight" in W else x
        if p + "attn_qkv.weight" in W:  # phi3: one projection, rows q | k | v
            qkv = lin(p + "attn_qkv", h)
            nq, nk = r.n_head * r.head_dim, r.n_head_kv * r.head_dim
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
        else:
            q, k, v = lin(p + "attn_q", h), lin(p + "attn_k", h), lin(p + "attn_v", h)
        full_norm = p + "attn_q_norm.weight" in W and W[p + "attn_q_norm.weight"].shape[0] == q.shape[1] \
            and q.shape[1] != r.head_dim
        if full_norm and not off.get("no_qk_norm"):  # olmo2: over the whole projection
            q, k = rms_norm(q, W[p + "attn_q_norm.weight"], r.eps), rms_norm(k, W[p + "attn_k_norm.weight"], r.eps)
        q = q.reshape(n, r.n_head, r.head_dim)
        k = k.reshape(n, r.n_head_kv, r.head_dim)
        v = v.reshape(n, r.n_head_kv, r.head_dim)
        if p + "attn_q_norm.weight" in W and not full_norm and not off.get("no_qk_norm"):
            q, k = rms_norm(q, W[p + "attn_q_norm.weight"], r.eps), rms_norm(k, W[p + "attn_k_norm.weight"], r.eps)
        inv, mag = r.inv_freq(il), 1.0 if off.get("no_magnitude") else r.magnitude(il)
        nope = r.nope(il) and not off.get("no_nope")
        if not nope:
            q = rope(q, pos, r.n_rot, inv, neox=r.neox, magnitude=mag)
            k = rope(k, pos, r.n_rot, inv, neox=r.neox, magnitude=mag)
            if r.qk_rms and not off.get("no_qk_norm"):
                q, k = rms_norm(q, 1.0, r.eps), rms_norm(k, 1.0, r.eps)
        if r.q_temp is not None and (nope or not any(r.nope(i) for i in range(n_layer))) \
                and not off.get("no_temperature"):
            q = q * r.q_temp(pos)[:, None, None]
        scale = 1.0 / math.sqrt(r.head_dim) if not r.attn_scale or off.get("no_attn_scale") else r.attn_scale
        chunk = 0 if off.get("no_chunk") else r.chunk(il)
        if chunk:
            att = chunked_attention(q, k, v, pos, scale, chunk)
        else:
            att = attention(q, k, v, pos, scale, window=0 if off.get("no_window") else r.window(il))
        att = lin(p + "attn_output", att)
        if p + "post_attention_norm.weight" in W and not off.get("no_post_norms"):
            att = rms_norm(att, W[p + "post_attention_norm.weight"], r.eps)
        x = x + res_scale * att
        h = rms_norm(x, W[p + "ffn_norm.weight"], r.eps) if p + "ffn_norm.weight" in W else x
        h = moe(r, W, p, h, chosen) if p + "ffn_gate_inp.weight" in W else ffn(W, p, h, lin)
        if p + "post_ffw_norm.weight" in W and not off.get("no_post_norms"):
            h = rms_norm(h, W[p + "post_ffw_norm.weight"], r.eps)
        x = x + res_scale * h
    x = rms_norm(x, W["output_norm.weight"], r.eps)
    logits = lin("output", x) if "output.weight" in W else x @ W["token_embd.weight"].T
    return logits / (1.0 if off.get("no_logit_scale") else r.logit_scale)


def chunked_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, scale: float,
                      chunk: int) -> np.ndarray:
    """Causal attention within fixed chunks of positions (a key is visible iff in the query's chunk)."""
    n_tok, n_head, _ = q.shape
    group = n_head // k.shape[1]
    visible = (pos[:, None] >= pos[None, :]) & (pos[:, None] // chunk == pos[None, :] // chunk)
    out = np.empty((n_tok, n_head, v.shape[2]))
    for h in range(n_head):
        s = np.where(visible, q[:, h] @ k[:, h // group].T * scale, -np.inf)
        out[:, h] = softmax(s) @ v[:, h // group]
    return out.reshape(n_tok, -1)


def ffn(W: dict[str, np.ndarray], p: str, h: np.ndarray, lin: Callable[[str, np.ndarray], np.ndarray]) -> np.ndarray:
    if p + "ffn_gate.weight" in W:
        return lin(p + "ffn_down", silu(lin(p + "ffn_gate", h)) * lin(p + "ffn_up", h))
    gate_up = lin(p + "ffn_up", h)  # phi3: gate rows first, then up
    half = gate_up.shape[1] // 2
    return lin(p + "ffn_down", silu(gate_up[:, :half]) * gate_up[:, half:])


def moe(r: Ref, W: dict[str, np.ndarray], p: str, h: np.ndarray,
        chosen: list[list[tuple[int, ...]]] | None) -> np.ndarray:
    logits = h @ W[p + "ffn_gate_inp.weight"].T
    probs = 1.0 / (1.0 + np.exp(-logits)) if r.moe_sigmoid else softmax(logits)  # (T, n_expert)
    out = np.zeros_like(h)
    picks: list[tuple[int, ...]] = []
    for t in range(h.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[:r.n_expert_used]
        picks.append(tuple(sorted(int(e) for e in top)))
        wts = probs[t, top]
        if r.expert_norm and not r.off.get("no_expert_norm"):
            wts = wts / wts.sum()
        for e, wt in zip(top, wts):
            xin = wt * h[t] if r.moe_sigmoid else h[t]  # llama4 weighs the expert's input
            g = W[p + "ffn_gate_exps.weight"][e] @ xin
            u = W[p + "ffn_up_exps.weight"][e] @ xin
            y = W[p + "ffn_down_exps.weight"][e] @ (silu(g) * u)
            out[t] += y if r.moe_sigmoid else wt * y
    if p + "ffn_gate_shexp.weight" in W and not r.off.get("no_shared_expert"):
        out += (silu(h @ W[p + "ffn_gate_shexp.weight"].T) * (h @ W[p + "ffn_up_shexp.weight"].T)) \
            @ W[p + "ffn_down_shexp.weight"].T
    if chosen is not None:
        chosen.append(picks)
    return out
