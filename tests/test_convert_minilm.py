"""The BERT → GGUF converter on the real all-MiniLM-L6-v2 folder: metadata keys, vocabulary and tensors as llama.cpp's
converter writes them (skipped when the folder is absent, see conftest.py). Helpers come from test_convert_bert."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy.typing as npt
import pytest
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from safetensors.numpy import load_file
from test_convert_bert import _check_tensor_data, _fields, _tensors

from models.convert import convert
from models.convert.pre_tokenizer_id import probe_hash
from models.convert.tokenizer_files import load_wordpiece_tokenizer

F32, F16, Q8_0 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0


_HUB_DATASETS = (1, 13, 14, 15, 16, 17, 18, 19, 20)  # model-card datasets given as org/name: with org and URL
MINILM_KEYS = [
    "general.architecture", "general.type", "general.name", "general.version", "general.organization",
    "general.basename", "general.size_label", "general.license", "general.dataset.count",
    *(f"general.dataset.{i}.{k}" for i in range(21)
      for k in (("name", "organization", "repo_url") if i in _HUB_DATASETS else ("name",))),
    "general.tags", "general.languages",
    "bert.block_count", "bert.context_length", "bert.embedding_length", "bert.feed_forward_length",
    "bert.attention.head_count", "bert.attention.layer_norm_epsilon", "general.file_type", "bert.attention.causal",
    "bert.pooling_type", "general.quantization_version",
    "tokenizer.ggml.token_type_count", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.seperator_token_id", "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.mask_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_sep_token", "tokenizer.ggml.normalizer.lowercase",
]


@pytest.fixture(scope="module")
def minilm_ggufs(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, GGUFReader]:
    out_dir = tmp_path_factory.mktemp("minilm")
    readers = {}
    for outtype in ("f32", "f16", "q8_0"):
        out = out_dir / f"minilm-{outtype}.gguf"
        convert(minilm_dir, out, outtype)
        readers[outtype] = GGUFReader(out)
    return readers


@pytest.fixture(scope="module")
def minilm_weights(minilm_dir: Path) -> dict[str, npt.NDArray[Any]]:
    return load_file(str(minilm_dir / "model.safetensors"))


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_minilm_metadata(minilm_ggufs: dict[str, GGUFReader], minilm_dir: Path, outtype: str) -> None:
    fields = _fields(minilm_ggufs[outtype])
    cfg = json.loads((minilm_dir / "config.json").read_text())
    assert list(fields) == MINILM_KEYS  # llama.cpp's key set and order
    assert fields["general.architecture"] == "bert"
    assert fields["general.name"] == "MiniLM L6 H384 Uncased"
    assert fields["general.size_label"] == "23M"
    assert fields["general.license"] == "apache-2.0"
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
    assert fields["bert.block_count"] == cfg["num_hidden_layers"] == 6
    assert fields["bert.embedding_length"] == cfg["hidden_size"] == 384
    assert fields["bert.attention.head_count"] == cfg["num_attention_heads"] == 12
    assert fields["bert.feed_forward_length"] == cfg["intermediate_size"] == 1536
    assert fields["bert.context_length"] == cfg["max_position_embeddings"] == 512
    assert fields["bert.attention.layer_norm_epsilon"] == pytest.approx(cfg["layer_norm_eps"], rel=1e-6)
    assert fields["bert.attention.causal"] is False
    assert fields["bert.pooling_type"] == 1  # mean
    assert fields["tokenizer.ggml.model"] == "bert"
    assert fields["tokenizer.ggml.pre"] == "jina-v2-en"
    assert fields["tokenizer.ggml.token_type_count"] == 2
    assert fields["tokenizer.ggml.bos_token_id"] == 101
    assert fields["tokenizer.ggml.eos_token_id"] == 102
    assert fields["tokenizer.ggml.unknown_token_id"] == 100
    assert fields["tokenizer.ggml.seperator_token_id"] == 102
    assert fields["tokenizer.ggml.padding_token_id"] == 0
    assert fields["tokenizer.ggml.mask_token_id"] == 103
    assert (fields["tokenizer.ggml.add_bos_token"], fields["tokenizer.ggml.add_eos_token"],
            fields["tokenizer.ggml.add_sep_token"]) == (True, True, False)
    assert fields["tokenizer.ggml.normalizer.lowercase"] is True


def test_minilm_vocab(minilm_ggufs: dict[str, GGUFReader], minilm_dir: Path) -> None:
    fields = _fields(minilm_ggufs["f16"])
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 30522
    for i, tok in ((0, "[PAD]"), (100, "[UNK]"), (101, "[CLS]"), (102, "[SEP]"), (103, "[MASK]")):
        assert tokens[i] == tok and types[i] == TokenType.CONTROL
    vocab = (minilm_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    hello, ing = vocab.index("hello"), vocab.index("##ing")
    assert tokens[hello] == "\u2581hello" and types[hello] == TokenType.NORMAL
    assert tokens[ing] == "ing" and types[ing] == TokenType.NORMAL
    assert tokens[1] == "\u2581[unused0]"
    assert sum(t == TokenType.CONTROL for t in types) == 5
    assert sum(t == TokenType.NORMAL for t in types) == 30522 - 5


def test_minilm_pre_tokenizer_hash_matches_llama_cpp(minilm_dir: Path) -> None:
    # the value llama.cpp's converter lists for bert-base-uncased vocabs (bge-small-en-v1.5)
    assert probe_hash(load_wordpiece_tokenizer(minilm_dir)) == (
        "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f"
    )


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_minilm_tensors(minilm_ggufs: dict[str, GGUFReader], minilm_weights: dict[str, npt.NDArray[Any]],
                        outtype: str) -> None:
    tensors = _tensors(minilm_ggufs[outtype])
    assert len(tensors) == 101
    skipped = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    assert skipped <= set(minilm_weights)
    by_gguf: dict[str, str] = {}
    for hf in minilm_weights:
        if hf in skipped:
            continue
        gg = (hf.replace("embeddings.word_embeddings", "token_embd")
              .replace("embeddings.position_embeddings", "position_embd")
              .replace("embeddings.token_type_embeddings", "token_types")
              .replace("embeddings.LayerNorm", "token_embd_norm")
              .replace("encoder.layer.", "blk.")
              .replace("attention.self.query", "attn_q").replace("attention.self.key", "attn_k")
              .replace("attention.self.value", "attn_v").replace("attention.output.dense", "attn_output")
              .replace("attention.output.LayerNorm", "attn_output_norm").replace("intermediate.dense", "ffn_up")
              .replace("output.dense", "ffn_down").replace("output.LayerNorm", "layer_output_norm"))
        by_gguf[gg] = hf
    assert set(tensors) == set(by_gguf)
    assert [int(d) for d in tensors["token_embd.weight"].shape] == [384, 30522]
    assert [int(d) for d in tensors["blk.0.ffn_up.weight"].shape] == [384, 1536]
    assert [int(d) for d in tensors["blk.5.ffn_down.weight"].shape] == [1536, 384]
    matrix_type = {"f32": F32, "f16": F16, "q8_0": Q8_0}[outtype]
    for gg, hf in by_gguf.items():
        src = minilm_weights[hf]
        stays_f32 = src.ndim == 1 or gg in ("position_embd.weight", "token_types.weight")
        assert GGMLQuantizationType(tensors[gg].tensor_type) == (F32 if stays_f32 else matrix_type), gg
        _check_tensor_data(tensors[gg], src)
