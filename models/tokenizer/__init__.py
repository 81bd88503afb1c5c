"""Tokenizers built from GGUF metadata, matching llama.cpp's tokenization token for token.

    tok = tokenizer_from_metadata(gguf_metadata)
    ids = tok.encode("Hello", add_special=True, parse_special=True)
    tok.token_bytes(ids[-1]); tok.decode(ids); tok.is_eog(i)

Kinds: byte-level BPE (gpt2, and Gemma-4's U+2581-style BPE), SentencePiece (llama), WordPiece (bert).
"""
from __future__ import annotations

from models.tokenizer.attrs import TokenAttr, TokenType
from models.tokenizer.base import Tokenizer
from models.tokenizer.bpe import BpeTokenizer
from models.tokenizer.factory import SUPPORTED_MODELS, tokenizer_from_metadata
from models.tokenizer.spm import SpmTokenizer
from models.tokenizer.wpm import WpmTokenizer

__all__ = [
    "SUPPORTED_MODELS",
    "BpeTokenizer",
    "SpmTokenizer",
    "TokenAttr",
    "TokenType",
    "Tokenizer",
    "WpmTokenizer",
    "tokenizer_from_metadata",
]
