"""Tiny random-weight llama / qwen2 / gemma2 / gemma3 models against an independent numpy reference.

The reference below is written from the architectures' definitions (llama.cpp src/models/*.cpp and ggml's CPU ops),
not from `models/` or `ml/nn`: RMSNorm, RoPE (normal: pairs (2i, 2i+1); NeoX: pairs (i, i + n_rot/2);
theta_i = pos * freq_scale * base^(-2i/n_rot) / freq_factor_i), grouped-query attention (query head h reads KV head
h // (n_head / n_head_kv)) with a causal and sliding-window mask (a cell is visible iff 0 <= pos - cell_pos <
window), attention and final soft-capping, SwiGLU / GeGLU (tanh GeLU), the gemma embedding scale sqrt(n_embd) and
tied output. It runs in float64.

One documented ggml quirk is modelled: ggml's CPU GeLU (and GeGLU) rounds its input to f16 and reads an f16 table
(GGML_GELU_FP16 in ggml-cpu/vec.h), so the gemma references apply the same rounding; without it the gemma logits
differ by 2e-4..2e-3 relative, which would hide real bugs behind a loose tolerance. The KV cache is F32 here
(cache.init(..., DType.F32, ...)), so the model side is f32 throughout: llama/qwen2 match within 1e-4 relative
(seen: ~5e-7), gemma within TOL_GELU (see there). The F16-cache and flash-attention paths are checked separately
with a looser bound (f16 K/V, and for flash f16 Q and products: seen up to ~2e-3, bound 5e-3).

Every case also proves that it is sensitive: switching one feature off in the reference (NeoX vs normal RoPE,
biases, soft-caps, window, q/k norms, local RoPE base, ...) moves the logits far outside the tolerance.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ggml import RuntimeOptions, load_backend
from ml.batch import Batch
from ml.dtype import DType
from models import load_model
from tiny_gguf import TinySpec, gemma2_spec, gemma3_spec, llama_spec, qwen2_spec, write_gguf

TOL = 1e-4  # max |model - reference| / max |reference|
# gemma (GeGLU): model and reference pre-activations differ by ~1e-7 relative, so now and then a GeLU input sits
# that close to an f16 rounding boundary and ggml's f16 table rounds it the other way: one such flip moves the
# logits by up to ~1.3e-4 relative (seen over 12 seeds; without the f16 emulation the gap is 2e-4..2e-3).
TOL_GELU = 3e-4
PROMPT = [5, 17, 3, 42, 8, 29, 11, 60, 23, 7]  # 10 tokens: crosses the windows (3 and 4)
N_DECODE = 8


# ----------------------------------------------------------------------------------------------------------------
# the numpy reference
# ----------------------------------------------------------------------------------------------------------------

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return np.asarray(x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w)


def rope(x: np.ndarray, pos: np.ndarray, n_rot: int, base: float, *, neox: bool,
         freq_factors: np.ndarray | None = None, freq_scale: float = 1.0) -> np.ndarray:
    """x (n_tokens, n_heads, head_dim); dims >= n_rot pass through."""
    inv = base ** (-2.0 * np.arange(n_rot // 2) / n_rot)
    if freq_factors is not None:
        inv = inv / freq_factors
    return rotate(x, pos, n_rot, freq_scale * inv, neox=neox)


def rotate(x: np.ndarray, pos: np.ndarray, n_rot: int, inv_freq: np.ndarray, *, neox: bool,
           magnitude: float = 1.0) -> np.ndarray:
    """x (T, H, D): rotate pairs (NeoX: (i, i + n_rot/2); normal: (2i, 2i+1)) by pos * inv_freq, the rotated part
    scaled by `magnitude`; dims >= n_rot pass through."""
    half = n_rot // 2
    theta = pos.astype(np.float64)[:, None] * inv_freq[None, :]
    cos, sin = (np.cos(theta) * magnitude)[:, None, :], (np.sin(theta) * magnitude)[:, None, :]
    out = x.copy()
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]
        out[..., :half], out[..., half:n_rot] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2], out[..., 1:n_rot:2] = a * cos - b * sin, a * sin + b * cos
    return out


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_ggml_cpu(x: np.ndarray) -> np.ndarray:
    """ggml-cpu's GeLU: input rounded to f16, then an f16 table of the f32 tanh GeLU; exact outside [-10, 10]."""
    h = x.astype(np.float16).astype(np.float32)
    c = np.float32(math.sqrt(2.0 / math.pi))
    g = np.float32(0.5) * h * (np.float32(1.0) + np.tanh(c * h * (np.float32(1.0) + np.float32(0.044715) * h * h)))
    table = g.astype(np.float16).astype(np.float64)
    return np.where(x <= -10.0, 0.0, np.where(x >= 10.0, x, table))


def silu(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / (1.0 + np.exp(-x)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, scale: float, *, window: int = 0,
              softcap: float = 0.0, gqa_interleaved: bool = False, window_plus_one: bool = False,
              also_visible: np.ndarray | None = None) -> np.ndarray:
    """q (T, H, D), k/v (T, H_kv, D) -> (T, H * D). Query head h reads KV head h // (H / H_kv). A window hides a
    key once pos_q - pos_k >= window (llama.cpp's is_masked_swa, HF's sliding_window_overlay); `window_plus_one`
    is Ollama v0.6.8's rule (hidden once > window), kept to prove the tests tell the two apart. `also_visible`
    (T, T) adds pairs the causal, windowed mask hides (Gemma 3: a token of an image sees its whole image; HF's
    or_mask_function)."""
    n_tok, n_head, d = q.shape
    group = n_head // k.shape[1]
    delta = pos[:, None] - pos[None, :]
    visible = delta >= 0
    if window:
        visible &= (delta <= window) if window_plus_one else (delta < window)
    if also_visible is not None:
        visible |= also_visible
    out = np.empty((n_tok, n_head, v.shape[2]))
    for h in range(n_head):
        kh = h % k.shape[1] if gqa_interleaved else h // group
        s = q[:, h] @ k[:, kh].T * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        s = np.where(visible, s, -np.inf)
        out[:, h] = softmax(s) @ v[:, kh]
    return out.reshape(n_tok, n_head * v.shape[2])


@dataclass(frozen=True)
class Arch:
    """What the reference must know about an architecture, written here from llama.cpp's definitions."""

    neox: bool
    gelu: bool
    gemma: bool  # embeddings scaled by sqrt(n_embd)
    swa_pattern: int  # llama.cpp set_swa_pattern(n): layer il slides iff il % n < n - 1; 0: none
    local_base: float | None  # gemma3: window layers use base 10000 and no rope scaling


ARCHS = {
    "llama": Arch(neox=False, gelu=False, gemma=False, swa_pattern=0, local_base=None),
    "qwen2": Arch(neox=True, gelu=False, gemma=False, swa_pattern=0, local_base=None),
    "gemma2": Arch(neox=True, gelu=True, gemma=True, swa_pattern=2, local_base=None),
    "gemma3": Arch(neox=True, gelu=True, gemma=True, swa_pattern=6, local_base=10000.0),
}


def reference_logits(spec: TinySpec, w: dict[str, np.ndarray], tokens: list[int], *,
                     embeds: dict[int, np.ndarray] | None = None, also_visible: np.ndarray | None = None,
                     **off: Any) -> np.ndarray:
    """Logits (n_tokens, n_vocab) for `tokens` at positions 0.. . `off` switches features off or changes them,
    to show the tests would notice (see SENSITIVITY). `embeds` (row -> vector) replaces those rows' inputs (an
    image's soft tokens, which are not scaled as token embeddings are); `also_visible` as for `attention`."""
    x = reference_hidden(spec, w, tokens, embeds=embeds, also_visible=also_visible, **off)
    out_w = w["output.weight"] if "output.weight" in w else w["token_embd.weight"]
    logits = x @ out_w.astype(np.float64).T
    if spec.final_softcap and not off.get("no_final_softcap"):
        logits = spec.final_softcap * np.tanh(logits / spec.final_softcap)
    return logits


def reference_hidden(spec: TinySpec, w: dict[str, np.ndarray], tokens: list[int], *,
                     embeds: dict[int, np.ndarray] | None = None, also_visible: np.ndarray | None = None,
                     **off: Any) -> np.ndarray:
    """Final-normed hidden states (n_tokens, n_embd), float64; the rest as for reference_logits."""
    a = ARCHS[spec.arch]
    s = spec
    W = {k: v.astype(np.float64) for k, v in w.items()}
    neox = a.neox != off.get("flip_neox", False)
    pos = np.arange(len(tokens))
    x = W["token_embd.weight"][np.maximum(np.asarray(tokens), 0)]
    if a.gemma and not off.get("no_embed_scale"):
        x = x * math.sqrt(s.n_embd)
    for row, vec in (embeds or {}).items():
        x[row] = vec * (math.sqrt(s.n_embd) if off.get("scale_embeds") else 1.0)
    freqs = W.get("rope_freqs.weight") if not off.get("no_rope_freqs") else None
    gelu = gelu_tanh if off.get("exact_gelu") else gelu_ggml_cpu
    scale = 1.0 / math.sqrt(s.head_dim) if not off.get("embd_head_scale") else 1.0 / math.sqrt(s.n_embd // s.n_head)
    global_scale = 1.0 / s.rope_scale_factor if s.rope_scale_factor and not off.get("no_rope_scaling") else 1.0

    def lin(name: str, h: np.ndarray) -> np.ndarray:
        y = h @ W[name + ".weight"].T
        b = W.get(name + ".bias")
        return y if b is None or off.get("no_bias") else y + b

    for il in range(s.n_layer):
        p = f"blk.{il}."
        swa = bool(s.window) and a.swa_pattern > 0 and il % a.swa_pattern < a.swa_pattern - 1
        window = s.window if swa and not off.get("no_window") else 0
        base, fscale = s.rope_base, global_scale
        if swa and a.local_base is not None and not off.get("no_local_base"):
            base, fscale = a.local_base, global_scale if off.get("scale_local_layers") else 1.0
        h = rms_norm(x, W[p + "attn_norm.weight"], s.eps)
        q = lin(p + "attn_q", h).reshape(len(tokens), s.n_head, s.head_dim)
        k = lin(p + "attn_k", h).reshape(len(tokens), s.n_head_kv, s.head_dim)
        v = lin(p + "attn_v", h).reshape(len(tokens), s.n_head_kv, s.head_dim)
        if s.qk_norm and not off.get("no_qk_norm"):
            q = rms_norm(q, W[p + "attn_q_norm.weight"], s.eps)
            k = rms_norm(k, W[p + "attn_k_norm.weight"], s.eps)
        q = rope(q, pos, s.n_rot, base, neox=neox, freq_factors=freqs, freq_scale=fscale)
        k = rope(k, pos, s.n_rot, base, neox=neox, freq_factors=freqs, freq_scale=fscale)
        att = attention(q, k, v, pos, scale, window=window,
                        softcap=0.0 if off.get("no_attn_softcap") else s.attn_softcap,
                        gqa_interleaved=off.get("gqa_interleaved", False),
                        window_plus_one=off.get("window_plus_one", False), also_visible=also_visible)
        att = lin(p + "attn_output", att)
        if s.post_norms and not off.get("no_post_norms"):
            att = rms_norm(att, W[p + "post_attention_norm.weight"], s.eps)
        x = x + att
        h = rms_norm(x, W[p + "ffn_norm.weight"], s.eps)
        gate, up = lin(p + "ffn_gate", h), lin(p + "ffn_up", h)
        h = lin(p + "ffn_down", (gelu(gate) if a.gelu else silu(gate)) * up)
        if s.post_norms and not off.get("no_post_norms"):
            h = rms_norm(h, W[p + "post_ffw_norm.weight"], s.eps)
        x = x + h
    return rms_norm(x, W["output_norm.weight"], s.eps)


def reference_greedy(spec: TinySpec, w: dict[str, np.ndarray], prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(np.argmax(reference_logits(spec, w, toks)[-1])))
    return toks[len(prompt):]


def tol(spec: TinySpec, exact: float = TOL) -> float:
    """The bound for a comparison that would be `exact` without the GeLU f16 flips (see TOL_GELU)."""
    return TOL_GELU if ARCHS[spec.arch].gelu else exact


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# ----------------------------------------------------------------------------------------------------------------
# the model side
# ----------------------------------------------------------------------------------------------------------------

CASES: dict[str, TinySpec] = {
    "llama": llama_spec(),
    "llama-rope-freqs": llama_spec(rope_freqs=(1.0, 2.0, 5.0, 40.0), rope_base=500000.0),
    "qwen2": qwen2_spec(),
    "gemma2": gemma2_spec(),
    "gemma3": gemma3_spec(),
    "gemma3-rope-scaling": gemma3_spec(rope_scale_factor=8.0, n_layer=6),
}

# Per case: reference variants that must NOT match (each exercises one feature the case is meant to test).
SENSITIVITY: dict[str, list[str]] = {
    "llama": ["flip_neox", "gqa_interleaved"],
    "llama-rope-freqs": ["no_rope_freqs", "flip_neox"],
    "qwen2": ["flip_neox", "no_bias", "gqa_interleaved"],
    "gemma2": ["no_attn_softcap", "no_final_softcap", "no_window", "window_plus_one", "no_embed_scale",
               "no_post_norms", "flip_neox"],
    "gemma3": ["no_qk_norm", "no_local_base", "no_window", "window_plus_one", "embd_head_scale", "no_post_norms",
               "flip_neox"],
    "gemma3-rope-scaling": ["no_rope_scaling", "scale_local_layers", "no_local_base"],
}


@dataclass
class Loaded:
    name: str
    spec: TinySpec
    weights: dict[str, np.ndarray]
    backend: Any
    model: Any

    def cache(self, dtype: DType = DType.F32, flash: bool = False, max_sequences: int = 1) -> Any:
        c = self.model.new_cache(flash=flash)
        c.init(self.backend, dtype, max_sequences, 256, 64)
        return c

    def logits(self, batch: Batch, cache: Any) -> np.ndarray:
        return model_logits(self.backend, self.model, batch, cache)

    def greedy(self, prompt: list[int], n: int, **cache_kw: Any) -> tuple[list[int], np.ndarray]:
        """Prompt in one batch, then one token per step; returns the tokens and every step's logits."""
        return greedy_decode(self.backend, self.model, self.cache(**cache_kw), prompt, n)


def model_logits(backend: Any, model: Any, batch: Batch, cache: Any) -> np.ndarray:
    """The model's logits for `batch` through `cache`, as float64 [n_outputs, n_vocab]."""
    ctx = backend.new_context()
    try:
        out = model.forward(ctx, batch, cache)
        ctx.forward(out).compute(out)
        return np.array(out.numpy(), dtype=np.float64).reshape(-1, model.params.n_vocab)
    finally:
        ctx.close()


def greedy_decode(backend: Any, model: Any, cache: Any, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """The prompt in one batch, then one greedy token per step; the tokens and every step's logits. Closes
    `cache`."""
    try:
        batch, pos, out, rows = Batch.single(prompt, 0), 0, [], []
        for _ in range(n):
            row = model_logits(backend, model, batch, cache)[-1]
            rows.append(row)
            out.append(int(np.argmax(row)))
            pos += batch.n_tokens
            batch = Batch.single([out[-1]], pos)
        return out, np.stack(rows)
    finally:
        cache.close()


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    spec = CASES[request.param]
    path = tmp_path_factory.mktemp("tiny") / f"{request.param}.gguf"
    weights = write_gguf(path, spec, seed=sum(map(ord, request.param)))
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        yield Loaded(request.param, spec, weights, backend, load_model(backend, strict=True))
    finally:
        backend.close()


@pytest.fixture(scope="module")
def reference(tiny: Loaded) -> dict[str, Any]:
    """The reference's prompt logits and greedy continuation (computed once per case)."""
    return {"prompt": reference_logits(tiny.spec, tiny.weights, PROMPT),
            "greedy": reference_greedy(tiny.spec, tiny.weights, PROMPT, N_DECODE)}


def test_prompt_logits_match_reference(tiny: Loaded, reference: dict[str, Any]) -> None:
    cache = tiny.cache()
    try:
        got = tiny.logits(Batch.single(PROMPT, all_logits=True), cache)
    finally:
        cache.close()
    assert got.shape == (len(PROMPT), tiny.spec.n_vocab)
    assert rel_err(got, reference["prompt"]) < tol(tiny.spec)


def test_reference_is_sensitive_to_each_feature(tiny: Loaded, reference: dict[str, Any]) -> None:
    """Each feature the case exercises changes the reference's logits far beyond TOL (else the match above would
    prove nothing about it)."""
    for variant in SENSITIVITY[tiny.name]:
        other = reference_logits(tiny.spec, tiny.weights, PROMPT, **{variant: True})
        assert rel_err(other, reference["prompt"]) > 30 * tol(tiny.spec), variant


def test_greedy_matches_reference(tiny: Loaded, reference: dict[str, Any]) -> None:
    tokens, _ = tiny.greedy(PROMPT, N_DECODE)
    assert tokens == reference["greedy"]
    # The continuation runs past every window and its argmax margins are not ties (else the check is luck).
    for i in range(N_DECODE):
        top2 = np.sort(reference_logits(tiny.spec, tiny.weights, PROMPT + tokens[:i])[-1])[-2:]
        assert top2[1] - top2[0] > 1e-3 * abs(top2[1])


def test_greedy_step_logits_match_reference(tiny: Loaded, reference: dict[str, Any]) -> None:
    """Each decode step's logits (through the KV cache) equal the reference's at that position."""
    tokens, rows = tiny.greedy(PROMPT, N_DECODE)
    full = reference_logits(tiny.spec, tiny.weights, PROMPT + tokens[:-1])
    want = full[len(PROMPT) - 1:]
    assert rel_err(rows, want) < tol(tiny.spec)


def test_step_by_step_equals_whole_prompt(tiny: Loaded) -> None:
    """Feeding the prompt one token per forward gives the all-at-once logits at every position."""
    cache = tiny.cache()
    try:
        whole = tiny.logits(Batch.single(PROMPT, all_logits=True), cache)
    finally:
        cache.close()
    cache = tiny.cache()
    try:
        steps = np.concatenate([tiny.logits(Batch.single([t], i), cache) for i, t in enumerate(PROMPT)])
    finally:
        cache.close()
    assert rel_err(steps, whole) < tol(tiny.spec, 1e-5)


def test_chunked_prompt_equals_whole_prompt(tiny: Loaded) -> None:
    """The prompt in uneven chunks (3 + 4 + 3 tokens) gives the same logits at every position."""
    cache = tiny.cache()
    try:
        whole = tiny.logits(Batch.single(PROMPT, all_logits=True), cache)
    finally:
        cache.close()
    cache = tiny.cache()
    try:
        parts = [tiny.logits(Batch.single(PROMPT[a:b], a, all_logits=True), cache)
                 for a, b in ((0, 3), (3, 7), (7, 10))]
    finally:
        cache.close()
    assert rel_err(np.concatenate(parts), whole) < tol(tiny.spec, 1e-5)


@pytest.mark.parametrize("flash", [False, True], ids=["f16-cache", "f16-cache-flash"])
def test_f16_cache_and_flash_attention(tiny: Loaded, reference: dict[str, Any], flash: bool) -> None:
    """The default F16 cache, with and without ggml's fused attention: K/V (and, for flash, Q and the softmax
    products) are rounded to f16, hence the looser bound; the greedy tokens stay identical."""
    tokens, rows = tiny.greedy(PROMPT, N_DECODE, dtype=DType.F16, flash=flash)
    assert tokens == reference["greedy"]
    want = reference_logits(tiny.spec, tiny.weights, PROMPT + tokens[:-1])[len(PROMPT) - 1:]
    assert rel_err(rows, want) < 5e-3


def test_two_sequences_in_one_batch(tiny: Loaded) -> None:
    """Two different prompts decoded together (seq 0 and 1) give each one's solo logits and tokens."""
    prompts = [PROMPT, [9, 4, 33, 2, 50, 13]]
    solo = [tiny.greedy(p, 4) for p in prompts]
    cache = tiny.cache(max_sequences=2)
    try:
        toks = np.array(prompts[0] + prompts[1], dtype=np.int32)
        poss = np.concatenate([np.arange(len(p), dtype=np.int32) for p in prompts])
        seqs = np.array([0] * len(prompts[0]) + [1] * len(prompts[1]), dtype=np.int32)
        outs = np.array([len(prompts[0]) - 1, len(toks) - 1], dtype=np.int32)
        batch = Batch(toks, poss, seqs, outs)
        got: list[list[int]] = [[], []]
        rows: list[list[np.ndarray]] = [[], []]
        for _ in range(4):
            logits = tiny.logits(batch, cache)
            for s in range(2):
                rows[s].append(logits[s])
                got[s].append(int(np.argmax(logits[s])))
            poss = np.array([len(prompts[0]) + len(got[0]) - 1, len(prompts[1]) + len(got[1]) - 1], dtype=np.int32)
            batch = Batch(np.array([got[0][-1], got[1][-1]], dtype=np.int32), poss, np.array([0, 1], np.int32),
                          np.array([0, 1], dtype=np.int32))
    finally:
        cache.close()
    for s in range(2):
        assert got[s] == solo[s][0]
        assert rel_err(np.stack(rows[s]), solo[s][1]) < tol(tiny.spec, 1e-5)


# ----------------------------------------------------------------------------------------------------------------
# the reference's RoPE pinned to ggml's rope_ext op (so the reference's conventions are ggml's)
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bare_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = tmp_path_factory.mktemp("bare") / "llama.gguf"
    write_gguf(path, llama_spec(n_layer=1))
    b = load_backend(path, RuntimeOptions(threads=1))
    try:
        yield b
    finally:
        b.close()


@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
@pytest.mark.parametrize("n_rot,freqs,freq_scale", [(16, False, 1.0), (8, False, 1.0), (16, True, 0.25)],
                         ids=["full", "partial", "factors+scale"])
def test_reference_rope_is_ggml_rope(bare_backend: Any, neox: bool, n_rot: int, freqs: bool,
                                     freq_scale: float) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 16)).astype(np.float32)  # (n_tokens, n_head, head_dim) = ggml [16, 3, 5]
    pos = np.array([0, 1, 7, 30, 123], dtype=np.int32)
    ff = np.linspace(1.0, 8.0, n_rot // 2).astype(np.float32) if freqs else None
    ctx = bare_backend.new_context()
    try:
        t = ctx.from_numpy(x).rope(ctx, ctx.from_numpy(pos), n_rot, 10000.0, neox=neox,
                                   freq_factors=ctx.from_numpy(ff) if ff is not None else None,
                                   freq_scale=freq_scale)
        ctx.forward(t).compute(t)
        got = np.array(t.numpy()).reshape(x.shape)
    finally:
        ctx.close()
    want = rope(x.astype(np.float64), pos, n_rot, 10000.0, neox=neox, freq_factors=ff, freq_scale=freq_scale)
    np.testing.assert_allclose(got, want, atol=2e-5)
    # and the two modes really differ (the pairing matters)
    other = rope(x.astype(np.float64), pos, n_rot, 10000.0, neox=not neox, freq_factors=ff, freq_scale=freq_scale)
    assert np.max(np.abs(other - want)) > 0.1


def test_reference_gelu_is_ggml_gelu(bare_backend: Any) -> None:
    x = np.linspace(-12.0, 12.0, 4001).astype(np.float32)
    ctx = bare_backend.new_context()
    try:
        t = ctx.from_numpy(x).gelu(ctx)
        ctx.forward(t).compute(t)
        got = np.array(t.numpy(), dtype=np.float64)
    finally:
        ctx.close()
    want = gelu_ggml_cpu(x.astype(np.float64))
    # f32 tanh may differ from the C library's tanhf in the last bit, which can flip an f16 rounding: allow one
    # f16 ulp, but nearly all entries must be exact.
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
    big = np.abs(want) > 1e-3
    assert np.mean(got[big] == want[big]) > 0.99
    assert np.max(np.abs(got - gelu_tanh(x.astype(np.float64)))) < 1e-2  # the f16 table is close to tanh GeLU


def test_case_files_are_what_llama_cpp_writes(tmp_path: Path) -> None:
    """Spot-check of the tiny files' layout (keys under the architecture prefix, GGUF tensor names/shapes)."""
    import gguf

    path = tmp_path / "g3.gguf"
    write_gguf(path, gemma3_spec())
    r = gguf.GGUFReader(str(path))
    keys = set(r.fields)
    assert {"general.architecture", "gemma3.block_count", "gemma3.attention.sliding_window",
            "gemma3.attention.key_length", "tokenizer.ggml.tokens"} <= keys
    shapes = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    assert shapes["blk.0.attn_q.weight"] == [32, 64]  # ggml order [n_embd, n_head * head_dim]
    assert shapes["blk.0.attn_k_norm.weight"] == [16]
    assert "output.weight" not in shapes  # gemma ties its output to token_embd
