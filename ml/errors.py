"""The project's one error hierarchy. `ml` is the bottom of the import graph, so every package may import it."""
from __future__ import annotations


class RunnerError(Exception):
    """Base of every error this project raises on purpose."""


class ModelLoadError(RunnerError):
    """A model file could not be opened, parsed or loaded (corrupt, truncated, unsupported)."""


class UnsupportedArchitecture(ModelLoadError):
    """The GGUF's `general.architecture` has no registered model."""


class MissingWeight(ModelLoadError):
    """A required tensor is absent; the message names every name tried."""


class ShapeMismatch(ModelLoadError):
    """A tensor's shape differs from what the hyper-parameters imply."""


class GgmlError(RunnerError):
    """A ggml call returned NULL or an error status; the message names the call."""


class RequestError(RunnerError):
    """A client request is malformed or cannot be served (maps to HTTP 400)."""
