"""runner.responses: byte-exact NDJSON lines, health and error bodies per dialect (runner-protocol.md §2.1, §2.2, §6).

Expected bytes are what Go's json.NewEncoder(w).Encode writes for the Go runner's structs: struct field order,
no spaces, HTML escaping, a trailing newline.
"""
from __future__ import annotations

import numpy as np
import pytest

from runner.protocol import Dialect
from runner.responses import (DoneReason, Metrics, ServerStatus, encode_chunk, encode_embedding, encode_final,
                              encode_health, error_body)

P1_ZERO_TIMINGS = b'"timings":{"predicted_n":0,"predicted_ms":0,"prompt_n":0,"prompt_ms":0}'
P23_ZERO_COUNTS = b'"prompt_eval_count":0,"prompt_eval_duration":0,"eval_count":0,"eval_duration":0'


@pytest.mark.parametrize(("dialect", "content", "expected"), [
    pytest.param(Dialect.P1, "Hel", b'{"content":"Hel","stop":false,' + P1_ZERO_TIMINGS + b"}\n", id="p1-§6"),
    pytest.param(Dialect.P2, "A", b'{"content":"A","done_reason":"","done":false,' + P23_ZERO_COUNTS + b"}\n",
                 id="p2-string-zero-reason"),
    pytest.param(Dialect.P3, "A", b'{"content":"A","done_reason":0,"done":false,' + P23_ZERO_COUNTS + b"}\n",
                 id="p3-§6"),
    pytest.param(Dialect.P3, "<b>&", b'{"content":"\\u003cb\\u003e\\u0026","done_reason":0,"done":false,'
                 + P23_ZERO_COUNTS + b"}\n", id="p3-html-escaped"),
    pytest.param(Dialect.P3, 'é "q"\n', b'{"content":"\xc3\xa9 \\"q\\"\\n","done_reason":0,"done":false,'
                 + P23_ZERO_COUNTS + b"}\n", id="p3-unicode-and-escapes"),
])
def test_chunk(dialect: Dialect, content: str, expected: bytes) -> None:
    assert encode_chunk(dialect, content) == expected


P1_METRICS = Metrics(prompt_eval_count=12, prompt_eval_duration_ns=88_999_999, eval_count=3,
                     eval_duration_ns=41_000_000)
P3_METRICS = Metrics(prompt_eval_count=283, prompt_eval_duration_ns=912_000_000, eval_count=57,
                     eval_duration_ns=1_430_000_000)
P3_COUNTS = b'"prompt_eval_count":283,"prompt_eval_duration":912000000,"eval_count":57,"eval_duration":1430000000'


@pytest.mark.parametrize(("dialect", "reason", "metrics", "expected"), [
    pytest.param(Dialect.P1, DoneReason.STOP, P1_METRICS,
                 b'{"content":"","stop":true,"timings":{"predicted_n":3,"predicted_ms":41,"prompt_n":12,'
                 b'"prompt_ms":88}}\n', id="p1-stop-§6-ms-truncated"),
    pytest.param(Dialect.P1, DoneReason.LENGTH, P1_METRICS,
                 b'{"content":"","stop":true,"stopped_limit":true,"timings":{"predicted_n":3,"predicted_ms":41,'
                 b'"prompt_n":12,"prompt_ms":88}}\n', id="p1-length-stopped-limit"),
    pytest.param(Dialect.P2, DoneReason.STOP, P3_METRICS,
                 b'{"content":"","done_reason":"stop","done":true,' + P3_COUNTS + b"}\n", id="p2-stop"),
    pytest.param(Dialect.P2, DoneReason.LENGTH, P3_METRICS,
                 b'{"content":"","done_reason":"length","done":true,' + P3_COUNTS + b"}\n", id="p2-length"),
    pytest.param(Dialect.P2, DoneReason.CONNECTION_CLOSED, P3_METRICS,
                 b'{"content":"","done_reason":"stop","done":true,' + P3_COUNTS + b"}\n", id="p2-other-is-stop"),
    pytest.param(Dialect.P3, DoneReason.STOP, P3_METRICS,
                 b'{"content":"","done_reason":0,"done":true,' + P3_COUNTS + b"}\n", id="p3-stop-§6"),
    pytest.param(Dialect.P3, DoneReason.LENGTH, P3_METRICS,
                 b'{"content":"","done_reason":1,"done":true,' + P3_COUNTS + b"}\n", id="p3-length"),
    pytest.param(Dialect.P3, DoneReason.CONNECTION_CLOSED, Metrics(),
                 b'{"content":"","done_reason":2,"done":true,' + P23_ZERO_COUNTS + b"}\n", id="p3-connection"),
])
def test_final(dialect: Dialect, reason: DoneReason, metrics: Metrics, expected: bytes) -> None:
    assert encode_final(dialect, reason, metrics) == expected


@pytest.mark.parametrize(("dialect", "status", "progress", "expected"), [
    pytest.param(Dialect.P1, ServerStatus.LOADING_MODEL, 0.0, b'{"status":"loading model","progress":0}\n',
                 id="p1-loading-§6"),
    pytest.param(Dialect.P1, ServerStatus.READY, 0.0, b'{"status":"ok","progress":0}\n', id="p1-ok-§6"),
    pytest.param(Dialect.P1, ServerStatus.NO_SLOTS_AVAILABLE, 1.0, b'{"status":"no slot available","progress":1}\n',
                 id="p1-no-slot"),
    pytest.param(Dialect.P1, ServerStatus.ERROR, 0.5, b'{"status":"server error","progress":0.5}\n', id="p1-error"),
    pytest.param(Dialect.P1, ServerStatus.NOT_RESPONDING, 0.0, b'{"status":"server error","progress":0}\n',
                 id="p1-other-is-error"),
    pytest.param(Dialect.P2, ServerStatus.LOADING_MODEL, 0.41, b'{"status":2,"progress":0.41}\n', id="p2-loading"),
    pytest.param(Dialect.P3, ServerStatus.LOADING_MODEL, 0.41, b'{"status":2,"progress":0.41}\n', id="p3-loading-§6"),
    pytest.param(Dialect.P3, ServerStatus.READY, 1.0, b'{"status":0,"progress":1}\n', id="p3-ready-§6"),
    pytest.param(Dialect.P3, ServerStatus.ERROR, 1 / 3, b'{"status":4,"progress":0.33333334}\n', id="p3-float32"),
])
def test_health(dialect: Dialect, status: ServerStatus, progress: float, expected: bytes) -> None:
    assert encode_health(dialect, status, progress) == expected


@pytest.mark.parametrize(("values", "expected"), [
    pytest.param([0.5, -1.0, 0.1], b'{"embedding":[0.5,-1,0.1]}\n', id="list"),
    pytest.param(np.array([1e-7, 2.0], dtype=np.float32), b'{"embedding":[1e-7,2]}\n', id="ndarray"),
    pytest.param([], b'{"embedding":[]}\n', id="empty"),
    pytest.param(None, b'{"embedding":null}\n', id="null"),
])
def test_embedding(values: list[float] | None, expected: bytes) -> None:
    assert encode_embedding(values) == expected


@pytest.mark.parametrize(("message", "expected"), [
    ("Bad request", b"Bad request\n"),
    ("this model does not support embeddings", b"this model does not support embeddings\n"),
])
def test_error_body(message: str, expected: bytes) -> None:
    # §2: Go's http.Error writes "<message>\n" as text/plain
    assert error_body(message) == expected


def test_done_reason_and_status_numbers() -> None:
    # §2.1 llm.ServerStatus and §2.2 P3 done_reason
    assert [int(s) for s in ServerStatus] == [0, 1, 2, 3, 4]
    assert (int(DoneReason.STOP), int(DoneReason.LENGTH), int(DoneReason.CONNECTION_CLOSED)) == (0, 1, 2)
