"""Tiny random-weight models of the newer families (qwen3, qwen3moe, granite, olmo2, phi3) and every RoPE scaling
type, against the float64 reference in arch_reference.py.

Each case is a GGUF written as llama.cpp's converter writes that family (key and tensor names from gguf-py), and a
`Ref` that says what the reference should compute. Every case is checked on the whole prompt (all logits), on a
greedy continuation through the KV cache (tokens and per-step logits), with the F16 cache and fused attention, and
proves that each feature it exercises matters: switching it off in the reference moves the logits far outside the
tolerance (SENSITIVITY).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arch_reference import (Ref, forward, inv_freq_llama3, inv_freq_plain, inv_freq_yarn, longrope_magnitude,
                            yarn_magnitude)
from ggml import RuntimeOptions, load_backend
from ml.batch import Batch
from ml.dtype import DType
from ml.errors import ModelLoadError
from models import load_model, supported_architectures
from test_models_tiny import greedy_decode, model_logits
from tiny_gguf import TinySpec, llama_spec, make_weights, write_gguf

TOL = 1e-4  # max |model - reference| / max |reference|, as in test_models_tiny
PROMPT = [5, 17, 3, 42, 8, 29, 11, 60, 23, 7]
N_DECODE = 8


@dataclass(frozen=True)
class Case:
    spec: TinySpec
    edit: Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]  # weights as written
    ref: Callable[[TinySpec], Ref]
    sensitive: tuple[str, ...] = ()  # Ref.off switches (or "alt:<name>" alternative Refs) that must not match
    n_ctx_seq: int = 0
    alt: dict[str, Callable[[TinySpec], Ref]] | None = None


def base_ref(s: TinySpec, neox: bool, **kw: Any) -> Ref:
    kw.setdefault("inv_freq", lambda il: inv_freq_plain(s.rope_base, s.n_rot))
    return Ref(n_embd=s.n_embd, n_head=s.n_head, n_head_kv=s.n_head_kv, head_dim=s.head_dim, n_rot=s.n_rot,
               eps=s.eps, neox=neox, **kw)


def same(w: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return w


# ---- RoPE scaling on llama ----------------------------------------------------------------------------------------

def _yarn(factor: float, orig: int, fast: float = 32.0, slow: float = 1.0, log_mul: float = 0.0,
          attn: float = 1.0) -> Callable[[TinySpec], Ref]:
    return lambda s: base_ref(s, False, inv_freq=lambda il: inv_freq_yarn(s.rope_base, s.n_rot, factor, orig, fast,
                                                                          slow),
                              magnitude=lambda il: attn * yarn_magnitude(factor, log_mul))


def _linear(factor: float) -> Callable[[TinySpec], Ref]:
    return lambda s: base_ref(s, False, inv_freq=lambda il: inv_freq_plain(s.rope_base, s.n_rot) / factor)


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, old_ctx=64)


def _llama3_factors(w: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What convert_hf_to_gguf writes for rope_type llama3: rope_freqs = old inverse frequency / new."""
    inv = inv_freq_plain(10000.0, 8)
    w["rope_freqs.weight"] = (inv / inv_freq_llama3(10000.0, 8, **LLAMA3)).astype(np.float32)  # type: ignore[arg-type]
    return w


YARN_KV = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
           "llama.rope.scaling.original_context_length": 4096}


# ---- qwen3 / qwen3moe ---------------------------------------------------------------------------------------------

N_EXPERT, N_USED, N_FF_EXP = 4, 2, 16


def _experts(w: dict[str, np.ndarray], rng: np.random.Generator,
             layers: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """Replace dense FFNs (all, or those of `layers`) by a router and stacked experts (numpy order
    (n_expert, n_out, n_in))."""
    n_embd = w["token_embd.weight"].shape[1]
    for il in layers or range(1 + max(int(k.split(".")[1]) for k in w if k.startswith("blk."))):
        p = f"blk.{il}."
        for name in ("ffn_gate", "ffn_up", "ffn_down"):
            del w[p + name + ".weight"]
        w[p + "ffn_gate_inp.weight"] = (3.0 * rng.standard_normal((N_EXPERT, n_embd)) / np.sqrt(n_embd)).astype(
            np.float32)
        w[p + "ffn_gate_exps.weight"] = (rng.standard_normal((N_EXPERT, N_FF_EXP, n_embd)) / np.sqrt(n_embd)).astype(
            np.float32)
        w[p + "ffn_up_exps.weight"] = (rng.standard_normal((N_EXPERT, N_FF_EXP, n_embd)) / np.sqrt(n_embd)).astype(
            np.float32)
        w[p + "ffn_down_exps.weight"] = (rng.standard_normal((N_EXPERT, n_embd, N_FF_EXP)) / np.sqrt(N_FF_EXP)).astype(
            np.float32)
    return w


def qwen3_spec(arch: str = "qwen3", **kw: Any) -> TinySpec:
    base: dict[str, Any] = dict(arch=arch, qk_norm=True, tied=False, rope_base=1000000.0, eps=1e-6,
                                write_key_length=True)
    base.update(kw)
    return TinySpec(**base)


MOE_KV = {"qwen3moe.expert_count": N_EXPERT, "qwen3moe.expert_used_count": N_USED,
          "qwen3moe.expert_feed_forward_length": N_FF_EXP}


# ---- granite / olmo2 / phi3 ----------------------------------------------------------------------------------------

GRANITE_KV = {"granite.embedding_scale": 4.0, "granite.residual_scale": 0.5, "granite.attention.scale": 0.2,
              "granite.logit_scale": 3.0}


def _olmo2(w: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """No pre-norms; q/k norms over the whole projections."""
    for k in [k for k in w if k.endswith(("attn_norm.weight", "ffn_norm.weight"))]:
        del w[k]
    for k in [k for k in w if k.endswith(("attn_q_norm.weight", "attn_k_norm.weight"))]:
        rows = w[k.replace("_norm.weight", ".weight")].shape[0]
        w[k] = (1.0 + 0.2 * rng.standard_normal(rows)).astype(np.float32)
    return w


def olmo2_spec(**kw: Any) -> TinySpec:
    base: dict[str, Any] = dict(arch="olmo2", qk_norm=True, post_norms=True, tied=False, eps=1e-6)
    base.update(kw)
    return TinySpec(**base)


def _olmo2_yarn_ref(s: TinySpec, yarn_local: bool = False) -> Ref:
    """OLMo 3 style: YaRN on the full-attention layers only; window layers keep the plain base RoPE."""
    plain = inv_freq_plain(s.rope_base, s.n_rot)
    local = [il % 4 < 3 for il in range(s.n_layer)]
    yarn = inv_freq_yarn(s.rope_base, s.n_rot, 4.0, 4096)
    return base_ref(s, True, window=lambda il: 3 if local[il] else 0,
                    inv_freq=lambda il: plain if local[il] and not yarn_local else yarn,
                    magnitude=lambda il: 1.0 if local[il] and not yarn_local else 0.8 * yarn_magnitude(4.0))


def _phi3_unfused_qkv(w: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Phi-3 with separate q/k/v projections (create_tensor_qkv accepts both layouts)."""
    w = _phi3(w, rng)
    for k in [k for k in w if k.endswith("attn_qkv.weight")]:
        qkv = w.pop(k)
        nq = w[k.replace("attn_qkv", "attn_output")].shape[1]  # n_head * head_dim
        nk = (qkv.shape[0] - nq) // 2
        w[k.replace("qkv", "q")], w[k.replace("qkv", "k")], w[k.replace("qkv", "v")] = np.split(qkv, [nq, nq + nk])
    return w


def _olmo2_swa_ref(s: TinySpec, scale_local: bool = False) -> Ref:
    plain = inv_freq_plain(s.rope_base, s.n_rot)
    local = [il % 4 < 3 for il in range(s.n_layer)]
    return base_ref(s, True, window=lambda il: 3 if local[il] else 0,
                    inv_freq=lambda il: plain if local[il] and not scale_local else plain / 2.0)


SHORT = np.array([1.0, 1.2, 1.5, 2.0], dtype=np.float32)
LONG = np.array([1.0, 2.0, 6.0, 20.0], dtype=np.float32)
PHI3_KV = {"phi3.rope.scaling.original_context_length": 32,
           "phi3.rope.scaling.attn_factor": longrope_magnitude(256, 32)}


def _phi3(w: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fused QKV (rows q | k | v) and gate/up (gate rows first), LongRoPE factor tensors."""
    for il in range(1 + max(int(k.split(".")[1]) for k in w if k.startswith("blk."))):
        p = f"blk.{il}."
        w[p + "attn_qkv.weight"] = np.concatenate([w.pop(p + f"attn_{x}.weight") for x in "qkv"])
        w[p + "ffn_up.weight"] = np.concatenate([w.pop(p + "ffn_gate.weight"), w[p + "ffn_up.weight"]])
    w["rope_factors_short.weight"], w["rope_factors_long.weight"] = SHORT, LONG
    return w


def phi3_spec(**kw: Any) -> TinySpec:
    base: dict[str, Any] = dict(arch="phi3", tied=False, rope_dim=8, extra_kv=PHI3_KV)
    base.update(kw)
    return TinySpec(**base)


def _phi3_ref(factors: np.ndarray, window: int = 0) -> Callable[[TinySpec], Ref]:
    return lambda s: base_ref(s, True, inv_freq=lambda il: inv_freq_plain(s.rope_base, s.n_rot) / factors,
                              magnitude=lambda il: longrope_magnitude(256, 32), window=lambda il: window)


def _llama4(w: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Layers 1 and 3 (interleave step 2) route to experts, with a shared expert beside."""
    n_embd = w["token_embd.weight"].shape[1]
    w = _experts(w, rng, layers=(1, 3))
    for il in (1, 3):
        p = f"blk.{il}."
        w[p + "ffn_gate_shexp.weight"] = (rng.standard_normal((N_FF_EXP, n_embd)) / np.sqrt(n_embd)).astype(np.float32)
        w[p + "ffn_up_shexp.weight"] = (rng.standard_normal((N_FF_EXP, n_embd)) / np.sqrt(n_embd)).astype(np.float32)
        w[p + "ffn_down_shexp.weight"] = (rng.standard_normal((n_embd, N_FF_EXP)) / np.sqrt(N_FF_EXP)).astype(
            np.float32)
    return w


LLAMA4_KV = {"llama4.expert_count": N_EXPERT, "llama4.expert_used_count": 1,
             "llama4.expert_feed_forward_length": N_FF_EXP, "llama4.interleave_moe_layer_step": 2,
             "llama4.attention.chunk_size": 3, "llama4.attention.temperature_length": 2,
             "llama4.attention.temperature_scale": 0.5}


def _llama4_ref(s: TinySpec) -> Ref:
    return base_ref(s, False, nope=lambda il: (il + 1) % 4 == 0, chunk=lambda il: 3 if il % 4 < 3 else 0,
                    q_temp=lambda pos: 1 + 0.5 * np.log(np.floor((pos + 1) / 2) + 1), qk_rms=True,
                    moe_sigmoid=True, n_expert_used=1)


CASES: dict[str, Case] = {
    "rope-linear": Case(llama_spec(rope_scale_factor=4.0), same, _linear(4.0), ("alt:unscaled",),
                        alt={"unscaled": _linear(1.0)}),
    "rope-none": Case(llama_spec(extra_kv={"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}),
                      same, _linear(1.0), ("alt:linear",), alt={"linear": _linear(4.0)}),
    "rope-yarn": Case(llama_spec(extra_kv=YARN_KV), same, _yarn(4.0, 4096), ("no_magnitude", "alt:linear"),
                      alt={"linear": _linear(4.0)}),
    "rope-yarn-betas-attn": Case(
        llama_spec(extra_kv=dict(YARN_KV, **{"llama.rope.scaling.yarn_beta_fast": 4.0,
                                             "llama.rope.scaling.yarn_beta_slow": 0.25,
                                             "llama.rope.scaling.yarn_log_multiplier": 0.5,
                                             "llama.rope.scaling.attn_factor": 0.8})),
        same, _yarn(4.0, 4096, 4.0, 0.25, 0.5, 0.8), ("alt:default_betas", "no_magnitude"),
        alt={"default_betas": _yarn(4.0, 4096, log_mul=0.5, attn=0.8)}),
    "rope-llama3": Case(llama_spec(), _llama3_factors,
                        lambda s: base_ref(s, False, inv_freq=lambda il: inv_freq_llama3(s.rope_base, s.n_rot,
                                                                                         **LLAMA3)),  # type: ignore[arg-type]
                        ("alt:unscaled",), alt={"unscaled": _linear(1.0)}),
    "qwen3": Case(qwen3_spec(), same, lambda s: base_ref(s, True), ("no_qk_norm",)),
    "qwen3moe": Case(qwen3_spec("qwen3moe", extra_kv=MOE_KV), _experts,
                     lambda s: base_ref(s, True, n_expert_used=N_USED, expert_norm=True),
                     ("no_qk_norm", "no_expert_norm")),
    "qwen3moe-unnormed": Case(qwen3_spec("qwen3moe", extra_kv=dict(MOE_KV, **{"qwen3moe.expert_weights_norm": False})),
                              _experts, lambda s: base_ref(s, True, n_expert_used=N_USED, expert_norm=False),
                              ("alt:normed",),
                              alt={"normed": lambda s: base_ref(s, True, n_expert_used=N_USED, expert_norm=True)}),
    "granite": Case(TinySpec(arch="granite", extra_kv=GRANITE_KV), same,
                    lambda s: base_ref(s, False, embed_scale=4.0, residual_scale=0.5, attn_scale=0.2, logit_scale=3.0),
                    ("no_embed_scale", "no_residual_scale", "no_attn_scale", "no_logit_scale")),
    "olmo2": Case(olmo2_spec(), _olmo2, lambda s: base_ref(s, True), ("no_qk_norm", "no_post_norms")),
    "olmo2-sliding-window": Case(
        olmo2_spec(n_layer=4, window=3, rope_scale_factor=2.0), _olmo2, _olmo2_swa_ref,
        ("no_window", "alt:scaled_local"), alt={"scaled_local": lambda s: _olmo2_swa_ref(s, True)}),
    "olmo2-sliding-window-yarn": Case(
        olmo2_spec(n_layer=4, window=3, extra_kv={"olmo2.rope.scaling.type": "yarn", "olmo2.rope.scaling.factor": 4.0,
                                                  "olmo2.rope.scaling.original_context_length": 4096,
                                                  "olmo2.rope.scaling.attn_factor": 0.8}),
        _olmo2, _olmo2_yarn_ref, ("alt:yarn_local",), alt={"yarn_local": lambda s: _olmo2_yarn_ref(s, True)}),
    "phi3-unfused-qkv": Case(phi3_spec(), _phi3_unfused_qkv, _phi3_ref(SHORT), (), n_ctx_seq=32),
    "phi3-short": Case(phi3_spec(), _phi3, _phi3_ref(SHORT), ("alt:long", "no_magnitude"), n_ctx_seq=32,
                       alt={"long": _phi3_ref(LONG)}),
    "phi3-long": Case(phi3_spec(), _phi3, _phi3_ref(LONG), ("alt:short",), n_ctx_seq=33,
                      alt={"short": _phi3_ref(SHORT)}),
    "mistral3": Case(TinySpec(arch="mistral3", rope_dim=8, extra_kv={"mistral3.rope.scaling.original_context_length": 4,
                                                                    "mistral3.rope.scaling_beta": 0.5}),
                     same, lambda s: base_ref(s, False, q_temp=lambda pos: 1 + 0.5 * np.log(1 + np.floor(pos / 4))),
                     ("no_temperature",)),
    "llama4": Case(TinySpec(arch="llama4", n_layer=4, rope_dim=8, extra_kv=LLAMA4_KV), _llama4, _llama4_ref,
                   ("no_nope", "no_chunk", "no_temperature", "no_qk_norm", "no_shared_expert")),
    "phi3-sliding-window": Case(phi3_spec(window=5), _phi3, _phi3_ref(SHORT, 5), ("no_window",), n_ctx_seq=16),
}


@dataclass
class Loaded:
    name: str
    case: Case
    weights: dict[str, np.ndarray]
    backend: Any
    model: Any

    def ref(self, tokens: list[int], chosen: list[Any] | None = None, **off: bool) -> np.ndarray:
        r = self.case.ref(self.case.spec)
        return forward(replace(r, off=off), self.weights, tokens, chosen)

    def cache(self, dtype: DType = DType.F32, flash: bool = False) -> Any:
        c = self.model.new_cache(flash=flash, n_ctx_seq=self.case.n_ctx_seq)
        c.init(self.backend, dtype, 1, 256, 64)
        return c

    def logits(self, batch: Batch, cache: Any) -> np.ndarray:
        return model_logits(self.backend, self.model, batch, cache)

    def greedy(self, n: int, **cache_kw: Any) -> tuple[list[int], np.ndarray]:
        return greedy_decode(self.backend, self.model, self.cache(**cache_kw), PROMPT, n)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def load_case(name: str, case: Case, path: Path) -> Loaded:
    seed = sum(map(ord, name))
    weights = case.edit(make_weights(case.spec, seed), np.random.default_rng(seed + 1))
    write_gguf(path, case.spec, weights)
    backend = load_backend(path, RuntimeOptions(threads=1))
    return Loaded(name, case, weights, backend, load_model(backend, strict=True))


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    loaded = load_case(request.param, CASES[request.param], tmp_path_factory.mktemp("arch") / "m.gguf")
    try:
        yield loaded
    finally:
        loaded.backend.close()


def test_prompt_logits_match_reference(tiny: Loaded) -> None:
    cache = tiny.cache()
    try:
        got = tiny.logits(Batch.single(PROMPT, all_logits=True), cache)
    finally:
        cache.close()
    assert rel_err(got, tiny.ref(PROMPT)) < TOL


def test_reference_is_sensitive_to_each_feature(tiny: Loaded) -> None:
    want = tiny.ref(PROMPT)
    for variant in tiny.case.sensitive:
        if variant.startswith("alt:"):
            assert tiny.case.alt is not None
            other = forward(tiny.case.alt[variant[4:]](tiny.case.spec), tiny.weights, PROMPT)
        else:
            other = tiny.ref(PROMPT, **{variant: True})
        assert rel_err(other, want) > 30 * TOL, variant


def test_greedy_and_step_logits_match_reference(tiny: Loaded) -> None:
    tokens, rows = tiny.greedy(N_DECODE)
    full = tiny.ref(PROMPT + tokens[:-1])
    assert rel_err(rows, full[len(PROMPT) - 1:]) < TOL
    assert tokens == [int(np.argmax(r)) for r in full[len(PROMPT) - 1:]]


@pytest.mark.parametrize("flash", [False, True], ids=["f16-cache", "f16-cache-flash"])
def test_f16_cache_and_flash_attention(tiny: Loaded, flash: bool) -> None:
    tokens, rows = tiny.greedy(N_DECODE, dtype=DType.F16, flash=flash)
    want = tiny.ref(PROMPT + tokens[:-1])[len(PROMPT) - 1:]
    assert rel_err(rows, want) < 5e-3


def test_moe_tokens_pick_different_experts(tmp_path: Path) -> None:
    """The prompt's tokens are routed to different expert pairs in every layer (else one expert path would
    pass for MoE), and the model's logits follow the reference's routing."""
    loaded = load_case("qwen3moe", CASES["qwen3moe"], tmp_path / "moe.gguf")
    try:
        chosen: list[list[tuple[int, ...]]] = []
        loaded.ref(PROMPT, chosen)
        assert len(chosen) == loaded.case.spec.n_layer
        for layer in chosen:
            assert len(set(layer)) >= 3, layer
        # one token at a time: each forward routes a single token; the whole prompt routes all in one batch
        cache = loaded.cache()
        try:
            steps = np.concatenate([loaded.logits(Batch.single([t], i), cache) for i, t in enumerate(PROMPT)])
        finally:
            cache.close()
        assert rel_err(steps, loaded.ref(PROMPT)) < TOL
    finally:
        loaded.backend.close()


def test_unknown_rope_scaling_type_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    write_gguf(path, llama_spec(extra_kv={"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0}))
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        with pytest.raises(ModelLoadError, match=r"rope\.scaling\.type 'llama3'.*none, linear, yarn, longrope"):
            load_model(backend)
    finally:
        backend.close()


def test_registry_lists_the_new_architectures(tmp_path: Path) -> None:
    new = {"granite", "llama4", "mistral3", "nomic-bert", "olmo2", "phi3", "qwen3", "qwen3moe"}
    assert new <= set(supported_architectures())
    path = tmp_path / "x.gguf"
    write_gguf(path, llama_spec(), arch="mamba")
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        with pytest.raises(ModelLoadError, match=r"unsupported architecture 'mamba'.*qwen3moe"):
            load_model(backend)
    finally:
        backend.close()


def test_yarn_cache_shift_is_a_pure_rotation(tmp_path: Path) -> None:
    """Shifting keys roped at position p by d gives the keys roped at p + d: the YaRN magnitude is not applied
    twice (llama.cpp's shift applies it again)."""
    loaded = load_case("rope-yarn", CASES["rope-yarn"], tmp_path / "y.gguf")
    try:
        from models.decoder import rope as model_rope

        rng = np.random.default_rng(3)
        k = rng.standard_normal((4, 2, 8)).astype(np.float32)  # (n, n_head_kv, head_dim)
        pos = np.array([0, 3, 9, 20], dtype=np.int32)
        ctx = loaded.backend.new_context()
        try:
            p = loaded.model.params
            at = model_rope(ctx, ctx.from_numpy(k), ctx.from_numpy(pos), 0, p, None)
            shifted = loaded.model.shift(ctx, 0, at, ctx.from_numpy(np.full(4, 7, dtype=np.int32)))
            direct = model_rope(ctx, ctx.from_numpy(k), ctx.from_numpy(pos + 7), 0, p, None)
            ctx.forward(shifted, direct).compute(shifted, direct)
            np.testing.assert_allclose(shifted.numpy(), direct.numpy(), rtol=1e-4, atol=1e-5)
        finally:
            ctx.close()
    finally:
        loaded.backend.close()


def _load_error(tmp_path: Path, name: str, spec: TinySpec, edit: Callable[[dict[str, np.ndarray]], None]) -> str:
    case = CASES[name]
    w = case.edit(make_weights(spec, 1), np.random.default_rng(2))
    edit(w)
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, spec, w)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        with pytest.raises(ModelLoadError) as e:
            load_model(backend)
        return str(e.value)
    finally:
        backend.close()


def test_expert_shapes_and_counts_are_checked_at_load(tmp_path: Path) -> None:
    def fewer_experts(w: dict[str, np.ndarray]) -> None:
        w["blk.1.ffn_up_exps.weight"] = w["blk.1.ffn_up_exps.weight"][:3]

    msg = _load_error(tmp_path, "qwen3moe", CASES["qwen3moe"].spec, fewer_experts)
    assert "blk.1.ffn_up_exps.weight" in msg and "[32, 16, 4]" in msg
    too_many = CASES["qwen3moe"].spec.with_(extra_kv=dict(MOE_KV, **{"qwen3moe.expert_used_count": 5}))
    assert "expert_used_count" in _load_error(tmp_path, "qwen3moe", too_many, lambda w: None)


def test_phi3_needs_a_qkv_projection(tmp_path: Path) -> None:
    msg = _load_error(tmp_path, "phi3-short", CASES["phi3-short"].spec, lambda w: w.pop("blk.0.attn_qkv.weight"))
    assert "attn_qkv" in msg


@pytest.mark.parametrize("spec,match", [
    (TinySpec(arch="granite", extra_kv=dict(GRANITE_KV, **{"granite.logit_scale": 0.0})), "granite.logit_scale"),
    (TinySpec(arch="granite", extra_kv=dict(GRANITE_KV, **{"granite.residual_scale": float("nan")})),
     "granite.residual_scale"),
    (llama_spec(extra_kv=dict(YARN_KV, **{"llama.rope.scaling.yarn_beta_slow": -1.0})), "yarn_beta_slow"),
    (llama_spec(extra_kv=dict(YARN_KV, **{"llama.rope.scaling.factor": -4.0})), "rope.scaling.factor"),
], ids=["granite-logit-scale-0", "granite-residual-nan", "yarn-negative-beta", "yarn-negative-factor"])
def test_bad_scales_are_load_errors(tmp_path: Path, spec: TinySpec, match: str) -> None:
    path = tmp_path / "bad.gguf"
    write_gguf(path, spec)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        with pytest.raises(ModelLoadError, match=match):
            load_model(backend)
    finally:
        backend.close()


@pytest.mark.parametrize("name", ["qwen3moe", "llama4"])
def test_moe_logits_do_not_depend_on_batching(tmp_path: Path, name: str) -> None:
    """A sequence's logits are bit-identical alone and next to another sequence (whose tokens route to other
    experts) in the same batch: routing and mul_mat_id keep results batch-invariant. Every token's logits are
    asked for: ggml multiplies F32 weights by a single row in another order than by several (a GEMV path; the
    quantized weights of real files do not), and the tiny files are F32."""
    loaded = load_case(name, CASES[name], tmp_path / "m.gguf")
    other = [9, 4, 33, 2, 50, 13, 61]
    try:
        def run(parts: list[tuple[list[int], int]]) -> np.ndarray:
            c = loaded.model.new_cache(flash=True)
            c.init(loaded.backend, DType.F16, 2, 256, 64)
            try:
                toks = np.array([t for p, _ in parts for t in p], np.int32)
                pos = np.concatenate([np.arange(len(p)) for p, _ in parts]).astype(np.int32)
                seqs = np.array([s for p, s in parts for _ in p], np.int32)
                return loaded.logits(Batch(toks, pos, seqs, np.arange(len(toks), dtype=np.int32)), c)
            finally:
                c.close()

        alone = run([(PROMPT, 0)])
        assert np.array_equal(run([(other, 1), (PROMPT, 0)])[len(other):], alone)
        assert np.array_equal(run([(PROMPT, 0), (other, 1)])[:len(PROMPT)], alone)
    finally:
        loaded.backend.close()
