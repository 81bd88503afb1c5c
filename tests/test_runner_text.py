"""runner.text: stop strings, partial UTF-8 and flushing of pending pieces (runner-protocol.md §5 items 5–7)."""
from __future__ import annotations

import pytest

from runner.text import (Action, Decision, check_pending, encode_stops, ends_with_stop_prefix, find_stop,
                         flush_pending, incomplete_utf8_tail, split_at, valid_utf8_prefix)

EOT = (b"<|eot_id|>",)


@pytest.mark.parametrize(("data", "expected"), [
    (b"", False), (b"a", False), (b"\xc3", True), (b"\xc3\xa9", False), (b"\xe4", True), (b"\xe4\xb8", True),
    (b"\xe4\xb8\x96", False), (b"\xf0\x9f", True), (b"\xf0\x9f\x99", True), (b"\xf0\x9f\x99\x82", False),
    (b"a\xff", False),  # invalid, not incomplete: the flush removes it
    (b"\x80\x80\x80\x80", False),  # no lead byte within the last 4 bytes
    (b"\xc3\xa9\xa9", False),  # too many continuation bytes: invalid, not incomplete
    (b"ok\xf0", True),
])
def test_incomplete_utf8_tail(data: bytes, expected: bool) -> None:
    assert incomplete_utf8_tail(data) is expected


@pytest.mark.parametrize(("data", "expected"), [
    (b"abc", "abc"), (b"ab\xc3", "ab"), (b"a\xffb", "a"), (b"\xe4\xb8\x96\xe7", "世"), (b"", ""),
    (b"\xed\xa0\x80x", ""),  # an encoded surrogate is invalid UTF-8
])
def test_valid_utf8_prefix(data: bytes, expected: str) -> None:
    # §5.6: remove bytes from the end until valid, so an invalid byte drops everything after it
    assert valid_utf8_prefix(data) == expected


@pytest.mark.parametrize(("text", "stops", "expected"), [
    (b"hello world", (b"wor",), 6), (b"hello", (b"x",), -1), (b"xab", (b"b", b"a"), 1), (b"", (b"a",), -1),
    (b"abc", (), -1),
])
def test_find_stop(text: bytes, stops: tuple[bytes, ...], expected: int) -> None:
    assert find_stop(text, stops) == expected


@pytest.mark.parametrize(("text", "stops", "expected"), [
    (b"hello <|e", EOT, True), (b"hello <", EOT, True), (b"hello", EOT, False), (b"a<|eot_id|", EOT, True),
    (b"a\xc3", ("é".encode(),), True),  # a stop's prefix may end inside a character
    (b"<", (), False), (b"", EOT, False), (b"ab", (b"xb", b"bz"), True),
])
def test_ends_with_stop_prefix(text: bytes, stops: tuple[bytes, ...], expected: bool) -> None:
    assert ends_with_stop_prefix(text, stops) is expected


@pytest.mark.parametrize(("pieces", "cut", "expected"), [
    ([b"ab", b"cd"], 2, (1, False)), ([b"ab", b"cd"], 3, (1, True)), ([b"ab"], 0, (0, False)),
    ([b"a", b"", b"b"], 1, (1, False)), ([b"abc"], 1, (0, True)),
])
def test_split_at(pieces: list[bytes], cut: int, expected: tuple[int, bool]) -> None:
    assert split_at(pieces, cut) == expected


@pytest.mark.parametrize(("pieces", "stops", "expected"), [
    pytest.param([b"Hel"], (), Decision(Action.SEND, "Hel"), id="plain"),
    pytest.param([b"a", b"b"], (), Decision(Action.SEND, "ab"), id="joins-pending"),
    pytest.param([b"Hello", b" <"], EOT, Decision(Action.HOLD), id="hold-stop-prefix"),
    pytest.param([b"<", b"|"], (b"<|x",), Decision(Action.HOLD), id="hold-prefix-across-pieces"),
    pytest.param([b"Hello", b" <|eot_id|>"], EOT, Decision(Action.STOP, "Hello ", 1, True, "<|eot_id|>"),
                 id="stop-cuts-piece"),
    pytest.param([b"Hi", b"<|eot_id|>"], EOT, Decision(Action.STOP, "Hi", 1, False, "<|eot_id|>"),
                 id="stop-whole-piece"),
    pytest.param([b"<|eot_id|>"], EOT, Decision(Action.STOP, "", 0, False, "<|eot_id|>"), id="stop-only"),
    pytest.param([b"ab", b"<|e", b"ot_id|>"], EOT, Decision(Action.STOP, "ab", 1, False, "<|eot_id|>"),
                 id="stop-across-pieces"),
    pytest.param([b"x", b"y<|eot_id|>z"], EOT, Decision(Action.STOP, "xy", 1, True, "<|eot_id|>"), id="stop-mid-piece"),
    pytest.param([b"\xe4\xb8"], (), Decision(Action.HOLD), id="hold-partial-utf8"),
    pytest.param([b"\xe4\xb8", b"\x96"], (), Decision(Action.SEND, "世"), id="send-completed-utf8"),
    pytest.param([b"a\xffb"], (), Decision(Action.SEND, "a"), id="invalid-byte-truncates"),
    pytest.param([b"x\xe4\xb8", b"\x96\xe7\x95\x8c!"], ("世界".encode(),), Decision(Action.STOP, "x", 0, True, "世界"),
                 id="multibyte-stop"),
    pytest.param([b"xab"], (b"b", b"a"), Decision(Action.STOP, "x", 0, True, "a"), id="earliest-stop-wins"),
    pytest.param([b"xab"], (b"ab", b"a"), Decision(Action.STOP, "x", 0, True, "ab"), id="tie-first-listed"),
    pytest.param([b"a", b"", b"STOP"], (b"STOP",), Decision(Action.STOP, "a", 1, False, "STOP"),
                 id="empty-piece-at-cut"),
    pytest.param([b"ab\xe4"], (b"\xe4z",), Decision(Action.HOLD), id="stop-prefix-before-utf8"),
])
def test_check_pending(pieces: list[bytes], stops: tuple[bytes, ...], expected: Decision) -> None:
    assert check_pending(pieces, stops) == expected


def _go_cache_len(n_cached: int, pieces: list[bytes], stop: bytes) -> int:
    """The Go runner's cache trim after a stop (independent re-statement of §5.5 for one stop string)."""
    joined = b"".join(pieces)
    cut = joined.find(stop)
    kept, truncated, start = [], False, 0
    for piece in pieces:
        if start >= cut:
            break
        end = start + len(piece)
        if end > cut:
            end, truncated = cut, True
        kept.append(joined[start:end])
        start = end
    n = n_cached + 1 - (len(pieces) - len(kept))
    return n - 1 if truncated or len(kept) == len(pieces) else n


@pytest.mark.parametrize("pieces", [
    [b"Hello", b" <|eot_id|>"], [b"Hi", b"<|eot_id|>"], [b"<|eot_id|>"], [b"ab", b"<|e", b"ot_id|>"],
    [b"x", b"y<|eot_id|>z"], [b"a", b"b", b"c<|eot_id|>"], [b"abc<|eot_id|>"],
])
def test_cache_trim_matches_go(pieces: list[bytes]) -> None:
    # Decision docstring: the slot keeps len(cached) + 1 - len(pending) + n_full inputs
    n_cached = 10
    d = check_pending(pieces, EOT)
    assert d.action is Action.STOP
    assert n_cached + 1 - len(pieces) + d.n_full == _go_cache_len(n_cached, pieces, EOT[0])


@pytest.mark.parametrize(("pieces", "expected"), [
    ([b"abc", b"\xe4\xb8"], "abc"), ([b"a\xffb"], "a"), ([], ""), ([b"<|e"], "<|e"),
])
def test_flush_pending(pieces: list[bytes], expected: str) -> None:
    # §5.6: on finish the withheld text is flushed, cut to valid UTF-8
    assert flush_pending(pieces) == expected


def test_encode_stops() -> None:
    assert encode_stops(["a", "", "é"]) == (b"a", b"\xc3\xa9")


def test_streaming_simulation() -> None:
    """Feed token pieces one by one as the runner loop does and collect what is sent."""
    tokens = [b"The", b" \xe4", b"\xb8\x96", b" <", b"|eot", b"_id|>", b"more"]
    stops = encode_stops(["<|eot_id|>"])
    pending: list[bytes] = []
    sent: list[str] = []
    for piece in tokens:
        pending.append(piece)
        d = check_pending(pending, stops)
        if d.action is Action.HOLD:
            continue
        if d.text:
            sent.append(d.text)
        pending = []
        if d.action is Action.STOP:
            break
    assert sent == ["The", " 世", " "]
