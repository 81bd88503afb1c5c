"""Request side of the wire format: decode /completion and /embedding bodies of each dialect (P1, P2, P3).

Decoding follows Go's encoding/json as the Go runner applies it (runner-protocol.md §2.2, §5.1): keys match
case-insensitively, unknown keys are ignored, null leaves a scalar unchanged, a wrong JSON type fails the whole
request. P2/P3 decode into a zero struct (an absent option is 0) and only an absent or null `Options` means
api.DefaultOptions(); P1 pre-fills the defaults and reads llama.cpp-style keys (`n_predict`, `n_keep`, ...).
The response side lives in runner.responses. No HTTP here.
"""
from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal, NamedTuple

import numpy as np

from runner.errors import RequestError
from runner.gojson import JsonObject, JsonValue, compact, fold_key, kind, parse_document
from runner.sampling import SamplerParams


class Dialect(enum.Enum):
    """Which Ollama server release family we talk to (runner-protocol.md, protocol table)."""

    P1 = "p1"  # v0.5.12 – v0.6.1: snake_case map, `stop`/`timings` final line, string health
    P2 = "p2"  # v0.6.2 – v0.6.4: Go struct keys, string done_reason, integer health
    P3 = "p3"  # v0.6.5 – v0.11.4: as P2 with an integer done_reason (the project default)

    @classmethod
    def parse(cls, text: str) -> Dialect:
        """`p1`/`p2`/`p3`, case and surrounding spaces ignored. Raises ValueError for anything else."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError(f"unknown dialect {text!r}: expected one of p1, p2, p3") from None


class ImageData(NamedTuple):
    """One image of a multimodal prompt: the id used by its `[img-<id>]` marker and the raw file bytes."""

    id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A decoded POST /completion body.

    num_predict <= 0 means unlimited (P1 sends -1 by default, P2/P3 send 0 when unset). num_keep < 0 keeps the
    whole prompt on truncation/shift. `grammar` (GBNF text) and `format` (compact JSON text, or None for
    absent/null) are kept verbatim; runner.grammar turns them into a sampling constraint (the grammar wins, the
    format is used when the grammar is empty). typical_p and mirostat are type-checked but not kept
    (no sampler uses them, as in the Go new engine).
    """

    prompt: str
    images: tuple[ImageData, ...]
    sampling: SamplerParams
    num_predict: int
    num_keep: int
    stop: tuple[str, ...]
    grammar: str = ""
    format: str | None = None
    cache_prompt: bool = True
    tokens: tuple[int, ...] | None = None  # a pre-tokenized prompt (llama-server mode); used instead of `prompt`
    n_probs: int = 0  # llama-server mode: report each generated token's log-probability and the n_probs likeliest


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A decoded POST /embedding body."""

    content: str


# --- field tables ---------------------------------------------------------------------------------------------

Kind = Literal["int", "float32", "bool", "string", "strings", "images", "bytes", "raw", "options"]
Spec = Mapping[str, tuple[str, Kind]]  # folded JSON key -> (internal name, kind)


def _spec(fields: Mapping[str, Kind], rename: Mapping[str, str] | None = None) -> dict[str, tuple[str, Kind]]:
    names = rename or {}
    return {fold_key(key): (names.get(key, key.lower()), k) for key, k in fields.items()}


# api.Runner (load-time; ignored by the runner but still type-checked by Go's decoder)
_RUNNER_FIELDS: Final[dict[str, Kind]] = {
    "num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "int", "low_vram": "bool",
    "vocab_only": "bool", "use_mmap": "bool", "use_mlock": "bool", "num_thread": "int"}
# api.Options' own fields (json tags), in struct order
_OPTION_FIELDS: Final[dict[str, Kind]] = {
    "num_keep": "int", "seed": "int", "num_predict": "int", "top_k": "int", "top_p": "float32",
    "min_p": "float32", "typical_p": "float32", "repeat_last_n": "int", "temperature": "float32",
    "repeat_penalty": "float32", "presence_penalty": "float32", "frequency_penalty": "float32",
    "mirostat": "int", "mirostat_tau": "float32", "mirostat_eta": "float32", "stop": "strings"}

_OPTIONS_SPEC: Final = _spec({**_RUNNER_FIELDS, **_OPTION_FIELDS})
_P23_SPEC: Final = _spec({"Prompt": "string", "Format": "raw", "Images": "images", "Options": "options",
                          "Grammar": "string"})
_P1_OPTION_FIELDS: Final = {("n_keep" if k == "num_keep" else "n_predict" if k == "num_predict" else k): v
                            for k, v in _OPTION_FIELDS.items()}
_P1_SPEC: Final = _spec({"prompt": "string", "image_data": "images", "grammar": "string", "cache_prompt": "bool",
                         **_RUNNER_FIELDS, **_P1_OPTION_FIELDS},
                        rename={"n_keep": "num_keep", "n_predict": "num_predict", "image_data": "images"})
_IMAGE_SPEC: Final = _spec({"data": "bytes", "id": "int", "aspect_ratio_id": "int"})
_EMBEDDING_SPEC: Final = _spec({"content": "string"})

# api.DefaultOptions() of v0.6.x, sampling part (the P1 example request of runner-protocol.md §6 shows them)
DEFAULT_OPTIONS: Final[Mapping[str, object]] = MappingProxyType({
    "num_keep": 4, "seed": -1, "num_predict": -1, "top_k": 40, "top_p": float(np.float32(0.9)), "min_p": 0.0,
    "typical_p": 1.0, "repeat_last_n": 64, "temperature": float(np.float32(0.8)),
    "repeat_penalty": float(np.float32(1.1)), "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": float(np.float32(0.1)), "stop": None})
_ZERO_OPTIONS: Final[Mapping[str, object]] = MappingProxyType({
    name: (0 if k == "int" else 0.0 if k == "float32" else False if k == "bool" else None)
    for name, k in _OPTIONS_SPEC.values()})

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_GO_TYPES: Final[dict[Kind, str]] = {"int": "int", "float32": "float32", "bool": "bool", "string": "string",
                                     "strings": "[]string", "images": "[]ImageData", "bytes": "[]uint8",
                                     "raw": "json.RawMessage", "options": "api.Options"}


def _type_error(value: JsonValue, path: str, k: Kind) -> RequestError:
    return RequestError(f"json: cannot unmarshal {kind(value)} into Go struct field {path} of type {_GO_TYPES[k]}")


# --- decoding -------------------------------------------------------------------------------------------------

def _decode_struct(obj: JsonValue, spec: Spec, into: dict[str, object], path: str) -> None:
    """Assign the object's known keys into `into`, in document order (a later duplicate wins)."""
    if obj is None:
        return  # null into a struct is a no-op in Go
    if not isinstance(obj, JsonObject):
        raise RequestError(f"json: cannot unmarshal {kind(obj)} into Go value of type {path}")
    for key, value in obj.pairs:
        field = spec.get(fold_key(key))
        if field is not None:
            name, k = field
            into[name] = _decode_value(value, k, into.get(name), f"{path}.{key}")


def _decode_value(value: JsonValue, k: Kind, previous: object, path: str) -> object:
    if k == "raw":
        return None if value is None else compact(value)
    if value is None:
        # null keeps a scalar as it was, and sets a slice or pointer to nil
        return None if k in ("strings", "images", "options", "bytes") else previous
    if k == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not _INT64_MIN <= value <= _INT64_MAX:
            raise _type_error(value, path, k)  # Go rejects 1.0 and 1e3 for an int, not only strings
        return value
    if k == "float32":
        return _float32(value, path)
    if k == "bool":
        if not isinstance(value, bool):
            raise _type_error(value, path, k)
        return value
    if k == "string":
        if not isinstance(value, str):
            raise _type_error(value, path, k)
        return value
    if k == "bytes":
        return _base64(value, path)
    if k == "options":
        if not isinstance(value, JsonObject):
            raise _type_error(value, path, k)
        # Go allocates a zero struct only if the pointer is nil, so repeated keys merge into one struct
        opts = dict(previous) if isinstance(previous, dict) else dict(_ZERO_OPTIONS)
        _decode_struct(value, _OPTIONS_SPEC, opts, path)
        return opts
    if not isinstance(value, list):
        raise _type_error(value, path, k)
    if k == "strings":
        return [_decode_value(v, "string", "", f"{path}[{i}]") for i, v in enumerate(value)]
    return [_image(v, f"{path}[{i}]") for i, v in enumerate(value)]


def _float32(value: JsonValue, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(value, path, "float32")
    try:
        with np.errstate(over="ignore"):
            f = np.float32(float(value))
    except OverflowError:
        raise _type_error(value, path, "float32") from None
    if not np.isfinite(f):
        raise _type_error(value, path, "float32")  # Go: value out of range for float32
    return float(f)


def _base64(value: JsonValue, path: str) -> bytes:
    if not isinstance(value, str):
        raise _type_error(value, path, "bytes")
    try:
        # Go's StdEncoding: padded standard alphabet; it skips \r and \n
        return base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{path}: illegal base64 data: {exc}") from None


def _image(value: JsonValue, path: str) -> ImageData:
    fields: dict[str, object] = {"data": b"", "id": 0, "aspect_ratio_id": 0}
    _decode_struct(value, _IMAGE_SPEC, fields, path)
    data, image_id = fields["data"], fields["id"]
    return ImageData(int(image_id) if isinstance(image_id, int) else 0, data if isinstance(data, bytes) else b"")


def _int(opts: Mapping[str, object], name: str) -> int:
    v = opts[name]
    return int(v) if isinstance(v, (int, float)) else 0


def _flt(opts: Mapping[str, object], name: str) -> float:
    v = opts[name]
    return float(v) if isinstance(v, (int, float)) else 0.0


def _build(fields: Mapping[str, object], opts: Mapping[str, object], cache_prompt: bool) -> CompletionRequest:
    sampling = SamplerParams(
        temperature=_flt(opts, "temperature"), top_k=_int(opts, "top_k"), top_p=_flt(opts, "top_p"),
        min_p=_flt(opts, "min_p"), seed=_int(opts, "seed"), repeat_last_n=_int(opts, "repeat_last_n"),
        repeat_penalty=_flt(opts, "repeat_penalty"), presence_penalty=_flt(opts, "presence_penalty"),
        frequency_penalty=_flt(opts, "frequency_penalty"))
    stops = opts["stop"]
    images = fields.get("images")
    fmt = fields.get("format")
    return CompletionRequest(
        prompt=str(fields.get("prompt") or ""),
        images=tuple(images) if isinstance(images, list) else (),
        sampling=sampling, num_predict=_int(opts, "num_predict"), num_keep=_int(opts, "num_keep"),
        # an empty stop string would match at offset 0 and end every generation with no text: dropped
        stop=tuple(s for s in stops if isinstance(s, str) and s) if isinstance(stops, list) else (),
        grammar=str(fields.get("grammar") or ""), format=fmt if isinstance(fmt, str) else None,
        cache_prompt=cache_prompt)


def decode_completion(body: bytes, dialect: Dialect) -> CompletionRequest:
    """Decode a /completion body of the given dialect.

    Raises:
        RequestError: not JSON, not an object, or a known key with a value of the wrong type (the Go runner
            answers all of these with 400 `Bad request`).
    """
    doc = parse_document(body)
    if dialect is Dialect.P1:
        fields: dict[str, object] = {**DEFAULT_OPTIONS, "cache_prompt": True}
        _decode_struct(doc, _P1_SPEC, fields, "CompletionRequest")
        return _build(fields, fields, cache_prompt=fields["cache_prompt"] is True)
    fields = {"options": None}
    _decode_struct(doc, _P23_SPEC, fields, "CompletionRequest")
    opts = fields["options"]
    return _build(fields, opts if isinstance(opts, dict) else DEFAULT_OPTIONS, cache_prompt=True)


def decode_embedding(body: bytes) -> EmbeddingRequest:
    """Decode a /embedding body `{"content": "..."}` (same in every dialect; key case-insensitive).

    Raises:
        RequestError: not JSON, not an object, or `content` not a string.
    """
    fields: dict[str, object] = {"content": ""}
    _decode_struct(parse_document(body), _EMBEDDING_SPEC, fields, "EmbeddingRequest")
    return EmbeddingRequest(content=str(fields["content"]))
