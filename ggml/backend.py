"""GgmlBackend: a GGUF file's metadata and weights, loaded into ggml backend buffers (CPU, CPU_REPACK, GPUs)."""
from __future__ import annotations

import builtins

import logging
import re
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from ggml import rpc
from ggml import guards
from ggml._lib import CData, check, ffi, lib
from ggml.context import GgmlContext
from ggml.runtime import Runtime, RuntimeOptions
from ggml.tensor import GgmlTensor, new_tensor_ptr
from ml.backend import ProgressFn
from ml.dtype import DType
from ml.errors import ModelLoadError
from ml.gguffile import GGUFFile, TensorInfo

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^(?:blk|enc\.blk|dec\.blk|v\.blk)\.(\d+)\.")
# Tables read with get_rows, never multiplied: they must stay in plain (readable, non-repacked) buffers.
_LOOKUP_TABLES = frozenset({"token_embd.weight", "position_embd.weight", "token_types.weight"})
_OUTPUT = frozenset({"output.weight", "output_norm.weight", "output_norm.bias", "output.bias"})

WidenFn = Callable[[str], Mapping[DType, DType]]
"""architecture -> {stored type: type to hold in memory} for mat-mul weights (see GgmlBackend)."""


def _free_buffers(state: dict[str, Any]) -> None:
    if rpc.failed():
        return  # a buffer on a dead RPC host cannot be freed: its connection thread is parked (ggml/rpc.py)
    for buf in state["buffers"]:
        lib.ggml_backend_buffer_free(buf)
    state["buffers"].clear()
    for ctx in state["ctxs"]:
        lib.ggml_free(ctx)
    state["ctxs"].clear()


class GgmlBackend:
    """Implements `ml.Backend`. Metadata keys not starting with `general.` or `tokenizer.` are looked up under
    `<architecture>.`, so models ask for `block_count`, not `llama.block_count`.

    `widen(architecture)` may name types whose 2-D mat-mul weights are dequantized into a wider type while
    loading (the file stays as it is): ggml rounds activations to 8 bits before every quantized mat-mul, which
    small, precision-sensitive models (embedding encoders) feel."""

    def __init__(self, path: str | Path, options: RuntimeOptions | None = None,
                 progress: ProgressFn | None = None, runtime: Runtime | None = None,
                 widen: WidenFn | None = None, projector: str | Path | None = None) -> None:
        self.path = Path(path)
        started = time.monotonic()
        files = [GGUFFile(self.path)]
        try:
            gguf = files[0]
            self.metadata: dict[str, Any] = gguf.metadata
            arch = self.metadata.get("general.architecture")
            if not isinstance(arch, str) or not arch:
                raise ModelLoadError(f"{self.path}: general.architecture is missing")
            self.architecture = arch
            self.n_layer = _checked_block_count(self.metadata, arch, gguf.tensors)
            if projector is not None:
                files.append(GGUFFile(projector))
                self.metadata = {**self.metadata, **_projector_metadata(gguf, files[1])}
            for f in files:
                _check_tensor_types(f.tensors)
            self._own_runtime = runtime is None
            self.runtime = runtime if runtime is not None else Runtime(options)
            self.runtime.n_layer = self.n_layer
            self._closed = False
            self._state: dict[str, Any] = {"buffers": [], "ctxs": []}
            self._finalizer = weakref.finalize(self, _free_buffers, self._state)
            self._tensors: dict[str, GgmlTensor] = {}
            self._widen = dict(widen(arch)) if widen is not None else {}
            self._load(files, progress)
        except BaseException:
            for f in files:
                f.close()
            if hasattr(self, "_finalizer"):
                self.close()
            raise
        for f in files:
            f.close()
        log.info("loaded %s: arch=%s tensors=%d in %.2fs", " + ".join(f.path.name for f in files), arch,
                 len(self._tensors), time.monotonic() - started)

    # ---- loading ----
    def _device_of(self, name: str) -> int:
        m = _BLOCK.match(name)
        if m:
            return self.runtime.device_of_layer(int(m.group(1)), self.n_layer)
        if name in _OUTPUT:
            return self.runtime.device_of_layer(self.n_layer, self.n_layer)
        return -1  # inputs (embeddings) stay on the CPU, as in llama.cpp

    def _loaded_type(self, info: TensorInfo) -> DType:
        if len(info.shape) == 1:
            # Norm weights, biases and RoPE factors meet activations in ggml's binary ops, which abort on
            # anything but F32 there: hold every 1-D tensor as F32, whatever the file stores (llama.cpp's
            # converters always write them so; a file that does not is fixed here, not refused).
            return DType.F32
        if info.name in _LOOKUP_TABLES or len(info.shape) != 2:
            return info.dtype
        return self._widen.get(info.dtype, info.dtype)

    def _load(self, files: Sequence[GGUFFile], progress: ProgressFn | None) -> None:
        """Every file's tensors (names are unique across them) into backend buffers."""
        entries = [(f, info) for f in files for info in f.tensors.values()]
        groups: dict[Any, list[TensorInfo]] = {}
        types = {info.name: self._loaded_type(info) for _, info in entries}
        for _, info in entries:
            buft = self.runtime.weight_buft(self._device_of(info.name), int(types[info.name]), info.shape,
                                            for_matmul=info.name not in _LOOKUP_TABLES)
            groups.setdefault(buft, []).append(info)
        ptrs: dict[str, CData] = {}
        for buft, infos in groups.items():
            mem = (len(infos) + 1) * lib.ggml_tensor_overhead()
            params = ffi.new("struct ggml_init_params *", {"mem_size": mem, "mem_buffer": ffi.NULL, "no_alloc": True})
            ctx = check(lib.ggml_init(params[0]), "ggml_init")
            self._state["ctxs"].append(ctx)
            for info in infos:
                ptr = new_tensor_ptr(ctx, types[info.name], info.shape)
                lib.ggml_set_name(ptr, info.name.encode()[:63])
                ptrs[info.name] = ptr
            buf = check(lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft), "ggml_backend_alloc_ctx_tensors",
                        f"{len(infos)} tensors for {ffi.string(lib.ggml_backend_buft_name(buft)).decode()}")
            lib.ggml_backend_buffer_set_usage(buf, lib.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
            self._state["buffers"].append(buf)
            log.debug("buffer %s: %d tensors, %.1f MiB", ffi.string(lib.ggml_backend_buft_name(buft)).decode(),
                      len(infos), lib.ggml_backend_buffer_get_size(buf) / 2**20)
        total = sum(info.nbytes for _, info in entries) or 1
        done = 0
        if progress:
            progress(0.0)
        for gguf, info in entries:
            view = gguf.data(info)
            if types[info.name] == info.dtype:
                # One memcpy from the page cache into the backend buffer (repacked on the way where chosen).
                lib.ggml_backend_tensor_set(ptrs[info.name], ffi.from_buffer(view), 0, info.nbytes)
            else:
                wide = _widened(view, info, types[info.name])
                lib.ggml_backend_tensor_set(ptrs[info.name], ffi.from_buffer(wide), 0, wide.nbytes)
            view.release()
            self._tensors[info.name] = GgmlTensor(ptrs[info.name], self)
            done += info.nbytes
            if progress:
                progress(done / total)

    # ---- metadata ----
    def _key(self, key: str) -> str:
        # `clip.*`: a projector file's keys (llama.cpp's split layout), merged in by name
        return key if key.startswith(("general.", "tokenizer.", "clip.")) else f"{self.architecture}.{key}"

    def _value(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        full = self._key(key)
        if full not in self.metadata:
            if default is None:
                raise ModelLoadError(f"{self.path.name}: metadata key {full} is missing")
            return default
        v = self.metadata[full]
        if isinstance(v, np.generic):
            v = v.item()
        if not isinstance(v, kinds) or (bool not in kinds and isinstance(v, bool)):
            raise ModelLoadError(f"{self.path.name}: metadata key {full} is {type(v).__name__}, expected {what}")
        return v

    def has(self, key: str) -> bool:
        return self._key(key) in self.metadata

    def string(self, key: str, default: str | None = None) -> str:
        return str(self._value(key, default, (str,), "a string"))

    def uint(self, key: str, default: int | None = None) -> int:
        return int(self._value(key, default, (int,), "an integer"))

    def float(self, key: str, default: float | None = None) -> float:
        return float(self._value(key, default, (float, int), "a number"))

    def bool(self, key: str, default: builtins.bool | None = None) -> builtins.bool:
        return bool(self._value(key, default, (bool,), "a bool"))

    def strings(self, key: str, default: list[str] | None = None) -> list[str]:
        v = self._value(key, default, (list,), "an array of strings")
        if not all(isinstance(s, str) for s in v):
            raise ModelLoadError(f"{self.path.name}: {self._key(key)} is not an array of strings")
        return list(v)

    def ints(self, key: str, default: Sequence[int] | None = None) -> npt.NDArray[np.int64]:
        v = self._value(key, None if default is None else np.asarray(default), (np.ndarray, int), "integers")
        arr = np.atleast_1d(np.asarray(v))
        if arr.dtype.kind not in "iub":
            raise ModelLoadError(f"{self.path.name}: {self._key(key)} is not an integer array")
        return arr.astype(np.int64)

    def floats(self, key: str, default: Sequence[builtins.float] | None = None) -> npt.NDArray[np.float32]:
        v = self._value(key, None if default is None else np.asarray(default), (np.ndarray, int, float), "numbers")
        arr = np.atleast_1d(np.asarray(v))
        if arr.dtype.kind not in "iuf":
            raise ModelLoadError(f"{self.path.name}: {self._key(key)} is not a number array")
        return arr.astype(np.float32)

    # ---- tensors and contexts ----
    def get(self, name: str) -> GgmlTensor | None:
        return self._tensors.get(name)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    @property
    def closed(self) -> builtins.bool:
        return self._closed

    def failure(self) -> str | None:
        """Why a device holding part of the model (an RPC host) can no longer be used, once one has failed."""
        return self.runtime.failure()

    def new_context(self, max_nodes: int = 0) -> GgmlContext:
        return GgmlContext(self.runtime, max_nodes)

    def close(self) -> None:
        self._closed = True
        self._tensors.clear()
        self._finalizer()
        if self._own_runtime and hasattr(self, "runtime"):
            self.runtime.close()

    def __enter__(self) -> GgmlBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _widened(raw: memoryview, info: TensorInfo, to: DType) -> npt.NDArray[Any]:
    """A stored tensor's data as `to` (F32 or F16), dequantized row by row with gguf's reference code."""
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(int(np.prod(info.shape[1:], dtype=np.int64)), -1)
    if info.dtype == DType.BF16:  # gguf's dequantize has no BF16 path: the upper half of an F32
        values: npt.NDArray[Any] = (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif info.dtype in (DType.F32, DType.F16):
        values = rows.view(info.dtype.numpy)
    else:
        values = dequantize(rows, GGMLQuantizationType(int(info.dtype)))
    return np.ascontiguousarray(values, dtype=to.numpy)


_BLOCK_PREFIX = re.compile(r"^blk\.(\d+)\.")


def _check_tensor_types(tensors: Mapping[str, TensorInfo]) -> None:
    for info in tensors.values():
        if info.dtype in guards.NOT_WEIGHT_TYPES:  # ggml aborts on them as weights
            raise ModelLoadError(f"tensor {info.name} has type {info.dtype.name}, which is not a weight type")


def _checked_block_count(metadata: Mapping[str, Any], arch: str, tensors: Mapping[str, TensorInfo]) -> int:
    """`<arch>.block_count`, refused when the file has no tensors for that many blocks: the count sizes
    per-layer tables, so it must be bounded by the file before anything is built from it."""
    key = f"{arch}.block_count"
    raw = metadata.get(key, 0)
    value = raw.item() if isinstance(raw, np.generic) else raw
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"metadata key {key} is {type(value).__name__}, expected an integer")
    indexes = {int(m.group(1)) for name in tensors if (m := _BLOCK_PREFIX.match(name))}
    if value < 0 or (value > 0 and value > len(indexes)):
        raise ModelLoadError(f"invalid hyper-parameter {key} = {value}: the file has tensors for "
                             f"{len(indexes)} blocks")
    return value


def _projector_metadata(text: GGUFFile, projector: GGUFFile) -> dict[str, Any]:
    """The `clip.*` keys of a llama.cpp projector file (`--mmproj`), after checking that it is one and that its
    tensors can sit beside the model's: the model must not carry a tower of its own, no name may be in both."""
    arch = projector.metadata.get("general.architecture")
    if arch != "clip":
        raise ModelLoadError(f"{projector.path}: not a projector file (general.architecture is {arch!r}, "
                             "expected 'clip')")
    own = sorted(n for n in text.tensors if n.startswith(("v.", "mm.")))
    if own:
        raise ModelLoadError(f"{text.path} already holds a vision tower ({own[0]}, ...); it takes no projector "
                             f"file ({projector.path})")
    both = sorted(set(text.tensors) & set(projector.tensors))
    if both:
        raise ModelLoadError(f"tensor {both[0]} is in both {text.path} and the projector {projector.path}")
    return {k: v for k, v in projector.metadata.items() if k.startswith("clip.")}


def load_backend(path: str | Path, options: RuntimeOptions | None = None,
                 progress: ProgressFn | None = None, widen: WidenFn | None = None,
                 projector: str | Path | None = None) -> GgmlBackend:
    """Open the GGUF at `path` (and a llama.cpp projector file, `--mmproj`, whose tensors and `clip.*` keys join
    the model's) and load the weights; raises ModelLoadError for bad files."""
    return GgmlBackend(path, options, progress, widen=widen, projector=projector)
