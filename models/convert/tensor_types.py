"""Output types: which GGML type each tensor is stored as, and the conversion to it."""
from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import quantize

from models.convert.errors import ConversionError


class OutType(enum.Enum):
    """The `--outtype` choices: the type of the 2-D weight matrices (everything else stays F32)."""

    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"

    @classmethod
    def parse(cls, text: str) -> OutType:
        try:
            return cls(text.lower())
        except ValueError:
            choices = ", ".join(t.value for t in cls)
            raise ConversionError(f"unsupported outtype {text!r} (choose one of {choices})") from None

    @property
    def file_type(self) -> LlamaFileType:
        """`general.file_type` of a file converted with this outtype."""
        return _FILE_TYPES[self]

    @property
    def weight_type(self) -> GGMLQuantizationType:
        return _WEIGHT_TYPES[self]


_FILE_TYPES = {
    OutType.F32: LlamaFileType.ALL_F32,
    OutType.F16: LlamaFileType.MOSTLY_F16,
    OutType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
}
_WEIGHT_TYPES = {
    OutType.F32: GGMLQuantizationType.F32,
    OutType.F16: GGMLQuantizationType.F16,
    OutType.Q8_0: GGMLQuantizationType.Q8_0,
}

# Embedding tables ggml only reads as F32 in the BERT graph (gathered rows are added, not mat-mul'd).
_ALWAYS_F32 = frozenset({"position_embd.weight", "token_types.weight"})


def choose_type(gguf_name: str, shape: Sequence[int], outtype: OutType) -> GGMLQuantizationType:
    """The stored type of one tensor: 1-D tensors, norms, biases and the small embeddings are always F32;
    other weights take the outtype, and a Q8_0 weight whose rows are not whole blocks falls back to F16."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or gguf_name in _ALWAYS_F32:
        return GGMLQuantizationType.F32
    if not gguf_name.endswith(".weight"):
        return GGMLQuantizationType.F32
    qtype = outtype.weight_type
    block_size, _ = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size != 0:
        return GGMLQuantizationType.F16
    return qtype


def stored_nbytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Bytes the tensor's data takes in the file (before alignment padding)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    count = int(np.prod(shape, dtype=np.int64))
    return count // block_size * type_size


def encode(data: npt.NDArray[Any], qtype: GGMLQuantizationType) -> npt.NDArray[Any]:
    """`data` (float32/float16, numpy layout rows × cols) in the stored type; quantized types come back as
    uint8 rows of blocks."""
    return quantize(np.ascontiguousarray(data), qtype)
