"""Loads the compiled cffi module once, routes ggml's log to Python logging, and checks C return values."""
from __future__ import annotations

import logging
from typing import Any

from ml.errors import GgmlError

try:
    from ggml._ggml_api import ffi, lib  # built by CMakeLists.txt (`make build`)
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(f"the ggml extension module is not built ({e}); run `make build`") from e

CData = Any  # cffi objects; never returned outside ggml/

__all__ = ["CData", "check", "check_status", "ffi", "in_host_memory", "lib", "version"]

log = logging.getLogger("ggml")
_LEVELS = {
    lib.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    lib.GGML_LOG_LEVEL_INFO: logging.INFO,
    lib.GGML_LOG_LEVEL_WARN: logging.WARNING,
    lib.GGML_LOG_LEVEL_ERROR: logging.ERROR,
}


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _ggml_log_to_python(level: int, text: CData, _user: CData) -> None:
    msg = ffi.string(text).decode("utf-8", "replace").rstrip("\n")
    if msg:
        log.log(_LEVELS.get(level, logging.DEBUG), "%s", msg)


lib.ggml_log_set(lib._ggml_log_to_python, ffi.NULL)


def check(ptr: CData, call: str, detail: str = "") -> CData:
    """Return `ptr`, or raise GgmlError naming `call` when it is NULL."""
    if ptr == ffi.NULL:
        raise GgmlError(f"{call} returned NULL" + (f" ({detail})" if detail else ""))
    return ptr


def check_status(status: int, call: str) -> None:
    """Raise GgmlError naming `call` unless `status` is GGML_STATUS_SUCCESS."""
    if status != lib.GGML_STATUS_SUCCESS:
        raise GgmlError(f"{call} failed with status {status}")


def in_host_memory(t: CData) -> bool:
    """Whether tensor `t`'s data lives in a host buffer. A view's own buffer is only set once its graph is
    allocated, so for a view the tensor it views is asked (a KV cache layer's K and V are views of its cache
    tensors)."""
    owner = t.view_src if t.view_src != ffi.NULL else t
    return bool(owner.buffer != ffi.NULL and lib.ggml_backend_buffer_is_host(owner.buffer))


def version() -> str:
    return str(ffi.string(lib.ggml_version()).decode())
