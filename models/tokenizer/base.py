"""The interface every tokenizer kind implements, and the parts they share.

Encoding follows llama.cpp's `llama_tokenize(text, add_special, parse_special)`: special tokens are cut out of
the text first (control tokens only when `parse_special`; user-defined tokens always), the remaining fragments go
through the model-specific algorithm, and BOS/EOS are added per the vocabulary's flags when `add_special`.

Decoding follows llama.cpp's `token_to_piece(..., special=True)`, which is what Ollama's runner streams: control,
unknown and user-defined tokens render as their literal text (e.g. "<|im_end|>"), normal tokens as the bytes they
stand for, byte tokens as their single byte, and unused/undefined tokens as nothing.
"""
from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt
import regex

from models.tokenizer.attrs import HIDDEN_ATTRS, TokenAttr
from models.tokenizer.special import Fragment, SpecialSplitter
from models.tokenizer.vocab import Vocab

log = logging.getLogger(__name__)

# Distinct words/chunks whose token ids are remembered per tokenizer.
WORD_CACHE_SIZE = 1 << 16

_RENDER_AS_TEXT = int(TokenAttr.CONTROL | TokenAttr.UNKNOWN | TokenAttr.USER_DEFINED)


_SURROGATE = regex.compile(r"[\ud800-\udfff]")


def _clean(text: str) -> str:
    # lone surrogates (e.g. from a JSON "\ud800" escape) cannot be UTF-8 encoded: one U+FFFD each, as Go's JSON
    # decoder would have produced for Ollama
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return str(_SURROGATE.sub("\ufffd", text))
    return text


class Tokenizer(ABC):
    """Text <-> token ids for one GGUF vocabulary."""

    def __init__(self, vocab: Vocab) -> None:
        self._vocab = vocab
        self._splitter = SpecialSplitter(vocab.tokens, vocab.attrs, vocab.special_ids)
        self._eog = vocab.ids.eog()
        self._rendered: dict[int, bytes] = {}  # token_bytes' answers: a generated token is rendered every step

    # --- encoding -------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for `text`.

        add_special: add BOS/EOS (or CLS/SEP for BERT) as the vocabulary asks.
        parse_special: recognise control tokens written in the text (e.g. "<|im_start|>"); user-defined tokens
        are recognised either way, as in llama.cpp."""
        fragments = self._splitter.split(_clean(text), parse_special)
        return self._encode_fragments(fragments, add_special)

    @abstractmethod
    def _encode_fragments(self, fragments: Sequence[Fragment], add_special: bool) -> list[int]:
        """Ids for raw-text fragments interleaved with already-decided special ids."""

    def _with_bos_eos(self, body: list[int], add_special: bool) -> list[int]:
        if not add_special:
            return body
        if self.add_bos:
            if self.bos_id is None:
                log.warning("vocabulary asks for BOS but has no bos_token_id; not adding one")
            else:
                body.insert(0, self.bos_id)
        if self.add_eos:
            if self.eos_id is None:
                log.warning("vocabulary asks for EOS but has no eos_token_id; not adding one")
            else:
                body.append(self.eos_id)
        return body

    @staticmethod
    def _word_cache(fn: Callable[[str], tuple[int, ...]]) -> Callable[[str], tuple[int, ...]]:
        # per-instance, bounded and thread-safe memo of the expensive per-word step
        return functools.lru_cache(maxsize=WORD_CACHE_SIZE)(fn)

    # --- decoding -------------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` renders as (possibly a partial UTF-8 sequence); see the module docstring."""
        known = self._rendered.get(token_id)
        if known is None:
            known = self._rendered[token_id] = self._render(token_id)
        return known

    def _render(self, token_id: int) -> bytes:
        attr = self._vocab.attrs[self._check(token_id)]
        text = self._vocab.tokens[token_id]
        if attr & _RENDER_AS_TEXT:
            return text.encode("utf-8")
        if attr & TokenAttr.NORMAL:
            return self._normal_bytes(text)
        if attr & TokenAttr.BYTE:
            return bytes([int(text[3:5], 16)])  # "<0xAB>"
        return b""

    @abstractmethod
    def _normal_bytes(self, text: str) -> bytes:
        """The bytes a NORMAL token's text stands for."""

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """The text of `ids` (invalid UTF-8 replaced by U+FFFD), as llama.cpp's detokenize renders it without
        its optional clean-ups: when the vocabulary adds a space prefix, the first token loses one leading space.
        special=False drops control/unknown tokens."""
        attrs = self._vocab.attrs
        parts = [self.token_bytes(i) if special or not attrs[self._check(i)] & HIDDEN_ATTRS else b"" for i in ids]
        if parts and self._vocab.add_space_prefix and parts[0].startswith(b" "):
            parts[0] = parts[0][1:]
        return b"".join(parts).decode("utf-8", errors="replace")

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._vocab.tokens):
            raise ValueError(f"token id {token_id} outside the vocabulary of {len(self._vocab.tokens)} tokens")
        return token_id

    # --- vocabulary facts -----------------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        """Number of tokens."""
        return len(self._vocab.tokens)

    @property
    def bos_id(self) -> int | None:
        return self._vocab.ids.bos

    @property
    def eos_id(self) -> int | None:
        return self._vocab.ids.eos

    @property
    def eot_id(self) -> int | None:
        return self._vocab.ids.eot

    @property
    def unk_id(self) -> int | None:
        return self._vocab.ids.unk

    @property
    def pad_id(self) -> int | None:
        return self._vocab.ids.pad

    @property
    def cls_id(self) -> int | None:
        """`cls_token_id` from the metadata (for BERT this falls back to the BOS, which plays that role)."""
        return self._vocab.ids.cls

    @property
    def sep_id(self) -> int | None:
        return self._vocab.ids.sep

    @property
    def add_bos(self) -> bool:
        """Whether encode(add_special=True) prepends BOS."""
        return self._vocab.add_bos

    @property
    def add_eos(self) -> bool:
        """Whether encode(add_special=True) appends EOS."""
        return self._vocab.add_eos

    @property
    def eog_ids(self) -> frozenset[int]:
        """Ids that end generation: eos_token_id, eos_token_ids, eot_token_id, eom_token_id (those present)."""
        return self._eog

    def is_eog(self, token_id: int) -> bool:
        """Whether `token_id` ends generation."""
        return token_id in self._eog

    @property
    def token_type(self) -> npt.NDArray[np.int32]:
        """`tokenizer.ggml.token_type` per token (read-only; NORMAL everywhere when the metadata has none)."""
        return self._vocab.token_type

    @property
    def model(self) -> str:
        """`tokenizer.ggml.model`."""
        return self._vocab.model

    @property
    def pre(self) -> str:
        """`tokenizer.ggml.pre` ('' when absent)."""
        return self._vocab.pre

    def token_text(self, token_id: int) -> str:
        """The token's text as stored in the vocabulary (byte-level alphabet, U+2581 for spaces, ...)."""
        return self._vocab.tokens[self._check(token_id)]

    def token_id(self, text: str) -> int | None:
        """The id whose stored text is exactly `text`, if any."""
        return self._vocab.token_to_id.get(text)

    def is_control(self, token_id: int) -> bool:
        """Whether the token is a control token (after llama.cpp's by-name fixups)."""
        return bool(self._vocab.attrs[self._check(token_id)] & TokenAttr.CONTROL)
