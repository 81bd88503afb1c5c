"""Response side of the wire format: the exact bytes of each NDJSON line, health body and error body per dialect.

Each function returns what the Go runner's `json.NewEncoder(w).Encode(&struct{…})` writes (runner-protocol.md
§2.1, §2.2, §6): fields in struct order, HTML-escaped strings, a trailing newline. P1 reports milliseconds as
whole-valued floats in `timings`; P2/P3 report integer nanoseconds; P2's done_reason is a string, P3's an int.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from runner.gojson import encode_bool, encode_float32, encode_float64, encode_object, encode_string, line
from runner.protocol import Dialect

JSON_CONTENT_TYPE: Final = "application/json"
ERROR_CONTENT_TYPE: Final = "text/plain; charset=utf-8"  # what Go's http.Error sets (with nosniff)
ERROR_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {"Content-Type": ERROR_CONTENT_TYPE, "X-Content-Type-Options": "nosniff"})


class DoneReason(enum.IntEnum):
    """Why a sequence ended; the values are P3's integer done_reason."""

    STOP = 0  # EOS/EOT or a stop string
    LENGTH = 1  # num_predict reached
    CONNECTION_CLOSED = 2  # client went away (no final line is sent then)


class ServerStatus(enum.IntEnum):
    """llm.ServerStatus as P2/P3 /health reports it (P1 sends the strings of `_P1_STATUS`)."""

    READY = 0
    NO_SLOTS_AVAILABLE = 1
    LOADING_MODEL = 2
    NOT_RESPONDING = 3
    ERROR = 4


_P1_STATUS: Final[dict[ServerStatus, str]] = {
    ServerStatus.READY: "ok", ServerStatus.NO_SLOTS_AVAILABLE: "no slot available",
    ServerStatus.LOADING_MODEL: "loading model"}  # anything else is "server error"


@dataclass(frozen=True, slots=True)
class Metrics:
    """Counters of the final line (runner-protocol.md §2.2, "Semantics of the counters"); durations in ns."""

    prompt_eval_count: int = 0
    prompt_eval_duration_ns: int = 0
    eval_count: int = 0
    eval_duration_ns: int = 0
    cache_n: int = 0  # prompt tokens reused from the slot's KV cache (llama-server's timings.cache_n)


def _ms(ns: int) -> float:
    # Go: float64(d.Milliseconds()), i.e. truncated toward zero to whole milliseconds
    whole = abs(ns) // 1_000_000
    return float(-whole if ns < 0 else whole)


def _p1_timings(m: Metrics) -> str:
    return encode_object([("predicted_n", str(m.eval_count)), ("predicted_ms", encode_float64(_ms(m.eval_duration_ns))),
                          ("prompt_n", str(m.prompt_eval_count)),
                          ("prompt_ms", encode_float64(_ms(m.prompt_eval_duration_ns)))])


def _p23(dialect: Dialect, content: str, reason: DoneReason | None, m: Metrics) -> bytes:
    if dialect is Dialect.P2:
        # P2 runners send "length" for a length stop and "stop" for everything else; "" while streaming
        text = "" if reason is None else "length" if reason is DoneReason.LENGTH else "stop"
        done_reason = encode_string(text)
    else:
        done_reason = "0" if reason is None else str(int(reason))
    return line(encode_object([
        ("content", encode_string(content)), ("done_reason", done_reason), ("done", encode_bool(reason is not None)),
        ("prompt_eval_count", str(m.prompt_eval_count)), ("prompt_eval_duration", str(m.prompt_eval_duration_ns)),
        ("eval_count", str(m.eval_count)), ("eval_duration", str(m.eval_duration_ns))]))


def encode_chunk(dialect: Dialect, content: str) -> bytes:
    """One streamed piece of generated text, as a full NDJSON line."""
    if dialect is Dialect.P1:
        return line(encode_object([("content", encode_string(content)), ("stop", "false"),
                                   ("timings", _p1_timings(Metrics()))]))
    return _p23(dialect, content, None, Metrics())


def encode_final(dialect: Dialect, reason: DoneReason, metrics: Metrics) -> bytes:
    """The last line of a stream: empty content, done/stop true, the reason and the counters."""
    if dialect is Dialect.P1:
        fields = [("content", '""'), ("stop", "true")]
        if reason is DoneReason.LENGTH:
            fields.append(("stopped_limit", "true"))  # omitempty: absent when false
        fields.append(("timings", _p1_timings(metrics)))
        return line(encode_object(fields))
    return _p23(dialect, "", reason, metrics)


def encode_health(dialect: Dialect, status: ServerStatus, progress: float) -> bytes:
    """The GET /health body: `{"status":…,"progress":…}` with a string (P1) or integer (P2/P3) status."""
    if dialect is Dialect.P1:
        value = encode_string(_P1_STATUS.get(status, "server error"))
    else:
        value = str(int(status))
    return line(encode_object([("status", value), ("progress", encode_float32(progress))]))


def encode_embedding(values: Sequence[float] | npt.NDArray[np.floating[Any]] | None) -> bytes:
    """The POST /embedding body `{"embedding":[…]}` with Go float32 formatting (None -> null)."""
    if values is None:
        body = "null"
    else:
        body = "[" + ",".join(encode_float32(float(v)) for v in np.asarray(values, dtype=np.float32)) + "]"
    return line(encode_object([("embedding", body)]))


def error_body(message: str) -> bytes:
    """Body of Go's http.Error: the message and a newline, sent as text/plain (see ERROR_HEADERS)."""
    return (message + "\n").encode("utf-8")
