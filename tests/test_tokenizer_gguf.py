"""GGUF metadata for the tokenizer tests, plus a check that it agrees with `gguf.GGUFReader`.

`gguf.GGUFReader` parses every key into numpy views up front: 5-20 s per large vocabulary file (~90 s for the 17
files the tokenizer tests read), far over the test budget. `read_metadata` parses only the key/value section
with `struct` (~0.5 s for the largest file) and is cached per session; `test_reader_matches_gguf` proves it
returns what `GGUFReader(...).fields[k].contents()` does, on a small vocabulary file.
"""
from __future__ import annotations

import functools
import mmap
import struct
from pathlib import Path

import numpy as np
import pytest

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, code: str) -> object:
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += struct.calcsize("<" + code)
        return value

    def string(self) -> str:
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        start = self.pos + 8
        self.pos = start + n
        return self.buf[start:start + n].decode("utf-8")

    def value(self, vtype: int) -> object:
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            return self.scalar(_SCALAR[vtype])
        etype, count = struct.unpack_from("<IQ", self.buf, self.pos)
        self.pos += 12
        if etype == _STRING:
            return [self.string() for _ in range(count)]
        if etype == _ARRAY:
            return [self.value(_ARRAY) for _ in range(count)]
        dtype = np.dtype(_NUMPY[etype])
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * dtype.itemsize
        return arr


@functools.cache
def read_metadata(path: Path) -> dict[str, object]:
    """All metadata keys of a GGUF v2/v3 file: strings as str, string arrays as list[str], numeric arrays as
    numpy arrays, scalars as Python values. Cached for the session."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        r = _Reader(buf)
        r.pos = 4
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version}")
        r.pos = 24
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = r.string()
            (vtype,) = struct.unpack_from("<I", buf, r.pos)
            r.pos += 4
            meta[key] = r.value(vtype)
        return meta


def test_reader_matches_gguf(llama_cpp_dir: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = llama_cpp_dir / "models" / "ggml-vocab-bert-bge.gguf"
    ours = read_metadata(path)
    reference = gguf.GGUFReader(path)
    fields = {k: v for k, v in reference.fields.items() if not k.startswith("GGUF.")}  # header pseudo-keys
    assert set(ours) == set(fields)
    for name, field in fields.items():
        expected = field.contents()
        got = ours[name]
        if isinstance(got, np.ndarray):
            np.testing.assert_array_equal(got, np.asarray(expected), err_msg=name)
        else:
            assert got == expected, name
