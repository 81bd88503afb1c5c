"""runner.gojson: Go encoding/json compatible encoding and decoding primitives."""
from __future__ import annotations

import pytest

from runner.errors import RequestError
from runner.gojson import (JsonObject, JsonValue, compact, encode_bytes_text, encode_float32, encode_float64,
                           encode_object, encode_string, fold_key, kind, line, parse_document)


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("", '""', id="empty"),
    pytest.param('a"b\\c', '"a\\"b\\\\c"', id="quote-backslash"),
    pytest.param("<script>&", '"\\u003cscript\\u003e\\u0026"', id="html-escaped"),
    pytest.param("\n\r\t\b\f", '"\\n\\r\\t\\b\\f"', id="short-escapes"),
    pytest.param("\x00\x01\x1f\x7f", '"\\u0000\\u0001\\u001f\x7f"', id="controls-lowercase-hex-del-raw"),
    pytest.param("\u2028\u2029", '"\\u2028\\u2029"', id="line-separators"),
    pytest.param("héllo 世界 🙂", '"héllo 世界 🙂"', id="unicode-raw"),
    pytest.param("a\ud800b", '"a\ufffdb"', id="lone-surrogate"),
])
def test_encode_string(text: str, expected: str) -> None:
    assert encode_string(text) == expected


def test_encode_bytes_text_replaces_invalid() -> None:
    assert encode_bytes_text(b"a\xffb\xc3\xa9") == '"a\ufffdbé"'


@pytest.mark.parametrize(("value", "expected"), [
    (0.0, "0"), (-0.0, "-0"), (41.0, "41"), (41.5, "41.5"), (0.1, "0.1"), (1e20, "100000000000000000000"),
    (1e21, "1e+21"), (1e-6, "0.000001"), (1e-7, "1e-7"), (1.5e-7, "1.5e-7"), (123456789.125, "123456789.125"),
    (1e-100, "1e-100"), (-2.5, "-2.5"),
])
def test_encode_float64(value: float, expected: str) -> None:
    assert encode_float64(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (0.41, "0.41"), (0.1, "0.1"), (1.0, "1"), (1e-7, "1e-7"), (3.4e38, "3.4e+38"), (16777217.0, "16777216"),
    (1 / 3, "0.33333334"), (0.0, "0"),
])
def test_encode_float32(value: float, expected: str) -> None:
    assert encode_float32(value) == expected


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_encode_float_rejects_non_finite(value: float) -> None:
    with pytest.raises(ValueError):
        encode_float64(value)


def test_object_and_line() -> None:
    assert line(encode_object([("a", "1"), ("b<", '"x"')])) == b'{"a":1,"b\\u003c":"x"}\n'


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param(b' {"a":1} trailing', JsonObject((("a", 1),)), id="trailing-ignored"),
    pytest.param(b"null", None, id="null"),
    pytest.param(b'[1,"x",2.5,true]', [1, "x", 2.5, True], id="array"),
    pytest.param(b'{"a":1,"A":2}', JsonObject((("a", 1), ("A", 2))), id="duplicates-kept-in-order"),
    pytest.param(b'{"s":"\\ud800x"}', JsonObject((("s", "\ufffdx"),)), id="lone-surrogate-escape"),
    pytest.param(b'{"s":"a\xffb"}', JsonObject((("s", "a\ufffdb"),)), id="invalid-utf8"),
    pytest.param(b'{"o":{"k":[]}}', JsonObject((("o", JsonObject((("k", []),))),)), id="nested"),
])
def test_parse_document(body: bytes, expected: JsonValue) -> None:
    assert parse_document(body) == expected


@pytest.mark.parametrize("body", [b"", b"   \n", b'{"a":NaN}', b'{"a":Infinity}', b'{"a":', b"nope",
                                  b"[" * 100000])
def test_parse_document_errors(body: bytes) -> None:
    with pytest.raises(RequestError):
        parse_document(body)


@pytest.mark.parametrize(("key", "expected"), [
    ("Prompt", "PROMPT"), ("pRoMpT", "PROMPT"), ("num_ctx", "NUM_CTX"), ("\u212a", "K"), ("\u017f", "S"),
    ("ß", "ß"),
])
def test_fold_key(key: str, expected: str) -> None:
    assert fold_key(key) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (None, "null"), (True, "bool"), (1, "number 1"), (1.5, "number 1.5"), ("x", "string"), ([], "array"),
    (JsonObject(()), "object"),
])
def test_kind(value: JsonValue, expected: str) -> None:
    assert kind(value) == expected


def test_compact_last_duplicate_wins() -> None:
    assert compact(parse_document('{"a": 1, "a": [2, {"b": "é"}]}'.encode())) == '{"a":[2,{"b":"é"}]}'
