"""Tests for the Hugging Face BERT → GGUF converter (models/convert).

A tiny synthetic BERT folder (random weights) covers the converter everywhere; test_convert_minilm.py checks the
output for the real all-MiniLM-L6-v2 folder against the facts of llama.cpp's converter.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file, save_file

from models.convert import ConversionError, convert, main

F32, F16, Q8_0 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0

# ---------------------------------------------------------------------------------------------------------------
# helpers


def _fields(reader: GGUFReader) -> dict[str, Any]:
    """All KV pairs (not the three GGUF header pseudo-fields) as Python values."""
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _tensors(reader: GGUFReader) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def _check_tensor_data(t: Any, src: npt.NDArray[np.float32]) -> None:
    """The stored tensor equals `src` (numpy layout rows × cols) to the precision of its type."""
    # GGUF ne order is numpy's shape reversed
    assert [int(d) for d in t.shape] == list(reversed(src.shape)), t.name
    qtype = GGMLQuantizationType(t.tensor_type)
    if qtype == F32:
        assert t.data.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(t.data).reshape(src.shape), src, err_msg=t.name)
    elif qtype == F16:
        assert t.data.dtype == np.float16
        np.testing.assert_array_equal(np.asarray(t.data).reshape(src.shape), src.astype(np.float16), err_msg=t.name)
    elif qtype == Q8_0:
        raw = np.asarray(t.data)
        np.testing.assert_array_equal(raw.reshape(-1), quantize(src, Q8_0).reshape(-1), err_msg=t.name)
        deq = dequantize(raw, Q8_0).reshape(src.shape)
        # one Q8_0 step is max|block| / 127: rounding is within half a step, plus 127 × the scale's f16 error
        step = np.abs(src.reshape(-1, 32)).max(axis=1, keepdims=True) / 127.0
        err = np.abs(deq.reshape(-1, 32) - src.reshape(-1, 32))
        assert np.all(err <= step * 0.6 + 1e-7), t.name
    else:  # pragma: no cover - the converter writes no other type
        raise AssertionError(f"{t.name}: unexpected type {qtype!r}")


# ---------------------------------------------------------------------------------------------------------------
# a tiny synthetic BERT folder

HIDDEN, HEADS, LAYERS, FF, CTX, TYPES = 48, 4, 2, 64, 40, 2
VOCAB = [
    "[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "the", "hello", "world", "##s", "##lo", ",", ".", "a", "b",
]
SPECIALS = {"[PAD]": 0, "[UNK]": 2, "[CLS]": 3, "[SEP]": 4, "[MASK]": 5}
USER_TOKEN, USER_ID = "my\u2581token", 15  # a non-special added token
N_VOCAB = 17  # id 16 is a hole in the vocab


def _tiny_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "hidden_size": HIDDEN,
        "intermediate_size": FF,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": CTX,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "type_vocab_size": TYPES,
        "vocab_size": N_VOCAB,
    }
    cfg.update(overrides)
    return cfg


def _tiny_weights(seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    """HF names → arrays, including the tensors the converter must drop."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w: dict[str, npt.NDArray[Any]] = {
        "embeddings.word_embeddings.weight": rand(N_VOCAB, HIDDEN),
        "embeddings.position_embeddings.weight": rand(CTX, HIDDEN),
        "embeddings.token_type_embeddings.weight": rand(TYPES, HIDDEN),
        "embeddings.LayerNorm.weight": rand(HIDDEN),
        "embeddings.LayerNorm.bias": rand(HIDDEN),
        "embeddings.position_ids": np.arange(CTX, dtype=np.int64).reshape(1, CTX),
        "pooler.dense.weight": rand(HIDDEN, HIDDEN),
        "pooler.dense.bias": rand(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            w[p + part + ".weight"] = rand(HIDDEN, HIDDEN)
            w[p + part + ".bias"] = rand(HIDDEN)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + norm + ".weight"] = rand(HIDDEN)
            w[p + norm + ".bias"] = rand(HIDDEN)
        w[p + "intermediate.dense.weight"] = rand(FF, HIDDEN)
        w[p + "intermediate.dense.bias"] = rand(FF)
        w[p + "output.dense.weight"] = rand(HIDDEN, FF)
        w[p + "output.dense.bias"] = rand(HIDDEN)
    return w


# HF name → GGUF name of every tensor the converter keeps
def _expected_names() -> dict[str, str]:
    names = {
        "embeddings.word_embeddings.weight": "token_embd.weight",
        "embeddings.position_embeddings.weight": "position_embd.weight",
        "embeddings.token_type_embeddings.weight": "token_types.weight",
        "embeddings.LayerNorm.weight": "token_embd_norm.weight",
        "embeddings.LayerNorm.bias": "token_embd_norm.bias",
    }
    parts = {
        "attention.self.query": "attn_q",
        "attention.self.key": "attn_k",
        "attention.self.value": "attn_v",
        "attention.output.dense": "attn_output",
        "attention.output.LayerNorm": "attn_output_norm",
        "intermediate.dense": "ffn_up",
        "output.dense": "ffn_down",
        "output.LayerNorm": "layer_output_norm",
    }
    for i in range(LAYERS):
        for hf, gg in parts.items():
            for suffix in ("weight", "bias"):
                names[f"encoder.layer.{i}.{hf}.{suffix}"] = f"blk.{i}.{gg}.{suffix}"
    return names


def _tokenizer_json() -> dict[str, Any]:
    added = [
        {"id": i, "content": tok, "special": True, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False}
        for tok, i in SPECIALS.items()
    ]
    added.append({"id": USER_ID, "content": USER_TOKEN, "special": False, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False})
    cls, sep = {"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}
    return {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [cls, {"Sequence": {"id": "A", "type_id": 0}}, sep],
            "pair": [cls, {"Sequence": {"id": "A", "type_id": 0}}, sep,
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [3], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [4], "tokens": ["[SEP]"]}},
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": {tok: i for i, tok in enumerate(VOCAB)}},
    }


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _write_bf16_safetensors(path: Path, tensors: dict[str, npt.NDArray[np.float32]]) -> None:
    """safetensors.numpy cannot write bfloat16: lay the file out by hand (header length, JSON header, data)."""
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, arr in tensors.items():
        if arr.dtype == np.float32:
            blob = (arr.view(np.uint32) >> 16).astype("<u2").tobytes()
            dtype = "BF16"
        else:
            blob = arr.astype("<i8").tobytes()
            dtype = "I64"
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _bf16_round(arr: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """What a float32 becomes after a trip through bfloat16 (truncation)."""
    return (arr.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def make_tiny_bert(root: Path, *, pooling: str | None = "cls", config: dict[str, Any] | None = None,
                   weights: dict[str, npt.NDArray[Any]] | None = None, tokenizer_json: bool = True) -> Path:
    """Write a complete tiny BERT folder under `root` and return it."""
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "config.json", config if config is not None else _tiny_config())
    save_file(weights if weights is not None else _tiny_weights(), str(root / "model.safetensors"))
    (root / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
    if tokenizer_json:
        _write_json(root / "tokenizer.json", _tokenizer_json())
    _write_json(root / "tokenizer_config.json", {
        "do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "cls_token": "[CLS]", "mask_token": "[MASK]", "tokenize_chinese_chars": True, "strip_accents": None,
        "tokenizer_class": "BertTokenizer", "model_max_length": CTX,
    })
    if pooling is not None:
        _write_json(root / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ])
        _write_json(root / "1_Pooling" / "config.json", {
            "word_embedding_dimension": HIDDEN,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
        })
    return root


@pytest.fixture()
def tiny_dir(tmp_path: Path) -> Path:
    return make_tiny_bert(tmp_path / "tiny-bert")


def _convert_tiny(tiny_dir: Path, tmp_path: Path, outtype: str) -> GGUFReader:
    out = tmp_path / f"tiny-{outtype}.gguf"
    convert(tiny_dir, out, outtype)
    return GGUFReader(out)


# ---------------------------------------------------------------------------------------------------------------
# tiny model: tensors


def test_tiny_f32_tensors_equal_source(tiny_dir: Path, tmp_path: Path) -> None:
    reader = _convert_tiny(tiny_dir, tmp_path, "f32")
    tensors = _tensors(reader)
    src = load_file(str(tiny_dir / "model.safetensors"))
    names = _expected_names()
    assert set(tensors) == set(names.values())
    assert len(tensors) == 5 + 16 * LAYERS
    for hf, gg in names.items():
        assert GGMLQuantizationType(tensors[gg].tensor_type) == F32
        _check_tensor_data(tensors[gg], src[hf])
    assert _fields(reader)["general.file_type"] == 0


def test_tiny_f16_types_and_values(tiny_dir: Path, tmp_path: Path) -> None:
    reader = _convert_tiny(tiny_dir, tmp_path, "f16")
    tensors = _tensors(reader)
    src = load_file(str(tiny_dir / "model.safetensors"))
    for hf, gg in _expected_names().items():
        t = tensors[gg]
        # matrices go to f16, except the position / token-type tables; vectors (norms, biases) stay f32
        want = F16 if src[hf].ndim == 2 and gg not in ("position_embd.weight", "token_types.weight") else F32
        assert GGMLQuantizationType(t.tensor_type) == want, gg
        _check_tensor_data(t, src[hf])
    assert _fields(reader)["general.file_type"] == 1


def test_tiny_q8_0_types_and_values(tiny_dir: Path, tmp_path: Path) -> None:
    reader = _convert_tiny(tiny_dir, tmp_path, "q8_0")
    tensors = _tensors(reader)
    src = load_file(str(tiny_dir / "model.safetensors"))
    for hf, gg in _expected_names().items():
        t = tensors[gg]
        arr = src[hf]
        if arr.ndim == 1 or gg in ("position_embd.weight", "token_types.weight"):
            want = F32
        elif arr.shape[1] % 32 == 0:
            want = Q8_0  # ffn_down: rows of FF=64
        else:
            want = F16  # rows of HIDDEN=48 are not whole Q8_0 blocks
        assert GGMLQuantizationType(t.tensor_type) == want, gg
        _check_tensor_data(t, arr)
    assert GGMLQuantizationType(tensors["blk.0.ffn_down.weight"].tensor_type) == Q8_0
    assert GGMLQuantizationType(tensors["blk.0.attn_q.weight"].tensor_type) == F16
    assert _fields(reader)["general.file_type"] == 7


def test_tiny_f16_and_bf16_sources(tmp_path: Path) -> None:
    weights = _tiny_weights(seed=3)
    floats = {k: v for k, v in weights.items() if v.dtype == np.float32}
    # float16 checkpoint: f32 output holds exactly the float16 values
    f16_dir = make_tiny_bert(tmp_path / "f16src", weights={k: v.astype(np.float16) for k, v in floats.items()})
    reader = GGUFReader(_out(f16_dir, tmp_path / "a.gguf", "f32"))
    tensors = _tensors(reader)
    for hf, gg in _expected_names().items():
        _check_tensor_data(tensors[gg], floats[hf].astype(np.float16).astype(np.float32))
    # bfloat16 checkpoint (not readable by numpy): widened exactly to float32
    bf_dir = make_tiny_bert(tmp_path / "bf16src")
    _write_bf16_safetensors(bf_dir / "model.safetensors", weights)
    tensors = _tensors(GGUFReader(_out(bf_dir, tmp_path / "b.gguf", "f32")))
    for hf, gg in _expected_names().items():
        _check_tensor_data(tensors[gg], _bf16_round(weights[hf]))


def _out(src: Path, out: Path, outtype: str) -> Path:
    convert(src, out, outtype)
    return out


def test_tiny_sharded_checkpoint_and_prefixed_names(tmp_path: Path) -> None:
    """A BertForMaskedLM checkpoint ("bert." prefix, MLM head) split over two shards converts the same."""
    weights = _tiny_weights(seed=5)
    prefixed = {("bert." + k): v for k, v in weights.items()}
    prefixed["cls.predictions.bias"] = np.zeros(N_VOCAB, dtype=np.float32)
    prefixed["cls.predictions.transform.dense.weight"] = np.zeros((HIDDEN, HIDDEN), dtype=np.float32)
    root = make_tiny_bert(tmp_path / "mlm", config=_tiny_config(architectures=["BertForMaskedLM"]))
    (root / "model.safetensors").unlink()
    names = sorted(prefixed)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map: dict[str, str] = {}
    for fname, keys in shards.items():
        save_file({k: prefixed[k] for k in keys}, str(root / fname))
        weight_map.update({k: fname for k in keys})
    _write_json(root / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    tensors = _tensors(GGUFReader(_out(root, tmp_path / "mlm.gguf", "f32")))
    assert set(tensors) == set(_expected_names().values())
    for hf, gg in _expected_names().items():
        _check_tensor_data(tensors[gg], weights[hf])


def test_tiny_sequence_classifier(tmp_path: Path) -> None:
    labels = {"0": "negative", "1": "positive", "2": "neutral"}
    weights = _tiny_weights()
    weights["classifier.weight"] = np.ones((3, HIDDEN), dtype=np.float32)
    weights["classifier.bias"] = np.zeros(3, dtype=np.float32)
    cfg = _tiny_config(architectures=["BertForSequenceClassification"], id2label=labels,
                       label2id={v: int(k) for k, v in labels.items()})
    root = make_tiny_bert(tmp_path / "clf", config=cfg, weights=weights, pooling=None)
    reader = GGUFReader(_out(root, tmp_path / "clf.gguf", "f16"))
    tensors = _tensors(reader)
    assert GGMLQuantizationType(tensors["cls.output.weight"].tensor_type) == F16
    assert GGMLQuantizationType(tensors["cls.output.bias"].tensor_type) == F32
    fields = _fields(reader)
    assert fields["bert.classifier.output_labels"] == ["negative", "positive", "neutral"]
    assert "bert.pooling_type" not in fields


# ---------------------------------------------------------------------------------------------------------------
# tiny model: metadata


def test_tiny_metadata(tiny_dir: Path, tmp_path: Path) -> None:
    fields = _fields(_convert_tiny(tiny_dir, tmp_path, "f16"))
    assert fields["general.architecture"] == "bert"
    assert fields["general.type"] == "model"
    assert fields["general.name"] == "Tiny Bert"  # no model card: derived from the folder name
    assert fields["general.quantization_version"] == 2
    assert fields["bert.block_count"] == LAYERS
    assert fields["bert.context_length"] == CTX
    assert fields["bert.embedding_length"] == HIDDEN
    assert fields["bert.feed_forward_length"] == FF
    assert fields["bert.attention.head_count"] == HEADS
    assert fields["bert.attention.layer_norm_epsilon"] == pytest.approx(1e-12, rel=1e-6)
    assert fields["bert.attention.causal"] is False
    assert fields["bert.pooling_type"] == 2  # CLS
    assert fields["tokenizer.ggml.model"] == "bert"
    assert fields["tokenizer.ggml.pre"] == "default"  # an unknown vocab has no llama.cpp pre-tokenizer name
    assert fields["tokenizer.ggml.token_type_count"] == TYPES
    assert fields["tokenizer.ggml.bos_token_id"] == SPECIALS["[CLS]"]
    assert fields["tokenizer.ggml.eos_token_id"] == SPECIALS["[SEP]"]
    assert fields["tokenizer.ggml.unknown_token_id"] == SPECIALS["[UNK]"]
    assert fields["tokenizer.ggml.seperator_token_id"] == SPECIALS["[SEP]"]
    assert fields["tokenizer.ggml.padding_token_id"] == SPECIALS["[PAD]"]
    assert fields["tokenizer.ggml.mask_token_id"] == SPECIALS["[MASK]"]
    assert "tokenizer.ggml.cls_token_id" not in fields  # llama.cpp has no such key: CLS is the BOS
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.add_eos_token"] is True
    assert fields["tokenizer.ggml.add_sep_token"] is False
    assert fields["tokenizer.ggml.normalizer.lowercase"] is True
    assert "tokenizer.ggml.normalizer.strip_accents" not in fields  # null in tokenizer.json: not written


def test_tiny_vocab_phantom_space_and_types(tiny_dir: Path, tmp_path: Path) -> None:
    fields = _fields(_convert_tiny(tiny_dir, tmp_path, "f32"))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == N_VOCAB
    for tok, i in SPECIALS.items():
        assert tokens[i] == tok and types[i] == TokenType.CONTROL
    assert tokens[VOCAB.index("hello")] == "\u2581hello" and types[VOCAB.index("hello")] == TokenType.NORMAL
    assert tokens[VOCAB.index("##lo")] == "lo" and types[VOCAB.index("##lo")] == TokenType.NORMAL
    assert tokens[VOCAB.index(",")] == "\u2581,"
    assert tokens[1] == "\u2581[unused0]" and types[1] == TokenType.NORMAL
    # a non-special added token: pre-normalized (▁ → space), then marked as a word start
    assert tokens[USER_ID] == "\u2581my token" and types[USER_ID] == TokenType.USER_DEFINED
    assert tokens[16] == "\u2581[PAD16]" and types[16] == TokenType.UNUSED


def test_tiny_vocab_txt_only(tiny_dir: Path, tmp_path: Path) -> None:
    """Without tokenizer.json the vocab comes from vocab.txt; special ids then come only from config.json."""
    (tiny_dir / "tokenizer.json").unlink()
    fields = _fields(_convert_tiny(tiny_dir, tmp_path, "f16"))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[: len(VOCAB)] == [t if t in SPECIALS else ("\u2581" + t if not t.startswith("##") else t[2:])
                                    for t in VOCAB]
    assert [types[i] for i in SPECIALS.values()] == [TokenType.CONTROL] * len(SPECIALS)
    assert tokens[15] == "\u2581[PAD15]" and types[15] == TokenType.UNUSED
    assert fields["tokenizer.ggml.padding_token_id"] == 0
    assert "tokenizer.ggml.bos_token_id" not in fields
    assert "tokenizer.ggml.normalizer.lowercase" not in fields


def test_tiny_mean_pooling_and_no_pooling(tmp_path: Path) -> None:
    mean_dir = make_tiny_bert(tmp_path / "mean", pooling="mean")
    assert _fields(GGUFReader(_out(mean_dir, tmp_path / "m.gguf", "f16")))["bert.pooling_type"] == 1
    plain_dir = make_tiny_bert(tmp_path / "plain", pooling=None)
    assert "bert.pooling_type" not in _fields(GGUFReader(_out(plain_dir, tmp_path / "p.gguf", "f16")))


def test_tiny_default_layer_norm_eps(tmp_path: Path) -> None:
    cfg = _tiny_config()
    del cfg["layer_norm_eps"]
    root = make_tiny_bert(tmp_path / "noeps", config=cfg)
    fields = _fields(GGUFReader(_out(root, tmp_path / "e.gguf", "f32")))
    assert fields["bert.attention.layer_norm_epsilon"] == pytest.approx(1e-12, rel=1e-6)


def test_main_cli(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    assert main([str(tiny_dir), str(out), "--outtype", "q8_0"]) == 0
    assert _fields(GGUFReader(out))["general.file_type"] == 7
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "x.gguf")]) == 1
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(SystemExit):
        main([str(tiny_dir), str(out), "--outtype", "q4_0"])


# ---------------------------------------------------------------------------------------------------------------
# errors


def _drop(name: str) -> Callable[[dict[str, npt.NDArray[Any]]], None]:
    return lambda w: w.pop(name)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "config.json"),
        (lambda d: _write_json(d / "config.json", _tiny_config(architectures=["RobertaModel"])), "RobertaModel"),
        (lambda d: _write_json(d / "config.json", {k: v for k, v in _tiny_config().items() if k != "architectures"}),
         "architectures"),
        (lambda d: _write_json(d / "config.json", _tiny_config(position_embedding_type="relative_key")),
         "position_embedding_type"),
        (lambda d: _write_json(d / "config.json", _tiny_config(hidden_act="relu")), "hidden_act"),
        (lambda d: _write_json(d / "config.json", _tiny_config(is_decoder=True)), "decoder"),
        (lambda d: _write_json(d / "config.json", _tiny_config(num_attention_heads=5)), "num_attention_heads"),
        (lambda d: _write_json(d / "config.json", _tiny_config(hidden_size=64)), "shape"),
        (lambda d: _write_json(d / "config.json", _tiny_config(num_hidden_layers=3)), "blk.2"),
        (lambda d: _write_json(d / "config.json", _tiny_config(vocab_size=10)), "vocab_size"),
        (lambda d: (d / "config.json").write_text("{not json", encoding="utf-8"), "config.json"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x05\x00"), "safetensors"),
        (lambda d: ((d / "tokenizer.json").unlink(), (d / "vocab.txt").unlink()), "tokenizer"),
        (lambda d: _write_json(d / "tokenizer.json", {**_tokenizer_json(), "model": {"type": "BPE", "vocab": {}}}),
         "WordPiece"),
        (lambda d: _write_json(d / "1_Pooling" / "config.json", {"pooling_mode_max_tokens": True}), "pooling"),
        (lambda d: (d / "1_Pooling" / "config.json").unlink(), "1_Pooling"),
    ],
)
def test_unsupported_folders(tiny_dir: Path, tmp_path: Path, mutate: Callable[[Path], Any], message: str) -> None:
    mutate(tiny_dir)
    out = tmp_path / "bad.gguf"
    with pytest.raises(ConversionError, match=message):
        convert(tiny_dir, out)
    assert not out.exists()
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("encoder.layer.1.output.dense.weight"), "blk.1.ffn_down.weight"),
        (lambda w: w.update({"encoder.layer.0.attention.self.rotary.weight": np.zeros(4, np.float32)}),
         "cannot map"),
        (lambda w: w.update({"encoder.layer.0.intermediate.dense.weight": np.zeros((FF, HIDDEN + 1), np.float32)}),
         "shape"),
        (lambda w: w.update({"embeddings.word_embeddings.weight": np.zeros((N_VOCAB, HIDDEN), np.int32)}),
         "dtype"),
    ],
)
def test_bad_checkpoints(tmp_path: Path, edit: Callable[[dict[str, npt.NDArray[Any]]], Any], message: str) -> None:
    weights = _tiny_weights()
    edit(weights)
    root = make_tiny_bert(tmp_path / "bad", weights=weights)
    with pytest.raises(ConversionError, match=message):
        convert(root, tmp_path / "bad.gguf")


def test_bad_outtype_and_error_type(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="q4_0"):
        convert(tiny_dir, tmp_path / "x.gguf", "q4_0")
    assert issubclass(ConversionError, ValueError)
    with pytest.raises(ValueError, match="not a model folder"):
        convert(tmp_path / "missing", tmp_path / "x.gguf")


def test_failed_conversion_keeps_existing_output(tiny_dir: Path, tmp_path: Path) -> None:
    """The output is written to a .part file first: a failure leaves an earlier file untouched."""
    out = tmp_path / "keep.gguf"
    out.write_bytes(b"previous")
    (tiny_dir / "vocab.txt").unlink()
    (tiny_dir / "tokenizer.json").unlink()
    with pytest.raises(ConversionError):
        convert(tiny_dir, out)
    assert out.read_bytes() == b"previous"
