"""The declarative weight loader (models.loader / models.registry) on tiny GGUFs: missing, misshapen and unused
tensors, tied embeddings, optional biases, alternates and unknown architectures."""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ggml import RuntimeOptions, load_backend
from ml.backend import Tensor
from ml.errors import MissingWeight, ModelLoadError, ShapeMismatch, UnsupportedArchitecture
from ml.module import Module, hyper, weight
from ml.nn import Linear
from models import load_model, supported_architectures
from models.loader import load_weights
from tiny_gguf import gemma3_spec, llama_spec, make_weights, qwen2_spec, write_gguf


@pytest.fixture
def open_gguf(tmp_path: Path) -> Iterator[Any]:
    """open_gguf(spec, **write_gguf kwargs) -> a loaded backend (closed after the test)."""
    backends: list[Any] = []

    def open_(spec: Any, **kw: Any) -> Any:
        path = tmp_path / f"m{len(backends)}.gguf"
        write_gguf(path, spec, **kw)
        b = load_backend(path, RuntimeOptions(threads=1))
        backends.append(b)
        return b

    yield open_
    for b in backends:
        b.close()


def _shape_in(msg: str, shape: tuple[int, ...]) -> bool:
    """Whether `msg` writes `shape` as a list or tuple: [32, 16] / (32, 16)."""
    inner = r",\s*".join(str(d) for d in shape)
    return re.search(rf"[\[(]{inner},?[\])]", msg) is not None


# ---- missing tensors ----

def test_missing_required_tensor_names_it(open_gguf: Any) -> None:
    b = open_gguf(llama_spec(), drop=("blk.1.attn_q.weight",))
    with pytest.raises(MissingWeight) as e:
        load_model(b)
    assert "blk.1.attn_q.weight" in str(e.value)
    assert isinstance(e.value, ModelLoadError)


def test_missing_arch_specific_tensor(open_gguf: Any) -> None:
    """q/k norms are optional in the shared block but required for gemma3."""
    b = open_gguf(gemma3_spec(), drop=("blk.2.attn_k_norm.weight",))
    with pytest.raises(MissingWeight) as e:
        load_model(b)
    assert "blk.2.attn_k_norm.weight" in str(e.value)


def test_missing_embedding(open_gguf: Any) -> None:
    """A tied model without token_embd.weight has neither embeddings nor output."""
    b = open_gguf(llama_spec(), drop=("token_embd.weight",))
    with pytest.raises(MissingWeight) as e:
        load_model(b)
    assert "token_embd.weight" in str(e.value)


@dataclass(kw_only=True)
class _Head(Module):
    params: Any = hyper()
    head: Linear = weight(alt=("lm_head", "embed_out"))
    scale: Tensor = weight(alt="logit_scale")


def test_missing_weight_lists_every_name_tried(open_gguf: Any) -> None:
    """A sub-module with alternates, and a leaf tensor with an alternate: every candidate name is reported."""
    b = open_gguf(llama_spec(n_layer=1))
    with pytest.raises(MissingWeight) as e:
        load_weights(_Head, b, None)
    msg = str(e.value)
    for name in ("head.weight", "lm_head.weight", "embed_out.weight"):
        assert name in msg, (name, msg)

    @dataclass(kw_only=True)
    class _Leaf(Module):
        params: Any = hyper()
        scale: Tensor = weight(alt="logit_scale")

    with pytest.raises(MissingWeight) as e:
        load_weights(_Leaf, b, None)
    msg = str(e.value)
    for name in ("scale", "scale.weight", "logit_scale", "logit_scale.weight"):
        assert re.search(rf"(^|[\s,;:]){re.escape(name)}($|[\s,;])", msg), (name, msg)


def test_alternate_name_is_used(open_gguf: Any) -> None:
    spec = llama_spec(n_layer=1)
    w = make_weights(spec)
    b = open_gguf(spec, tensors=w, add={"embed_out.weight": w["token_embd.weight"],
                                        "logit_scale.weight": np.ones(4, np.float32)})
    m, unused = load_weights(_Head, b, None)
    assert m.head.weight is b.get("embed_out.weight") and m.head.bias is None
    assert m.scale is b.get("logit_scale.weight")
    assert "embed_out.weight" not in unused and "logit_scale.weight" not in unused
    assert "token_embd.weight" in unused


# ---- shapes ----

def test_wrong_shape_names_expected_and_actual(open_gguf: Any) -> None:
    spec = llama_spec()  # attn_k: [n_embd, n_head_kv * head_dim] = [32, 16]
    b = open_gguf(spec, add={"blk.0.attn_k.weight": np.zeros((24, 32), np.float32)})  # ggml [32, 24]
    with pytest.raises(ShapeMismatch) as e:
        load_model(b)
    msg = str(e.value)
    assert "blk.0.attn_k.weight" in msg
    assert _shape_in(msg, (32, 24)) and _shape_in(msg, (32, 16)), msg
    assert re.search(r"expected[^\[(]*[\[(]32,\s*16", msg), "the expected shape is the one called expected"


def test_wrong_norm_and_embedding_shapes(open_gguf: Any) -> None:
    b = open_gguf(llama_spec(), add={"output_norm.weight": np.ones(31, np.float32)})
    with pytest.raises(ShapeMismatch, match="output_norm.weight"):
        load_model(b)
    b = open_gguf(llama_spec(), add={"token_embd.weight": np.zeros((64, 30), np.float32)})
    with pytest.raises(ShapeMismatch, match="token_embd.weight"):
        load_model(b)


def test_wrong_bias_shape(open_gguf: Any) -> None:
    b = open_gguf(qwen2_spec(), add={"blk.1.attn_v.bias": np.zeros(15, np.float32)})
    with pytest.raises(ShapeMismatch) as e:
        load_model(b)
    assert "blk.1.attn_v.bias" in str(e.value)
    assert _shape_in(str(e.value), (15,)) and _shape_in(str(e.value), (16,))


# ---- unused tensors ----

def test_unused_tensor_is_reported(open_gguf: Any, caplog: pytest.LogCaptureFixture) -> None:
    spec = llama_spec()
    extra = {"blk.0.attn_qkv_extra.weight": np.zeros((4, 4), np.float32), "mystery.weight": np.zeros(3, np.float32)}
    b = open_gguf(spec, add=extra)
    cls: Any = type(load_model(b))  # the architecture's class (the default load tolerates unused tensors)
    with caplog.at_level(logging.WARNING):
        model, unused = load_weights(cls, b, cls.read_params(b))
    assert sorted(unused) == sorted(extra)
    assert "mystery.weight" in caplog.text
    # load_model tolerates them by default and refuses them with strict=True, naming them
    load_model(b)
    with pytest.raises(ModelLoadError) as e:
        load_model(b, strict=True)
    assert "mystery.weight" in str(e.value) and "blk.0.attn_qkv_extra.weight" in str(e.value)


def test_complete_file_has_nothing_unused(open_gguf: Any) -> None:
    for spec in (llama_spec(), qwen2_spec(), gemma3_spec(), llama_spec(rope_freqs=(1.0, 1.0, 2.0, 4.0))):
        b = open_gguf(spec)
        load_model(b, strict=True)


# ---- tied embeddings and optional parts ----

def test_tied_embeddings(open_gguf: Any) -> None:
    b = open_gguf(llama_spec(tied=True))
    assert b.get("output.weight") is None
    m: Any = load_model(b, strict=True)
    assert m.output.weight is b.get("token_embd.weight")
    assert m.token_embd.weight is b.get("token_embd.weight")


def test_untied_output(open_gguf: Any) -> None:
    b = open_gguf(llama_spec(tied=False))
    m: Any = load_model(b, strict=True)
    assert m.output.weight is b.get("output.weight")
    assert m.output.weight is not m.token_embd.weight


def test_optional_biases_absent_and_present(open_gguf: Any) -> None:
    m: Any = load_model(open_gguf(llama_spec()), strict=True)
    for blk in m.blk:
        assert blk.attn_q.bias is None and blk.attn_k.bias is None and blk.attn_v.bias is None
        assert blk.attn_output.bias is None and blk.attn_q_norm is None and blk.post_ffw_norm is None
    assert m.rope_freqs is None

    b = open_gguf(qwen2_spec())
    m = load_model(b, strict=True)
    for il, blk in enumerate(m.blk):
        assert blk.attn_q.bias is b.get(f"blk.{il}.attn_q.bias")
        assert blk.attn_k.bias is b.get(f"blk.{il}.attn_k.bias")
        assert blk.attn_v.bias is b.get(f"blk.{il}.attn_v.bias")
        assert blk.attn_output.bias is None


def test_some_biases_present(open_gguf: Any) -> None:
    """Each Linear's bias is independent: only blk.0.attn_q has one here."""
    b = open_gguf(llama_spec(), add={"blk.0.attn_q.bias": np.zeros(32, np.float32)})
    m: Any = load_model(b, strict=True)
    assert m.blk[0].attn_q.bias is b.get("blk.0.attn_q.bias")
    assert m.blk[0].attn_k.bias is None and m.blk[1].attn_q.bias is None


def test_rope_freqs_optional_tensor(open_gguf: Any) -> None:
    b = open_gguf(llama_spec(rope_freqs=(1.0, 2.0, 4.0, 8.0)))
    m: Any = load_model(b, strict=True)
    assert m.rope_freqs is b.get("rope_freqs.weight")
    b = open_gguf(llama_spec(), add={"rope_freqs.weight": np.ones(3, np.float32)})  # rope_dim // 2 == 4
    with pytest.raises(ShapeMismatch, match="rope_freqs"):
        load_model(b)


# ---- architectures ----

def test_unknown_architecture_lists_supported(open_gguf: Any) -> None:
    b = open_gguf(llama_spec(n_layer=1), arch="fancyformer")
    with pytest.raises(UnsupportedArchitecture) as e:
        load_model(b)
    msg = str(e.value)
    assert "fancyformer" in msg
    supported = supported_architectures()
    assert {"llama", "qwen2", "gemma2", "gemma3"} <= set(supported)
    for arch in supported:
        assert arch in msg
    assert isinstance(e.value, ModelLoadError)


def test_mistral_uses_llama_layout(open_gguf: Any) -> None:
    m: Any = load_model(open_gguf(llama_spec(n_layer=1).with_(arch="mistral")), strict=True)
    assert type(m).__name__ == "Llama"
