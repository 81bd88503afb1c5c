"""Tensor element types: ggml's type ids (stable: they are stored in GGUF files) and their block layout."""
from __future__ import annotations

import enum

import numpy as np
from gguf.constants import GGML_QUANT_SIZES


class DType(enum.IntEnum):
    """A ggml tensor type. Values equal `enum ggml_type`, which GGUF files store, so they never change."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ4_NL = 20
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    BF16 = 30

    @property
    def block_size(self) -> int:
        """Elements per block (1 for plain types, 32 or 256 for quantized ones)."""
        return _BLOCKS[int(self)][0]

    @property
    def block_bytes(self) -> int:
        """Bytes per block."""
        return _BLOCKS[int(self)][1]

    @property
    def is_quantized(self) -> bool:
        return self.block_size > 1

    def row_bytes(self, n: int) -> int:
        """Bytes taken by `n` consecutive elements (`n` must be a multiple of the block size)."""
        return n // self.block_size * self.block_bytes

    @property
    def numpy(self) -> np.dtype[np.generic]:
        """The numpy dtype holding one element; raw uint8 for quantized and bf16 data."""
        return np.dtype(_NUMPY.get(self, np.uint8))


_NUMPY: dict[DType, type[np.generic]] = {
    DType.F32: np.float32,
    DType.F16: np.float16,
    DType.I8: np.int8,
    DType.I16: np.int16,
    DType.I32: np.int32,
    DType.I64: np.int64,
    DType.F64: np.float64,
}


# (elements, bytes) per block by type id; read per op while a graph is built, where gguf's enum lookups cost ~1 µs
_BLOCKS: dict[int, tuple[int, int]] = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
_BY_VALUE: dict[int, DType] = {d.value: d for d in DType}


def dtype_of(type_id: int) -> DType:
    """`DType(type_id)` without the enum machinery (~1 µs a call; a decoder's graph asks ~1700 times): ValueError
    for an id that is not a DType."""
    found = _BY_VALUE.get(type_id)
    return found if found is not None else DType(type_id)


def dtype_of_numpy(dt: np.dtype[np.generic]) -> DType:
    """The ggml type that stores numpy dtype `dt` without conversion."""
    for d, n in _NUMPY.items():
        if np.dtype(n) == dt:
            return d
    raise TypeError(f"no ggml type for numpy dtype {dt}")
