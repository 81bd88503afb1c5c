"""Populates a Module tree from a backend's tensors: builds GGUF names, tries alternates, checks shapes, and reports
tensors that nothing used (as llama.cpp's create_tensor and tinygrad's strict load_state_dict do)."""
from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any, TypeVar

from ml.backend import Backend, Tensor
from ml.errors import MissingWeight, ShapeMismatch
from ml.module import Module, WeightSpec

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Module)


class _Walk:
    def __init__(self, backend: Backend, params: Any) -> None:
        self.backend, self.params = backend, params
        self.used: set[str] = set()

    def build(self, cls: type[M], prefix: str) -> M:
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if not f.init:
                continue
            if f.metadata.get("hyper"):
                values[f.name] = self.params
                continue
            spec: WeightSpec = f.metadata.get("gguf", WeightSpec())
            values[f.name] = self.field(hints[f.name], spec, prefix, spec.name or f.name)
        return cls(**values)

    def field(self, hint: Any, spec: WeightSpec, prefix: str, name: str) -> Any:
        kind, optional = _classify(hint)
        optional = spec.optional(self.params) if callable(spec.optional) else optional or spec.optional
        if kind is Tensor:
            return self.leaf([prefix + name] + [prefix + a for a in spec.alt], spec, optional)
        if kind == "list":
            elem = typing.get_args(_strip_optional(hint))[0]
            n = spec.count(self.params) if spec.count else 0
            return [self.sub(spec.kind(self.params, i) if spec.kind else elem, [f"{prefix}{name}.{i}."], spec, False)
                    for i in range(n)]
        cls = spec.kind(self.params, 0) if spec.kind else kind
        prefixes = [prefix] if spec.inline else [f"{prefix}{name}."] + [f"{prefix}{a}." for a in spec.alt]
        return self.sub(cls, prefixes, spec, optional)

    def sub(self, cls: type[Module], prefixes: list[str], spec: WeightSpec, optional: bool) -> Any:
        """A sub-structure under the first prefix that has all its required tensors (alternates in order)."""
        errors = []
        for p in prefixes:
            before = set(self.used)
            try:
                module = self.build(cls, p)
            except MissingWeight as e:
                self.used = before  # a failed alternate uses nothing
                errors.append(str(e))
                continue
            if spec.shape is not None:
                want = spec.shape(self.params)
                self.check_shape(p + "weight", getattr(module, "weight", None), want)
                self.check_shape(p + "bias", getattr(module, "bias", None), (want[-1],))
            return module
        if optional:
            return None
        raise MissingWeight("; ".join(errors))

    def leaf(self, names: list[str], spec: WeightSpec, optional: bool) -> Tensor | None:
        tried: list[str] = []
        for n in names:
            for cand in (n,) if n.endswith((".weight", ".bias")) else (n, n + ".weight"):
                tried.append(cand)
                t = self.backend.get(cand)
                if t is not None:
                    self.used.add(cand)
                    if spec.shape is not None:
                        self.check_shape(cand, t, spec.shape(self.params))
                    return t
        if optional:
            return None
        raise MissingWeight(f"required tensor missing; tried {', '.join(tried)}")

    def check_shape(self, name: str, t: Tensor | None, want: tuple[int, ...]) -> None:
        if t is not None and tuple(t.shape) != tuple(want):
            raise ShapeMismatch(f"tensor {name} has shape {list(t.shape)}, expected {list(want)}")


def _strip_optional(hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0]
    return hint


def _classify(hint: Any) -> tuple[Any, bool]:
    optional = type(None) in typing.get_args(hint)
    base = _strip_optional(hint)
    if typing.get_origin(base) is list:
        return "list", optional
    if base is Tensor:
        return Tensor, optional
    if isinstance(base, type) and issubclass(base, Module):
        return base, optional
    raise TypeError(f"unsupported weight field type {hint!r}")


def load_weights(cls: type[M], backend: Backend, params: Any, *, strict: bool = False) -> tuple[M, list[str]]:
    """Build `cls` from the backend's tensors. Returns the model and the names of tensors nothing used (logged;
    raised as an error with strict=True)."""
    walk = _Walk(backend, params)
    model = walk.build(cls, "")
    unused = sorted(set(backend.tensor_names()) - walk.used)
    if unused:
        msg = f"{len(unused)} tensors in the file are not used by {cls.__name__}: {', '.join(unused[:8])}" + (
            " ..." if len(unused) > 8 else "")
        if strict:
            raise ShapeMismatch(msg)
        log.warning("%s", msg)
    return model, unused
