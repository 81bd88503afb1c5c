"""ggml bound with cffi: the only package that touches C. Implements the `ml` interfaces.

Public: `GgmlBackend` (load a GGUF into backend buffers), `Runtime` (devices, thread pool, scheduler),
`GgmlError` (from ml.errors). No cffi object leaves this package.
"""
from __future__ import annotations

from ggml.backend import GgmlBackend, load_backend
from ggml.runtime import Runtime, RuntimeOptions
from ml.errors import GgmlError

__all__ = ["GgmlBackend", "GgmlError", "Runtime", "RuntimeOptions", "load_backend"]
