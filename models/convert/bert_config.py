"""Hyper-parameters of a Hugging Face BERT config.json, validated for conversion to GGUF `bert`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.convert.errors import ConversionError
from models.convert.hf_files import read_json_object

logger = logging.getLogger(__name__)

# HF class names whose weights and tokenizer are plain BERT (WordPiece, absolute positions).
SUPPORTED_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")

# transformers' BertConfig defaults: llama.cpp reads config.json through AutoConfig, which fills these in,
# so a config.json that omits a key converts as if it held the default.
_BERT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "position_embedding_type": "absolute",
}

# ggml's BERT graph applies GELU in the FFN; other activations would silently compute something else.
_GELU_NAMES = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass(frozen=True)
class BertHParams:
    """What the GGUF needs from config.json (names follow the GGUF keys they feed)."""

    architecture: str
    block_count: int
    context_length: int
    embedding_length: int
    feed_forward_length: int
    head_count: int
    layer_norm_eps: float
    vocab_size: int
    type_vocab_size: int
    classifier_labels: tuple[str, ...] | None


def _positive_int(cfg: dict[str, Any], key: str, path: Path) -> int:
    value = cfg.get(key, _BERT_DEFAULTS.get(key))
    # bool is an int subclass; a `true` here is a broken config, not 1
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConversionError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _architecture(cfg: dict[str, Any], path: Path) -> str:
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ConversionError(f"{path}: no 'architectures' entry; cannot tell which model this is")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{path}: unsupported architecture {arch!r}; this converter handles {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _classifier_labels(cfg: dict[str, Any], path: Path) -> tuple[str, ...] | None:
    """Labels of a sequence-classification head, ordered by id; AutoConfig's dummy LABEL_0/LABEL_1 pair is none."""
    id2label = cfg.get("id2label")
    if not id2label:
        return None
    if not isinstance(id2label, dict):
        raise ConversionError(f"{path}: id2label must be an object, got {type(id2label).__name__}")
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except ValueError as e:
        raise ConversionError(f"{path}: id2label has a non-integer id: {e}") from e
    if len(by_id) == 2 and by_id.get(0) == "LABEL_0":
        return None
    return tuple(label for _, label in sorted(by_id.items()))


def parse_bert_hparams(cfg: dict[str, Any], path: Path) -> BertHParams:
    """Validate a parsed config.json; `path` only names the file in error messages."""
    arch = _architecture(cfg, path)

    pos_type = cfg.get("position_embedding_type", _BERT_DEFAULTS["position_embedding_type"])
    if pos_type != "absolute":
        raise ConversionError(f"{path}: position_embedding_type {pos_type!r} is unsupported (only 'absolute')")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise ConversionError(f"{path}: decoder / cross-attention BERT configs are unsupported")
    act = cfg.get("hidden_act", _BERT_DEFAULTS["hidden_act"])
    if act not in _GELU_NAMES:
        raise ConversionError(f"{path}: hidden_act {act!r} is unsupported (GGUF bert uses GELU)")

    hidden = _positive_int(cfg, "hidden_size", path)
    heads = _positive_int(cfg, "num_attention_heads", path)
    if hidden % heads != 0:
        raise ConversionError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")

    eps = cfg.get("layer_norm_eps", _BERT_DEFAULTS["layer_norm_eps"])
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ConversionError(f"{path}: layer_norm_eps must be a positive number, got {eps!r}")
    if "layer_norm_eps" not in cfg:
        logger.info("%s has no layer_norm_eps; using BertConfig's default %g", path, eps)

    return BertHParams(
        architecture=arch,
        block_count=_positive_int(cfg, "num_hidden_layers", path),
        context_length=_positive_int(cfg, "max_position_embeddings", path),
        embedding_length=hidden,
        feed_forward_length=_positive_int(cfg, "intermediate_size", path),
        head_count=heads,
        layer_norm_eps=float(eps),
        vocab_size=_positive_int(cfg, "vocab_size", path),
        type_vocab_size=_positive_int(cfg, "type_vocab_size", path),
        classifier_labels=_classifier_labels(cfg, path),
    )


def load_bert_hparams(src_dir: Path) -> BertHParams:
    """Read and validate `src_dir/config.json`."""
    path = src_dir / "config.json"
    return parse_bert_hparams(read_json_object(path), path)
