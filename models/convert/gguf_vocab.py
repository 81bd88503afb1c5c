"""The token list and token types GGUF `bert` stores: WordPiece pieces rewritten to the phantom-space form."""
from __future__ import annotations

from dataclasses import dataclass

from gguf import TokenType

from models.convert.errors import ConversionError
from models.convert.tokenizer_files import WordPieceTokenizer

_PHANTOM_SPACE = "\u2581"


@dataclass(frozen=True)
class GgufVocab:
    """`tokens[i]` and `types[i]` describe token id i."""

    tokens: list[str]
    types: list[int]


def _looks_special(token: str) -> bool:
    """Added tokens some models forget to flag as special (pad/mask/chat markers/unused slots)."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def to_phantom_space(token: str, token_type: int) -> str:
    """ggml's WPM tokenizer marks word starts, not continuations: `##ing` → `ing`, `play` → `▁play`.

    Control tokens ([CLS], [SEP], ...) are matched verbatim and stay as they are.
    """
    if token_type == TokenType.CONTROL:
        return token
    if token.startswith("##"):
        return token[2:]
    return _PHANTOM_SPACE + token


def build_gguf_vocab(tok: WordPieceTokenizer, vocab_size: int) -> GgufVocab:
    """One entry per id below `vocab_size` (config.json's), holes filled with `[PAD{i}]` UNUSED placeholders."""
    if max(tok.vocab.values()) >= vocab_size:
        raise ConversionError(
            f"tokenizer has id {max(tok.vocab.values())} but config.json vocab_size is {vocab_size}"
        )
    by_id = {idx: piece for piece, idx in tok.vocab.items()}
    added_contents = {a.content for a in tok.added.values()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        piece = by_id.get(i)
        if piece is None:
            text, ttype = f"[PAD{i}]", TokenType.UNUSED
        elif (text := piece) in added_contents:
            added = tok.added.get(i)
            if (added is not None and added.special) or _looks_special(text):
                ttype = TokenType.CONTROL
            else:
                # user-defined pieces are matched pre-normalized: a literal ▁ means a space
                text, ttype = text.replace(_PHANTOM_SPACE, " "), TokenType.USER_DEFINED
        else:
            text, ttype = piece, TokenType.NORMAL
        tokens.append(to_phantom_space(text, ttype))
        types.append(int(ttype))
    return GgufVocab(tokens=tokens, types=types)

