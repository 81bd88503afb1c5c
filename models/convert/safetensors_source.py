"""Lazy, memory-mapped access to the tensors of a model folder's safetensors file(s).

The safetensors layout is read directly (8-byte little-endian header length, JSON header, raw data) so that
bfloat16 works without torch and nothing is loaded until a tensor is asked for.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.convert.errors import ConversionError
from models.convert.hf_files import read_json_object

# Float types are converted; integer tensors (e.g. position_ids buffers) are listed but never converted.
_NUMPY_DTYPES: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}
_MAX_HEADER = 100 * 1024 * 1024  # a corrupt length field must not make us read gigabytes


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live."""

    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "F32"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in `file`
    nbytes: int


def _read_header(path: Path) -> list[TensorRef]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ConversionError(f"{path}: truncated safetensors file")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ConversionError(f"{path}: corrupt safetensors header length {header_len}")
            header: Any = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read safetensors file {path}: {e}") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: safetensors header is not a JSON object")
    base = 8 + header_len
    refs: list[TensorRef] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path}: bad header entry for {name!r}: {e!r}") from e
        if dtype not in _NUMPY_DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize
        if end - begin != itemsize * int(np.prod(shape, dtype=np.int64)) or base + end > size or begin < 0:
            raise ConversionError(f"{path}: tensor {name!r} has inconsistent offsets/shape")
        refs.append(TensorRef(name, path, dtype, shape, base + begin, end - begin))
    return refs


def _shard_files(src_dir: Path) -> list[Path]:
    single = src_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = src_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index}: no 'weight_map'")
        files = [src_dir / str(name) for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"missing safetensors shard(s): {', '.join(missing)}")
        return sorted(files)
    raise ConversionError(
        f"missing weights: {src_dir} has no model.safetensors or model.safetensors.index.json "
        "(PyTorch .bin checkpoints are not supported)"
    )


def list_tensors(src_dir: Path) -> dict[str, TensorRef]:
    """All tensors of the folder's checkpoint by name: shard by shard, by name within a shard."""
    refs: dict[str, TensorRef] = {}
    for path in _shard_files(src_dir):
        # sorted by name within a file, as llama.cpp orders them
        for ref in sorted(_read_header(path), key=lambda r: r.name):
            if ref.name in refs:
                raise ConversionError(f"tensor {ref.name!r} appears in both {refs[ref.name].file} and {path}")
            refs[ref.name] = ref
    return refs


def load_float(ref: TensorRef) -> npt.NDArray[np.float32] | npt.NDArray[np.float16]:
    """The tensor as float32, or float16 if stored so (its precision is kept until the output type is chosen)."""
    count = int(np.prod(ref.shape, dtype=np.int64))
    if count == 0:
        return np.zeros(ref.shape, dtype=np.float32)
    raw = np.memmap(ref.file, dtype=_NUMPY_DTYPES[ref.dtype], mode="r", offset=ref.offset, shape=(count,))
    if ref.dtype == "F16":
        return np.array(raw, dtype=np.float16).reshape(ref.shape)
    if ref.dtype == "BF16":
        # bfloat16 is the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(ref.shape)
    if ref.dtype in ("F32", "F64"):
        return np.array(raw, dtype=np.float32).reshape(ref.shape)
    raise ConversionError(f"tensor {ref.name!r} is {ref.dtype}, not a floating-point weight")

