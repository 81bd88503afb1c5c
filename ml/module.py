"""Declarative weights: a model is a tree of dataclasses whose fields are named exactly like GGUF tensors.

A field typed `Tensor` is a leaf (`<prefix><field>`), a field typed as a Module is a sub-structure
(`<prefix><field>.`), a `list[Module]` is numbered (`<prefix><field>.<i>.`). `weight(...)` adds what the name alone
cannot say: alternates, optional parts, inlining, list length, the concrete class, and the expected shape.
`models.loader` walks the tree; `ml.nn` layers are Modules too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ShapeFn = Callable[[Any], tuple[int, ...]]


@dataclass(frozen=True)
class WeightSpec:
    """How one field maps to GGUF tensors.

    alt: alternate names tried in order when the field's own name is absent (e.g. tied embeddings).
    optional: leave the field None when no name is found (biases, rope_freqs); a function of the hyper-parameters
        decides per file (a vision tower is required exactly when the file describes one), overriding the hint.
    inline: a sub-structure whose tensors sit directly under the parent's prefix.
    shape: expected shape (ggml order) from the hyper-parameters; for a layer, the shape of its `weight`.
    count: list length from the hyper-parameters.
    kind: the concrete Module class to build, from (params, index) — for polymorphic parts.
    name: the GGUF name when it differs from the field name.
    """

    alt: tuple[str, ...] = ()
    optional: bool | Callable[[Any], bool] = False
    inline: bool = False
    shape: ShapeFn | None = None
    count: Callable[[Any], int] | None = None
    kind: Callable[[Any, int], type] | None = None
    name: str | None = None


def weight(*, alt: str | tuple[str, ...] = (), optional: bool | Callable[[Any], bool] = False,
           inline: bool = False,
           shape: ShapeFn | None = None, count: Callable[[Any], int] | None = None,
           kind: Callable[[Any, int], type] | None = None, name: str | None = None) -> Any:
    """Field declaration for a weight (see WeightSpec). Optional fields (also per-file ones) default to None."""
    spec = WeightSpec(alt=(alt,) if isinstance(alt, str) else tuple(alt), optional=optional, inline=inline,
                      shape=shape, count=count, kind=kind, name=name)
    if optional is not False:
        return field(default=None, metadata={"gguf": spec})
    return field(metadata={"gguf": spec})


def optional(shape: ShapeFn | None = None) -> Any:
    """Shorthand for weight(optional=True): a part that may be absent (biases)."""
    return weight(optional=True, shape=shape)


class Module:
    """Marker base class for weight trees (layers and models)."""


def hyper() -> Any:
    """Field declaration for the hyper-parameters object the loader passes in (not a tensor)."""
    return field(metadata={"hyper": True})
