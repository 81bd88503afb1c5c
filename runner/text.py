"""Streaming text decisions: stop strings, partial UTF-8 and flushing (runner-protocol.md §5 items 5–7).

Pure functions over the pending (not yet sent) token pieces of one sequence, as raw bytes, so a character split
across byte-level tokens is never emitted in halves. After each sampled token the caller appends its piece and asks
`check_pending`; it sends, withholds or stops. No tokenizer or model here.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class Action(enum.Enum):
    """What to do with the pending pieces after a token."""

    SEND = "send"  # emit `text` and clear the pending pieces
    HOLD = "hold"  # keep everything pending (a stop string or a character may be completing)
    STOP = "stop"  # emit `text` (the part before the stop string) and end the sequence with reason Stop


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of `check_pending`.

    For STOP, `n_full` pending pieces were sent whole and, if `cut`, the next one was sent in part; the tokens
    of the others (the one holding the stop string, and the cut one) must be dropped from the slot's cached
    inputs: of the pending tokens keep the first `n_full`, i.e. the slot keeps
    `len(cached) + 1 - len(pending) + n_full` inputs (the newest token is not in the cache yet).
    """

    action: Action
    text: str = ""
    n_full: int = 0
    cut: bool = False
    stop: str = ""  # for STOP: the stop string found (the earliest; of several there, the first listed)


def encode_stops(stops: Iterable[str]) -> tuple[bytes, ...]:
    """Stop strings as UTF-8 bytes; empty ones are dropped (they would match before any text)."""
    return tuple(s.encode("utf-8") for s in stops if s)


def incomplete_utf8_tail(data: bytes) -> bool:
    """Whether `data` ends inside a multi-byte UTF-8 character (a lead byte among the last 4 bytes lacking some
    of its continuation bytes). Invalid bytes do not count as incomplete: flushing removes them."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        if byte & 0xE0 == 0xC0:
            return back < 2
        if byte & 0xF0 == 0xE0:
            return back < 3
        if byte & 0xF8 == 0xF0:
            return back < 4
        return False  # ASCII or a byte that can never start a character
    return False


def valid_utf8_prefix(data: bytes) -> str:
    """The longest prefix of `data` that is valid UTF-8, decoded.

    Same result as Go's "drop the last byte until the string is valid": an invalid byte in the middle
    therefore loses everything after it.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return data[: exc.start].decode("utf-8")


def find_stop(text: bytes, stops: Sequence[bytes]) -> int:
    """Byte offset of the earliest occurrence of any stop string in `text`, or -1."""
    return first_stop(text, stops)[0]


def first_stop(text: bytes, stops: Sequence[bytes]) -> tuple[int, bytes]:
    """(offset, stop) of the earliest occurrence of any stop string in `text` (of several there, the first
    listed), or (-1, b"")."""
    hits = [(i, n, s) for n, s in enumerate(stops) if s and (i := text.find(s)) >= 0]
    if not hits:
        return -1, b""
    i, _, stop = min(hits)
    return i, stop


def ends_with_stop_prefix(text: bytes, stops: Sequence[bytes]) -> bool:
    """Whether `text` ends with a non-empty prefix of some stop string (which the next tokens might complete)."""
    for stop in stops:
        for n in range(min(len(stop), len(text)), 0, -1):
            if text.endswith(stop[:n]):
                return True
    return False


def split_at(pieces: Sequence[bytes], cut: int) -> tuple[int, bool]:
    """For a cut at byte offset `cut` of the joined pieces: how many pieces lie wholly before it, and whether
    the next piece is cut in two. An empty piece right at the cut does not count as sent (as in Go)."""
    start = 0
    n_full = 0
    for piece in pieces:
        if start >= cut:
            return n_full, False
        end = start + len(piece)
        if end > cut:
            return n_full, True
        n_full += 1
        start = end
    return n_full, False


def check_pending(pieces: Sequence[bytes], stops: Sequence[bytes]) -> Decision:
    """Decide what to do with a sequence's unsent pieces after a new token's piece was appended.

    Order (runner-protocol.md §5.5): a stop string anywhere -> STOP with the text before its earliest
    occurrence; else text ending with a prefix of a stop -> HOLD; else text ending inside a UTF-8 character ->
    HOLD; else SEND. Sent text is always cut to its longest valid UTF-8 prefix (Go's flush does the same).
    """
    joined = b"".join(pieces)
    cut, stop = first_stop(joined, stops)
    if cut >= 0:
        n_full, was_cut = split_at(pieces, cut)
        return Decision(Action.STOP, valid_utf8_prefix(joined[:cut]), n_full, was_cut, stop.decode("utf-8"))
    if ends_with_stop_prefix(joined, stops) or incomplete_utf8_tail(joined):
        return Decision(Action.HOLD)
    return Decision(Action.SEND, valid_utf8_prefix(joined))


def flush_pending(pieces: Sequence[bytes]) -> str:
    """The text to emit when a sequence ends for another reason (EOS, length): everything still withheld,
    cut to its longest valid UTF-8 prefix (runner-protocol.md §5.6)."""
    return valid_utf8_prefix(b"".join(pieces))
