"""GPT-2's reversible byte <-> printable-character alphabet used by byte-level BPE vocabularies.

Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the remaining 68 bytes
are given the code points 256, 257, ... in byte order, so every token text is printable.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType


def _byte_chars() -> tuple[str, ...]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


BYTE_TO_CHAR: tuple[str, ...] = _byte_chars()
# str.translate table from Latin-1 decoded bytes to the alphabet
_ENCODE_TABLE: Mapping[int, str] = MappingProxyType({b: c for b, c in enumerate(BYTE_TO_CHAR)})
CHAR_TO_BYTE: Mapping[str, int] = MappingProxyType({c: b for b, c in enumerate(BYTE_TO_CHAR)})


def encode_bytes(text: str) -> str:
    """The alphabet form of `text`'s UTF-8 bytes (one character per byte)."""
    return text.encode("utf-8").decode("latin-1").translate(_ENCODE_TABLE)


def decode_chars(text: str) -> bytes:
    """The bytes a byte-level token text stands for.

    Characters outside the alphabet (possible in hand-added tokens) are kept as their own UTF-8, as Ollama does,
    rather than llama.cpp's "[UNK_BYTE_...]" marker."""
    try:
        return bytes([CHAR_TO_BYTE[c] for c in text])
    except KeyError:
        return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode("utf-8") for c in text)
