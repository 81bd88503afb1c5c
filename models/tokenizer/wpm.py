"""WordPiece (BERT) tokenization as llama.cpp's WPM tokenizer runs it for `tokenizer.ggml.model` = "bert".

Normalisation: each code point is replaced by the first code point of its NFD form and combining marks are
dropped (when stripping accents), then lower-cased with the simple one-to-one mapping; control characters, NUL
and U+FFFD vanish; whitespace separates words; punctuation, ASCII symbols and CJK ideographs become words of
their own. Each word is then covered greedily by the longest vocabulary pieces; a word that cannot be covered
becomes [UNK]. With add_special the ids are wrapped in CLS ... SEP.

Vocabularies come in two spellings: llama.cpp's converter marks word starts with U+2581 ("\u2581play", "ing"),
Hugging Face's marks continuations with "##" ("play", "##ing"). Both are handled.
"""
from __future__ import annotations

import functools
import unicodedata
from collections.abc import Mapping, Sequence

from models.tokenizer import metadata as md
from models.tokenizer.base import Tokenizer
from models.tokenizer.chunking import SPACE
from models.tokenizer.special import Fragment
from models.tokenizer.vocab import Defaults, Vocab

_WPM_DEFAULTS = Defaults(bos=101, unk=100, sep=102, pad=0, add_bos=True, bos_from_cls=True)

# Unicode White_Space, as llama.cpp's code point flags define it.
_WHITESPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000")

# CJK ideograph blocks (the ranges HF's BertPreTokenizer uses, including its 0x2B920 quirk).
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))

# What normalisation does with one code point.
_SPLIT, _DROP, _ALONE, _APPEND = range(4)


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK)


def _lower(ch: str) -> str:
    # simple (one-to-one) lower-casing; str.lower() may expand ("\u0130" -> "i\u0307"), whose first char is the
    # simple mapping
    low = ch.lower()
    return low[0] if low else ch


class WpmTokenizer(Tokenizer):
    """BERT WordPiece."""

    def __init__(self, meta: Mapping[str, object]) -> None:
        vocab = Vocab(meta, _WPM_DEFAULTS)
        vocab.add_bos = True  # llama.cpp always wraps in CLS/BOS ... SEP when add_special
        super().__init__(vocab)
        lowercase = md.get_bool(meta, md.key("normalizer.lowercase"))
        self._lowercase = True if lowercase is None else lowercase
        strip = md.get_bool(meta, md.key("normalizer.strip_accents"))
        self._strip_accents = self._lowercase if strip is None else strip
        tokens = vocab.tokens
        # "##" continuations only when no token uses the U+2581 word-start marker
        self._hash_style = not any(t.startswith(SPACE) for t in tokens) and any(t.startswith("##") for t in tokens)
        self._max_len = max(len(t) for t in tokens)
        self._classify = functools.lru_cache(maxsize=1 << 14)(self._classify_char)
        self._word = self._word_cache(self._encode_word)

    @property
    def cls_id(self) -> int | None:
        """`cls_token_id`, else the BOS id that is prepended in its place (101 by default)."""
        ids = self._vocab.ids
        return ids.cls if ids.cls is not None else ids.bos

    @property
    def add_eos(self) -> bool:
        """False: BERT ends with SEP (see `sep_id`), appended whenever add_special is set."""
        return False

    def _encode_fragments(self, fragments: Sequence[Fragment], add_special: bool) -> list[int]:
        ids = self._vocab.ids
        out: list[int] = []
        if add_special and ids.bos is not None:
            out.append(ids.bos)
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                continue
            for word in self._words(frag):
                out.extend(self._word(word))
        if add_special and ids.sep is not None:
            out.append(ids.sep)
        return out

    def _classify_char(self, ch: str) -> tuple[int, str]:
        if self._strip_accents:
            ch = unicodedata.normalize("NFD", ch)[0]
        if ch in _WHITESPACE:
            return _SPLIT, ""
        cat = unicodedata.category(ch)
        if ch in "\x00\ufffd" or cat in ("Cc", "Cf", "Co", "Cs"):
            return _DROP, ""
        if self._strip_accents and cat[0] == "M":
            return _DROP, ""
        out = _lower(ch) if self._lowercase else ch
        cp = ord(ch)
        if cat[0] == "P" or (cp < 0x7F and cat[0] == "S") or _is_cjk(cp):
            return _ALONE, out
        return _APPEND, out

    def _words(self, text: str) -> list[str]:
        words: list[str] = []
        current: list[str] = []
        for ch in text:
            kind, out = self._classify(ch)
            if kind == _APPEND:
                current.append(out)
            elif kind == _DROP:
                continue
            else:
                if current:
                    words.append("".join(current))
                    current = []
                if kind == _ALONE:
                    words.append(out)
        if current:
            words.append("".join(current))
        return words

    def _encode_word(self, word: str) -> tuple[int, ...]:
        to_id = self._vocab.token_to_id
        text = word if self._hash_style else SPACE + word
        n = len(text)
        out: list[int] = []
        i = 0
        while i < n:
            for j in range(min(n, i + self._max_len), i, -1):
                piece = "##" + text[i:j] if self._hash_style and i else text[i:j]
                token = to_id.get(piece)
                if token is not None:
                    out.append(token)
                    i = j
                    break
            else:  # no piece fits here: the whole word is unknown
                unk = self._vocab.ids.unk
                return () if unk is None else (unk,)
        return tuple(out)

    def _normal_bytes(self, text: str) -> bytes:
        if self._hash_style:
            text = text[2:] if text.startswith("##") else " " + text
        return text.replace(SPACE, " ").encode("utf-8")
