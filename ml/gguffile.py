"""A validating GGUF reader: metadata as Python values, tensor descriptors, and the file memory-mapped.

Every count, length, dimension and offset read from the file is checked against the file size before it is used,
so a corrupt or hostile file raises `ModelLoadError` with a message instead of crashing or allocating gigabytes.
Shapes are in ggml order (`ne[0]` fastest), as the file stores them.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml.dtype import DType
from ml.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Bounds far above any real model that keep a corrupt header from driving huge allocations or loops.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20

# GGUF value types -> (struct code, numpy dtype)
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("B", "<u1"), 1: ("b", "<i1"), 2: ("H", "<u2"), 3: ("h", "<i2"), 4: ("I", "<u4"), 5: ("i", "<i4"),
    6: ("f", "<f4"), 7: ("?", "<u1"), 10: ("Q", "<u8"), 11: ("q", "<i8"), 12: ("d", "<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's descriptor: name, ggml type, shape (ggml order), byte offset into the file and byte size."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {what} (at byte {self.pos} of {self.size})")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated file: {what} needs {n} bytes")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, code: str, what: str) -> Any:
        size = struct.calcsize("<" + code)
        return struct.unpack_from("<" + code, self.buf, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8") from e

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype][0], key)
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(key)
        if vtype == _ARRAY:
            etype, count = self.scalar("I", key), self.scalar("Q", key)
            if etype in _SCALARS:
                dt = np.dtype(_SCALARS[etype][1])
                start = self.take(count * dt.itemsize, f"array {key}")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=start).copy()
                return arr.astype(bool) if etype == _BOOL else arr
            if etype == _STRING:
                if count > (self.size - self.pos) // 8:
                    raise self.fail(f"array {key} claims {count} strings")
                return [self.string(key) for _ in range(count)]
            if etype == _ARRAY:
                if count > (self.size - self.pos) // 12:
                    raise self.fail(f"array {key} claims {count} nested arrays")
                return [self.value(_ARRAY, key) for _ in range(count)]
            raise self.fail(f"array {key} has unknown element type {etype}")
        raise self.fail(f"key {key} has unknown value type {vtype}")


class GGUFFile:
    """An open GGUF file: `metadata` (key -> Python value; numeric arrays as numpy), `tensors` (name -> TensorInfo),
    and `data(info)` giving a zero-copy view of a tensor's bytes in the memory map."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise ModelLoadError(f"cannot open model file {self.path}: {e.strerror}") from e
        try:
            if self.path.stat().st_size == 0:
                raise ModelLoadError(f"{self.path}: empty file, not a GGUF model")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self.metadata, self.tensors, self.data_offset = self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> tuple[dict[str, Any], dict[str, TensorInfo], int]:
        cur = _Cursor(self._map, self.path)
        if cur.size < 4 or self._map[:4] != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path}: not a GGUF file (bad magic {bytes(self._map[:4])!r})")
        cur.pos = 4
        version = cur.scalar("I", "version")
        if version not in (2, 3):
            raise cur.fail(f"unsupported GGUF version {version}")
        n_tensors, n_kv = cur.scalar("Q", "tensor count"), cur.scalar("Q", "metadata count")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise cur.fail(f"implausible header: {n_tensors} tensors, {n_kv} metadata keys")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            metadata[key] = cur.value(cur.scalar("I", key), key)
        raw: list[tuple[str, DType, tuple[int, ...], int]] = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.scalar("I", name)
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            shape = tuple(cur.scalar("Q", name) for _ in range(n_dims))
            type_id = cur.scalar("I", name)
            try:
                dtype = DType(type_id)
            except ValueError:
                raise cur.fail(f"tensor {name} has unsupported ggml type {type_id}") from None
            raw.append((name, dtype, shape, cur.scalar("Q", name)))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment {alignment} is not a power of two")
        data_offset = -(-cur.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, dtype, shape, rel in raw:
            tensors[name] = self._check_tensor(name, dtype, shape, rel, data_offset, alignment, cur.size)
        return metadata, tensors, data_offset

    def _check_tensor(self, name: str, dtype: DType, shape: tuple[int, ...], rel: int, data_offset: int,
                      alignment: int, size: int) -> TensorInfo:
        if any(d <= 0 or d > size * 8 for d in shape):
            raise ModelLoadError(f"{self.path}: tensor {name} has implausible shape {list(shape)}")
        if shape[0] % dtype.block_size:
            raise ModelLoadError(f"{self.path}: tensor {name} row of {shape[0]} is not a multiple of "
                                 f"{dtype.name} block size {dtype.block_size}")
        nbytes = dtype.row_bytes(shape[0])
        for d in shape[1:]:
            nbytes *= d
        if rel % alignment:
            raise ModelLoadError(f"{self.path}: tensor {name} offset {rel} is not {alignment}-byte aligned")
        if data_offset + rel + nbytes > size:
            raise ModelLoadError(f"{self.path}: tensor {name} ({nbytes} bytes at offset {data_offset + rel}) "
                                 f"runs past the end of the file ({size} bytes): truncated or corrupt")
        return TensorInfo(name, dtype, shape, data_offset + rel, nbytes)

    def data(self, info: TensorInfo) -> memoryview:
        """The tensor's bytes, a zero-copy view into the memory map (valid until `close`)."""
        return memoryview(self._map)[info.offset:info.offset + info.nbytes]

    def close(self) -> None:
        m = getattr(self, "_map", None)
        if m is not None:
            try:
                m.close()
            except BufferError:
                # Views still exported (a numpy array alive somewhere); the map is freed with them.
                pass
            self._map = None  # type: ignore[assignment]
        self._file.close() if hasattr(self, "_file") else None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
