"""Typed reads of tokenizer keys from GGUF metadata given as a plain mapping.

Readers (gguf.GGUFReader, our own GGUF parser, hand-written dicts in tests) disagree on container types: arrays may
be Python lists or numpy arrays, scalars may be Python or numpy scalars, strings may be `str` or UTF-8 `bytes`.
Everything here accepts all of them and raises `ValueError` with the key name when a value has the wrong shape.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

PREFIX = "tokenizer.ggml."


def key(name: str) -> str:
    """The full metadata key for a `tokenizer.ggml.*` field."""
    return PREFIX + name


def _text(value: object, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.str_):
        return str(value)
    raise ValueError(f"{what}: expected a string, got {type(value).__name__}")


def get_str(meta: Mapping[str, object], name: str, default: str | None = None) -> str | None:
    """A string value, or `default` when the key is absent."""
    value = meta.get(name)
    if value is None:
        return default
    return _text(value, name)


def get_int(meta: Mapping[str, object], name: str) -> int | None:
    """An integer value (Python or numpy scalar, or a one-element array), or None when absent."""
    value = meta.get(name)
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    raise ValueError(f"{name}: expected an integer, got {type(value).__name__}")


def get_bool(meta: Mapping[str, object], name: str) -> bool | None:
    """A boolean value (bools and 0/1 integers are accepted), or None when absent."""
    value = get_int(meta, name)
    return None if value is None else bool(value)


def get_str_list(meta: Mapping[str, object], name: str) -> list[str] | None:
    """A string array as a list of `str`, or None when absent."""
    value = meta.get(name)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"{name}: expected an array of strings, got {type(value).__name__}")
    if isinstance(value, list) and all(type(v) is str for v in value):
        return value  # the common case: share the caller's strings instead of copying 100k+ of them
    return [_text(v, name) for v in value]


def get_int_array(meta: Mapping[str, object], name: str) -> npt.NDArray[np.int32] | None:
    """An integer array as int32 numpy, or None when absent."""
    value = meta.get(name)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"{name}: expected an integer array, got {type(value).__name__}")
    arr = np.asarray(value)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iub"):
        raise ValueError(f"{name}: expected a flat integer array, got dtype {arr.dtype} shape {arr.shape}")
    return arr.astype(np.int32)


def get_float_array(meta: Mapping[str, object], name: str) -> npt.NDArray[np.float32] | None:
    """A numeric array as float32 numpy (GGUF allows int32 scores too), or None when absent."""
    value = meta.get(name)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"{name}: expected a numeric array, got {type(value).__name__}")
    arr = np.asarray(value)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iuf"):
        raise ValueError(f"{name}: expected a flat numeric array, got dtype {arr.dtype} shape {arr.shape}")
    return arr.astype(np.float32)
