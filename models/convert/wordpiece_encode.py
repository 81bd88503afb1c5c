"""A Hugging Face-compatible BERT encoder (BertNormalizer → BertPreTokenizer → WordPiece → template).

The converter only uses it to fingerprint the tokenizer the way llama.cpp does (hash of the ids of a fixed
probe text), so it favours matching `tokenizers` exactly over speed.
"""
from __future__ import annotations

import unicodedata

from models.convert.tokenizer_files import BertNormalization, WordPieceTokenizer

# Unicode White_Space (what Rust's char::is_whitespace tests); Python's isspace() also counts U+001C..U+001F.
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_ASCII_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")

# CJK Unified Ideographs blocks that BertNormalizer surrounds with spaces.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_whitespace(c: str) -> bool:
    return c in _WHITE_SPACE


def _is_control(c: str) -> bool:
    # tab/newline/CR count as whitespace, not control
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_cjk(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_punctuation(c: str) -> bool:
    return c in _ASCII_PUNCT or unicodedata.category(c).startswith("P")


def normalize(text: str, norm: BertNormalization) -> str:
    """BertNormalizer: clean control chars, space out CJK, strip accents, lowercase (in that order)."""
    if norm.clean_text:
        text = "".join(
            " " if _is_whitespace(c) else c
            for c in text
            if not (c == "\x00" or c == "\ufffd" or _is_control(c))
        )
    if norm.handle_chinese_chars:
        text = "".join(f" {c} " if _is_cjk(c) else c for c in text)
    strip = norm.lowercase if norm.strip_accents is None else norm.strip_accents
    if strip:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    if norm.lowercase:
        text = text.lower()
    return text


def pre_tokenize(text: str) -> list[str]:
    """BertPreTokenizer: split on whitespace (dropped) and punctuation (kept, one char per word)."""
    words: list[str] = []
    current: list[str] = []
    for c in text:
        if _is_whitespace(c) or _is_punctuation(c):
            if current:
                words.append("".join(current))
                current = []
            if not _is_whitespace(c):
                words.append(c)
        else:
            current.append(c)
    if current:
        words.append("".join(current))
    return words


def wordpiece(word: str, tok: WordPieceTokenizer) -> list[int]:
    """Greedy longest-match-first; a word with any unmatched stretch becomes a single unknown token."""
    unk = [tok.vocab[tok.unk_token]] if tok.unk_token in tok.vocab else []
    if len(word) > tok.max_input_chars_per_word:
        return unk
    ids: list[int] = []
    start = 0
    while start < len(word):
        end = len(word)
        found: int | None = None
        while start < end:
            piece = word[start:end] if start == 0 else tok.continuing_prefix + word[start:end]
            found = tok.vocab.get(piece)
            if found is not None:
                break
            end -= 1
        if found is None:
            return unk
        ids.append(found)
        start = end
    return ids


def encode(text: str, tok: WordPieceTokenizer, norm: BertNormalization) -> list[int]:
    """Token ids of `text` with the single-sequence template applied (e.g. [CLS] … [SEP])."""
    body: list[int] = []
    for word in pre_tokenize(normalize(text, norm)):
        body.extend(wordpiece(word, tok))
    ids: list[int] = []
    for item in tok.template:
        if item is None:
            ids.extend(body)
        elif item in tok.vocab:
            ids.append(tok.vocab[item])
    return ids
