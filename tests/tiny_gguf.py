"""Tiny random-weight GGUF files for model tests: metadata keys and tensor names as llama.cpp's convert_hf_to_gguf
writes them, f32 weights, and a minimal fake tokenizer vocabulary.

`TinySpec` is the test's own description of a model (the truth the numpy reference in test_models_tiny.py works
from); `make_weights` draws its tensors (numpy order: a ggml [n_in, n_out] matrix is an array of shape
(n_out, n_in)); `write_gguf` writes spec + tensors, after optional edits (drop / add / replace tensors) for the
loader tests. Nothing here imports the project's `models` or `ml` packages.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

N_VOCAB = 64


@dataclass(frozen=True)
class TinySpec:
    arch: str
    n_embd: int = 32
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 8
    n_layer: int = 2
    n_ff: int = 48
    n_vocab: int = N_VOCAB
    eps: float = 1e-5
    rope_base: float = 10000.0
    rope_dim: int | None = None  # None: head_dim
    rope_freqs: tuple[float, ...] | None = None  # llama3-style per-pair frequency divisors
    rope_scale_factor: float | None = None  # `rope.scaling.factor` (linear), when written
    qkv_bias: bool = False
    tied: bool = True  # no output.weight: the output reuses token_embd
    qk_norm: bool = False
    post_norms: bool = False
    window: int = 0  # attention.sliding_window (0: not written)
    attn_softcap: float = 0.0  # written when > 0
    final_softcap: float = 0.0  # written when > 0
    write_key_length: bool = False  # attention.key_length / value_length
    write_vocab_size: bool = True  # `<arch>.vocab_size`; else n_vocab comes from the token list only
    tokenizer: str = "gpt2"  # "gpt2" (BPE, merges) or "llama" (SentencePiece, scores)
    q_gain: float = 1.0  # multiplies attn_q weights: larger attention scores (softcaps and masks then matter)
    embd_std: float = 0.2  # small embeddings: the blocks, not the input token, dominate the residual stream
    extra_kv: dict[str, Any] = field(default_factory=dict)
    image_tokens: bool = False  # llama vocabulary: the last two entries become <start_of_image> / <end_of_image>;
    # gpt2 vocabulary: the last becomes <|image|>

    @property
    def n_rot(self) -> int:
        return self.rope_dim if self.rope_dim is not None else self.head_dim

    def with_(self, **kw: Any) -> TinySpec:
        return replace(self, **kw)


def llama_spec(**kw: Any) -> TinySpec:
    return TinySpec(arch="llama", **kw)


def qwen2_spec(**kw: Any) -> TinySpec:
    base: dict[str, Any] = dict(arch="qwen2", qkv_bias=True, tied=False, rope_base=1000000.0, eps=1e-6,
                                write_vocab_size=False)
    base.update(kw)
    return TinySpec(**base)


def gemma2_spec(**kw: Any) -> TinySpec:
    base: dict[str, Any] = dict(arch="gemma2", n_layer=3, head_dim=16, write_key_length=True, post_norms=True,
                                window=4, attn_softcap=2.0, final_softcap=6.0, eps=1e-6, tokenizer="llama",
                                q_gain=3.0)
    base.update(kw)
    return TinySpec(**base)


def gemma3_spec(**kw: Any) -> TinySpec:
    base: dict[str, Any] = dict(arch="gemma3", n_layer=7, head_dim=16, n_head=4, n_head_kv=1,
                                write_key_length=True, post_norms=True, qk_norm=True, window=3, eps=1e-6,
                                rope_base=1000000.0, tokenizer="llama", q_gain=2.0)
    base.update(kw)
    return TinySpec(**base)


def make_weights(spec: TinySpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Random f32 tensors under their GGUF names, numpy order."""
    rng = np.random.default_rng(seed)

    def mat(n_in: int, n_out: int, gain: float = 1.0) -> np.ndarray:
        return np.asarray(rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in), dtype=np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    def vec(n: int) -> np.ndarray:
        return (0.5 * rng.standard_normal(n)).astype(np.float32)

    s = spec
    q_out, kv_out = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    w: dict[str, np.ndarray] = {"token_embd.weight": (s.embd_std * rng.standard_normal((s.n_vocab, s.n_embd))).astype(np.float32)}
    if s.rope_freqs is not None:
        w["rope_freqs.weight"] = np.asarray(s.rope_freqs, dtype=np.float32)
    for il in range(s.n_layer):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = norm(s.n_embd)
        w[p + "attn_q.weight"] = mat(s.n_embd, q_out, s.q_gain)
        w[p + "attn_k.weight"] = mat(s.n_embd, kv_out)
        w[p + "attn_v.weight"] = mat(s.n_embd, kv_out)
        if s.qkv_bias:
            w[p + "attn_q.bias"] = vec(q_out)
            w[p + "attn_k.bias"] = vec(kv_out)
            w[p + "attn_v.bias"] = vec(kv_out)
        if s.qk_norm:
            w[p + "attn_q_norm.weight"] = norm(s.head_dim)
            w[p + "attn_k_norm.weight"] = norm(s.head_dim)
        w[p + "attn_output.weight"] = mat(q_out, s.n_embd)
        if s.post_norms:
            w[p + "post_attention_norm.weight"] = norm(s.n_embd)
        w[p + "ffn_norm.weight"] = norm(s.n_embd)
        w[p + "ffn_gate.weight"] = mat(s.n_embd, s.n_ff)
        w[p + "ffn_up.weight"] = mat(s.n_embd, s.n_ff)
        w[p + "ffn_down.weight"] = mat(s.n_ff, s.n_embd)
        if s.post_norms:
            w[p + "post_ffw_norm.weight"] = norm(s.n_embd)
    w["output_norm.weight"] = norm(s.n_embd)
    if not s.tied:
        w["output.weight"] = mat(s.n_embd, s.n_vocab, 4.0)
    return w


def _vocab(spec: TinySpec, writer: gguf.GGUFWriter) -> None:
    n = spec.n_vocab
    if spec.tokenizer == "gpt2":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", ".", ",", "Ċ"]
        merged = ["Ġt", "Ġa", "he", "in", "Ġthe", "er", "on", "Ġs", "at", "en"]
        tokens = (specials + chars + merged + [f"<extra_{i}>" for i in range(n)])[:n]
        if spec.image_tokens:  # mllama's: the last entry becomes <|image|>
            tokens[-1] = "<|image|>"
        control = [t in specials or t.startswith(("<extra", "<|image")) for t in tokens]
        types = [gguf.TokenType.CONTROL if c else gguf.TokenType.NORMAL for c in control]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(["Ġ t", "Ġ a", "h e", "i n", "Ġt he", "e r", "o n", "Ġ s", "a t", "e n"])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(0)
    else:
        specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
        pieces = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁the", "▁a", "."]
        tokens = (specials + pieces + [f"<unused{i}>" for i in range(n)])[:n]
        if spec.image_tokens:
            tokens[-2:] = ["<start_of_image>", "<end_of_image>"]
        types = [gguf.TokenType.CONTROL if t.startswith("<") else gguf.TokenType.NORMAL for t in tokens]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(i) for i in range(n)])
        writer.add_token_types(types)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_pad_token_id(0)


def add_kv(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    """One metadata key, typed by its Python value: bool, float32, uint32, array (list or tuple), else string."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        writer.add_string(key, str(value))


def write_gguf(path: str | Path, spec: TinySpec, tensors: dict[str, np.ndarray] | None = None, *, seed: int = 0,
               drop: tuple[str, ...] = (), add: dict[str, np.ndarray] | None = None,
               arch: str | None = None,
               types: dict[str, gguf.GGMLQuantizationType] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny GGUF; returns the tensors written (name -> numpy array). `drop` removes tensors, `add` adds
    or replaces some, `arch` overrides general.architecture (the metadata keys keep the spec's prefix), `types`
    stores some tensors in another ggml type (F16, BF16 or a quantized type) instead of F32."""
    s = spec
    w = dict(tensors) if tensors is not None else make_weights(s, seed)
    for name in drop:
        del w[name]
    w.update(add or {})
    writer = gguf.GGUFWriter(str(path), arch or s.arch)
    writer.add_name("tiny random model")  # not the family name: llama.cpp keys vocab quirks on it (phi-3)
    a = s.arch
    writer.add_uint32(f"{a}.context_length", 256)
    writer.add_uint32(f"{a}.embedding_length", s.n_embd)
    writer.add_uint32(f"{a}.block_count", s.n_layer)
    writer.add_uint32(f"{a}.feed_forward_length", s.n_ff)
    writer.add_uint32(f"{a}.attention.head_count", s.n_head)
    writer.add_uint32(f"{a}.attention.head_count_kv", s.n_head_kv)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", s.eps)
    writer.add_float32(f"{a}.rope.freq_base", s.rope_base)
    if s.arch in ("llama", "mistral") or s.rope_dim is not None:
        writer.add_uint32(f"{a}.rope.dimension_count", s.n_rot)
    if s.rope_scale_factor is not None:
        writer.add_string(f"{a}.rope.scaling.type", "linear")
        writer.add_float32(f"{a}.rope.scaling.factor", s.rope_scale_factor)
    if s.write_key_length:
        writer.add_uint32(f"{a}.attention.key_length", s.head_dim)
        writer.add_uint32(f"{a}.attention.value_length", s.head_dim)
    if s.window:
        writer.add_uint32(f"{a}.attention.sliding_window", s.window)
    if s.attn_softcap:
        writer.add_float32(f"{a}.attn_logit_softcapping", s.attn_softcap)
    if s.final_softcap:
        writer.add_float32(f"{a}.final_logit_softcapping", s.final_softcap)
    if s.write_vocab_size:
        writer.add_uint32(f"{a}.vocab_size", s.n_vocab)
    for k, v in s.extra_kv.items():
        add_kv(writer, k, v)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _vocab(s, writer)
    for name, arr in w.items():
        data = np.ascontiguousarray(arr, dtype=np.float32)
        qtype = (types or {}).get(name, gguf.GGMLQuantizationType.F32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return w


@dataclass(frozen=True)
class VisionSpec:
    """A tiny SigLIP tower + Gemma 3 projector (Ollama's single-file layout: `v.*`, `mm.*`, `<arch>.vision.*`)."""

    n_embd: int = 16
    n_head: int = 2
    n_layer: int = 2
    n_ff: int = 40
    image_size: int = 16
    patch_size: int = 4
    tokens_per_image: int = 4  # 4x4 patches pooled 2x2
    eps: float = 1e-6

    def kv(self, arch: str = "gemma3") -> dict[str, Any]:
        v = f"{arch}.vision."
        return {v + "block_count": self.n_layer, v + "embedding_length": self.n_embd,
                v + "attention.head_count": self.n_head, v + "feed_forward_length": self.n_ff,
                v + "image_size": self.image_size, v + "patch_size": self.patch_size, v + "num_channels": 3,
                v + "attention.layer_norm_epsilon": self.eps, f"{arch}.mm_tokens_per_image": self.tokens_per_image}


def make_vision_weights(vs: VisionSpec, n_text_embd: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Random f32 tower and projector tensors, numpy order (a conv kernel is (out, in, kh, kw), as in torch)."""
    rng = np.random.default_rng(seed)

    def mat(n_in: int, n_out: int) -> np.ndarray:
        return np.asarray(rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), dtype=np.float32)

    def vec(n: int, scale: float = 0.3, mean: float = 0.0) -> np.ndarray:
        return (mean + scale * rng.standard_normal(n)).astype(np.float32)

    d, ps = vs.n_embd, vs.patch_size
    n_patches = (vs.image_size // ps) ** 2
    w = {"v.patch_embedding.weight": (rng.standard_normal((d, 3, ps, ps)) / np.sqrt(3 * ps * ps)).astype(np.float32),
         "v.patch_embedding.bias": vec(d),
         "v.position_embedding.weight": (0.5 * rng.standard_normal((n_patches, d))).astype(np.float32)}
    for il in range(vs.n_layer):
        p = f"v.blk.{il}."
        for norm in ("layer_norm1", "layer_norm2"):
            w[p + norm + ".weight"], w[p + norm + ".bias"] = vec(d, 0.2, 1.0), vec(d, 0.2)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w[p + name + ".weight"], w[p + name + ".bias"] = mat(d, d) * (2.0 if name == "attn_q" else 1.0), vec(d)
        w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"] = mat(d, vs.n_ff), vec(vs.n_ff)
        w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"] = mat(vs.n_ff, d), vec(d)
    w["v.post_layernorm.weight"], w["v.post_layernorm.bias"] = vec(d, 0.2, 1.0), vec(d, 0.2)
    w["mm.mm_soft_emb_norm.weight"] = vec(d, 0.2, 1.0)
    # Hugging Face's (vision, text) matrix, stored as is (ggml [n_text, n_vision])
    w["mm.mm_input_projection.weight"] = (rng.standard_normal((d, n_text_embd)) / np.sqrt(d)).astype(np.float32)
    return w


# Ollama's names (make_vision_weights) -> llama.cpp's clip.cpp names (convert_hf_to_gguf's Gemma3VisionModel).
_CLIP_NAMES = {"patch_embedding": "patch_embd", "position_embedding": "position_embd", "post_layernorm": "post_ln",
               "layer_norm1": "ln1", "layer_norm2": "ln2", "attn_output": "attn_out", "mlp.fc1": "ffn_up",
               "mlp.fc2": "ffn_down", "mm_soft_emb_norm": "soft_emb_norm", "mm_input_projection": "input_projection"}


def clip_name(name: str) -> str:
    """A tower / projector tensor's name in a llama.cpp projector file (same data, same orientation)."""
    stem, _, suffix = name.rpartition(".")
    head, _, rest = stem.partition(".")  # "v" / "mm", then e.g. "blk.0.mlp.fc1"
    parts = rest.split(".")
    if parts[0] == "blk":
        return ".".join([head, *parts[:2], _CLIP_NAMES.get(".".join(parts[2:]), ".".join(parts[2:])), suffix])
    return ".".join([head, _CLIP_NAMES.get(rest, rest), suffix])


def write_projector_gguf(path: str | Path, vs: VisionSpec, vision: dict[str, np.ndarray], n_text_embd: int, *,
                         kv: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
                         add: dict[str, np.ndarray] | None = None, f16: bool = False) -> dict[str, np.ndarray]:
    """A llama.cpp-style projector file (`--mmproj`) holding the tower and projector `vision` (Ollama names, as
    make_vision_weights draws them) under clip.cpp's names and keys. `kv` adds or replaces keys (None removes one);
    `drop` / `add` edit tensors by their clip names; `f16` stores the matrices in F16, as real projector files do.
    Returns the tensors written."""
    w = {clip_name(k): v for k, v in vision.items()}
    for name in drop:
        del w[name]
    w.update(add or {})
    side = vs.image_size // vs.patch_size
    keys: dict[str, Any] = {
        "clip.projector_type": "gemma3", "clip.has_vision_encoder": True, "clip.use_gelu": True,
        "clip.vision.image_size": vs.image_size, "clip.vision.patch_size": vs.patch_size,
        "clip.vision.embedding_length": vs.n_embd, "clip.vision.feed_forward_length": vs.n_ff,
        "clip.vision.block_count": vs.n_layer, "clip.vision.attention.head_count": vs.n_head,
        "clip.vision.attention.layer_norm_epsilon": vs.eps, "clip.vision.projection_dim": n_text_embd,
        "clip.vision.image_mean": [0.5, 0.5, 0.5], "clip.vision.image_std": [0.5, 0.5, 0.5],
        # written by the converter when it is not Gemma 3's 4 (tiny test models)
        "clip.vision.projector.scale_factor": side // int(round(vs.tokens_per_image ** 0.5))}
    keys.update(kv or {})
    writer = gguf.GGUFWriter(str(path), "clip")
    for k, v in keys.items():
        if v is not None:
            add_kv(writer, k, v)
    for name, arr in w.items():
        wide = f16 and arr.ndim >= 2 and "position" not in name
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16 if wide else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return w
