"""Architectures register by GGUF `general.architecture`; `load_model` builds the right one from a backend."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from ml.backend import Backend, Context, Tensor
from ml.batch import Batch
from ml.dtype import DType
from ml.errors import ModelLoadError, UnsupportedArchitecture
from models.loader import load_weights

from kvcache.base import Cache


class Model(Protocol):
    """What the runner needs of a model."""

    params: Any

    def forward(self, ctx: Context, batch: Batch, cache: Cache) -> Tensor: ...
    def new_cache(self, flash: bool = False, n_ctx_seq: int = 0) -> Cache: ...


class ModelClass(Protocol):
    def read_params(self, backend: Backend) -> Any: ...


C = TypeVar("C")
# Filled at import time by the architecture modules (a registry, not mutable run-time state).
_REGISTRY: dict[str, Any] = {}


def register(*architectures: str) -> Callable[[C], C]:
    def deco(cls: C) -> C:
        for arch in architectures:
            _REGISTRY[arch] = cls
        return cls
    return deco


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def widened_types(architecture: str) -> Mapping[DType, DType]:
    """What the architecture's class asks the backend to widen at load (`widen_weights`; GgmlBackend's `widen`)."""
    widen: Mapping[DType, DType] = getattr(_REGISTRY.get(architecture), "widen_weights", {})
    return widen  # GgmlBackend keeps its own copy


def takes_projector(architecture: str) -> bool:
    """Whether the architecture's class can use a llama.cpp projector file (`--mmproj`; `takes_projector`)."""
    return bool(getattr(_REGISTRY.get(architecture), "takes_projector", False))


def load_model(backend: Backend, *, strict: bool = False) -> Model:
    """Build the model for the backend's architecture with its weights; raises UnsupportedArchitecture,
    MissingWeight or ShapeMismatch (all ModelLoadError)."""
    cls = _REGISTRY.get(backend.architecture)
    if cls is None:
        raise UnsupportedArchitecture(f"unsupported architecture {backend.architecture!r}; this runner supports "
                                      f"{', '.join(supported_architectures())}")
    try:
        params = cls.read_params(backend)
    except (ArithmeticError, ValueError) as e:  # e.g. a zero head count dividing a width, before its own check
        raise ModelLoadError(f"invalid hyper-parameters for {backend.architecture}: {type(e).__name__}: {e}") from e
    model, _unused = load_weights(cls, backend, params, strict=strict)
    return model  # type: ignore[no-any-return]
