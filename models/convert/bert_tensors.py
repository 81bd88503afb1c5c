"""Hugging Face BERT tensor names → GGUF `bert` names, with shape checks and the per-tensor output type."""
from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType

from models.convert.bert_config import BertHParams
from models.convert.errors import ConversionError
from models.convert.safetensors_source import TensorRef
from models.convert.tensor_types import OutType, choose_type

# Heads and buffers an embedding model does not use.
_SKIPPED_NAMES = frozenset({"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})
_SKIPPED_PREFIXES = ("cls.predictions", "cls.seq_relationship")
_SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")

_GLOBAL_NAMES = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
    "classifier": "cls",
    "classifier.dense": "cls",
    "classifier.out_proj": "cls.output",
}
_LAYER_NAMES = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)")


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its source, GGUF name, numpy-layout shape and stored type."""

    source: TensorRef
    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType


def _canonical(hf_name: str) -> str:
    """Drop the `bert.` prefix of *ForMaskedLM / *ForSequenceClassification and old gamma/beta names."""
    name = hf_name.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[: -len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    return name


def gguf_name(hf_name: str, hp: BertHParams) -> str | None:
    """The GGUF name of a checkpoint tensor, `None` for tensors deliberately dropped."""
    name = _canonical(hf_name)
    if name in _SKIPPED_NAMES or name.startswith(_SKIPPED_PREFIXES) or name.endswith(_SKIPPED_SUFFIXES):
        return None
    if hp.classifier_labels and name in ("classifier.weight", "classifier.bias"):
        # a single-matrix classification head is the output projection
        name = name.replace("classifier.", "classifier.out_proj.")
    base, dot, suffix = name.rpartition(".")
    if dot and suffix in ("weight", "bias"):
        if base in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[base]}.{suffix}"
        if (m := _LAYER_RE.fullmatch(base)) and m.group(2) in _LAYER_NAMES and int(m.group(1)) < hp.block_count:
            return f"blk.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}.{suffix}"
    raise ConversionError(f"cannot map tensor {hf_name!r} to a GGUF bert tensor")


def expected_shapes(hp: BertHParams) -> dict[str, tuple[int, ...]]:
    """Every tensor a BERT encoder must have, with its numpy-layout (rows, cols) shape."""
    n, ff = hp.embedding_length, hp.feed_forward_length
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (hp.vocab_size, n),
        "token_types.weight": (hp.type_vocab_size, n),
        "position_embd.weight": (hp.context_length, n),
        "token_embd_norm.weight": (n,),
        "token_embd_norm.bias": (n,),
    }
    for i in range(hp.block_count):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes[f"blk.{i}.{part}.weight"] = (n, n)
            shapes[f"blk.{i}.{part}.bias"] = (n,)
        for norm in ("attn_output_norm", "layer_output_norm"):
            shapes[f"blk.{i}.{norm}.weight"] = (n,)
            shapes[f"blk.{i}.{norm}.bias"] = (n,)
        shapes[f"blk.{i}.ffn_up.weight"] = (ff, n)
        shapes[f"blk.{i}.ffn_up.bias"] = (ff,)
        shapes[f"blk.{i}.ffn_down.weight"] = (n, ff)
        shapes[f"blk.{i}.ffn_down.bias"] = (n,)
    return shapes


def plan_tensors(refs: dict[str, TensorRef], hp: BertHParams, outtype: OutType) -> list[PlannedTensor]:
    """Map, check and type every checkpoint tensor; missing, duplicated or mis-shaped tensors are errors."""
    expected = expected_shapes(hp)
    planned: list[PlannedTensor] = []
    seen: dict[str, str] = {}
    for ref in refs.values():
        name = gguf_name(ref.name, hp)
        if name is None:
            continue
        if name in seen:
            raise ConversionError(f"tensors {seen[name]!r} and {ref.name!r} both map to {name!r}")
        seen[name] = ref.name
        if ref.dtype not in ("F32", "F16", "BF16", "F64"):
            raise ConversionError(f"tensor {ref.name!r} has non-float dtype {ref.dtype}")
        want = expected.get(name)
        if want is not None and ref.shape != want:
            raise ConversionError(f"tensor {ref.name!r} has shape {list(ref.shape)}, config.json implies {list(want)}")
        planned.append(PlannedTensor(ref, name, ref.shape, choose_type(name, ref.shape, outtype)))
    missing = [name for name in expected if name not in seen]
    if missing:
        shown = ", ".join(missing[:8]) + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
        raise ConversionError(f"checkpoint lacks tensors needed by GGUF bert: {shown}")
    return planned
