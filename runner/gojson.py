"""JSON the way Go's encoding/json reads and writes it, for byte-exact wire compatibility with `ollama serve`.

Encoding mirrors `json.NewEncoder(w).Encode`: struct field order, no spaces, HTML-safe escapes (`<` -> `\\u003c`),
U+2028/U+2029 escaped, invalid text replaced by U+FFFD, Go's float formatting, and a trailing newline per value.
Decoding mirrors `json.NewDecoder(r).Decode`: the first JSON value only (trailing bytes ignored), no NaN/Infinity,
object keys kept in order so callers can match them case-insensitively with `fold_key` (last key wins).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TypeAlias, Union

import numpy as np

from runner.errors import RequestError

# Objects keep their (key, value) pairs in document order; plain dicts would merge keys that differ only in case
# in the wrong order.
JsonValue: TypeAlias = Union[None, bool, int, float, str, list["JsonValue"], "JsonObject"]


@dataclass(frozen=True, slots=True)
class JsonObject:
    """A decoded JSON object as its (key, value) pairs in document order, duplicates included."""

    pairs: tuple[tuple[str, JsonValue], ...]


# --- encoding -------------------------------------------------------------------------------------------------

_ESCAPES: dict[str, str] = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                            "\b": "\\b", "\f": "\\f",  # short forms since Go 1.22 (Ollama builds with newer Go)
                            "<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                            "\u2028": "\\u2028", "\u2029": "\\u2029"}
_NEEDS_ESCAPE = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029\ud800-\udfff]')


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if "\ud800" <= ch <= "\udfff":
        return "\ufffd"  # a lone surrogate is not valid text; Go writes U+FFFD for invalid UTF-8
    return f"\\u{ord(ch):04x}"


def encode_string(s: str) -> str:
    """Quote `s` as Go's encoder does with HTML escaping on (the default of json.NewEncoder)."""
    return '"' + _NEEDS_ESCAPE.sub(_escape, s) + '"'


def encode_bytes_text(data: bytes) -> str:
    """Quote raw bytes as Go does for a string holding them: each invalid UTF-8 byte becomes U+FFFD."""
    return encode_string(data.decode("utf-8", errors="replace"))


def _clean_exponent(text: str) -> str:
    # Go turns "1e-07" into "1e-7" (only a two-digit negative exponent with a leading zero is shortened).
    if len(text) >= 4 and text[-4] == "e" and text[-3] == "-" and text[-2] == "0":
        return text[:-2] + text[-1]
    return text


def _encode_float(x: float, bits: int) -> str:
    value: np.float32 | np.float64 = np.float32(x) if bits == 32 else np.float64(x)
    if not np.isfinite(value):
        raise ValueError(f"json: unsupported value: {x!r}")  # Go's encoder refuses NaN and ±Inf too
    magnitude = abs(float(value))
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        text = np.format_float_scientific(value, unique=True, trim="-", exp_digits=2)
        return _clean_exponent(text)
    return np.format_float_positional(value, unique=True, trim="-")


def encode_float64(x: float) -> str:
    """Format a float64 as Go's encoder: shortest round-trip digits, exponent only below 1e-6 or from 1e21."""
    return _encode_float(x, 64)


def encode_float32(x: float) -> str:
    """Format a value as a Go float32 field (rounded to float32, shortest float32 digits)."""
    return _encode_float(x, 32)


def encode_bool(b: bool) -> str:
    """`true` or `false`."""
    return "true" if b else "false"


def encode_object(fields: list[tuple[str, str]]) -> str:
    """Join already-encoded values into an object with the given keys, in the given (struct) order."""
    return "{" + ",".join(f"{encode_string(k)}:{v}" for k, v in fields) + "}"


def line(value: str) -> bytes:
    """One NDJSON line as `json.Encoder.Encode` writes it: the value and a newline."""
    return (value + "\n").encode("utf-8")


# --- decoding -------------------------------------------------------------------------------------------------

_LEADING_SPACE = " \t\r\n"  # the only whitespace JSON allows


def _reject_constant(name: str) -> JsonValue:
    raise RequestError(f"invalid character in JSON: {name} is not a JSON value")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(value: JsonValue) -> JsonValue:
    # Go decodes a lone "\ud800" escape as U+FFFD; Python keeps the surrogate, which cannot be encoded later.
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, JsonObject):
        return JsonObject(tuple((_clean(k), _clean(v)) for k, v in value.pairs))  # type: ignore[misc]
    return value


def parse_document(body: bytes) -> JsonValue:
    """Decode the first JSON value of `body` as Go's json.Decoder.Decode does (trailing bytes are not read).

    Raises:
        RequestError: empty body, syntax error, NaN/Infinity literals, nesting too deep.
    """
    text = body.decode("utf-8", errors="replace").lstrip(_LEADING_SPACE)
    if not text:
        raise RequestError("empty request body (EOF)")
    decoder = json.JSONDecoder(object_pairs_hook=lambda pairs: JsonObject(tuple(pairs)),
                               parse_constant=_reject_constant)
    try:
        value, _end = decoder.raw_decode(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise RequestError("invalid JSON: nesting too deep") from exc
    return _clean(value)


def fold_key(key: str) -> str:
    """The case-folded form Go uses to match object keys to struct fields (simple per-rune folding)."""
    out = []
    for ch in key:
        folded = ch.lower().upper()  # e.g. KELVIN SIGN -> "K", LONG S -> "S", as Go's smallest-rune folding
        out.append(folded if len(folded) == 1 else ch)  # keep runes whose full case mapping expands ("ß")
    return "".join(out)


def kind(value: JsonValue) -> str:
    """Go's name for the JSON kind of `value` in unmarshal errors (`string`, `number 1.5`, `object` …)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def to_plain(value: JsonValue) -> object:
    """Convert decoded objects to dicts (last duplicate key wins), e.g. to re-serialise a raw field."""
    if isinstance(value, JsonObject):
        return {k: to_plain(v) for k, v in value.pairs}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value


def compact(value: JsonValue) -> str:
    """Compact JSON text of a decoded value (for fields Go keeps as json.RawMessage)."""
    return json.dumps(to_plain(value), separators=(",", ":"), ensure_ascii=False)
