"""Byte-pair encoding as llama.cpp runs it for `tokenizer.ggml.model` = "gpt2" (and Gemma-4's "gemma4").

Text fragments are split into words by the pre-tokenizer chosen from `tokenizer.ggml.pre`; each word is written
in GPT-2's byte alphabet (or, for SentencePiece-style BPE, kept as UTF-8 with spaces shown as U+2581) and its
characters are merged by merge rank. Results are cached per word.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from models.tokenizer import metadata as md
from models.tokenizer.base import Tokenizer
from models.tokenizer.byte_level import decode_chars, encode_bytes
from models.tokenizer.chunking import SPACE, Chunker
from models.tokenizer.merge import merge_symbols
from models.tokenizer.pretokenizers import PreTokenizer, spec_for
from models.tokenizer.special import Fragment
from models.tokenizer.vocab import Defaults, Vocab

log = logging.getLogger(__name__)


class BpeTokenizer(Tokenizer):
    """Byte-level (or U+2581-style) BPE with merge ranks."""

    def __init__(self, meta: Mapping[str, object]) -> None:
        model = md.get_str(meta, md.key("model"), "")
        pre = "gemma4" if model == "gemma4" else (md.get_str(meta, md.key("pre"), "") or "")
        if not pre:
            log.warning("no tokenizer.ggml.pre in the metadata: using llama.cpp's default pre-tokenizer; "
                        "tokenization may differ from the model's training")
        spec = spec_for(pre)
        vocab = Vocab(meta, Defaults(), add_bos_default=spec.add_bos)
        gemma4 = pre in ("gemma4", "granite-embed-multi-311m")
        if gemma4:
            vocab.add_bos = True  # llama.cpp forces BOS for Gemma-4 whatever the metadata says
        super().__init__(vocab)
        merges = md.get_str_list(meta, md.key("merges"))
        if merges is None:
            raise ValueError("BPE vocabulary without tokenizer.ggml.merges")
        # keyed by the merge line itself ("left right"); the first occurrence of a line gives its rank
        self._ranks: dict[str, int] = dict(zip(reversed(merges), range(len(merges) - 1, -1, -1)))
        self._spec = spec
        self._newline_words = gemma4
        self._pre = PreTokenizer(spec)
        self._chunker = (Chunker(merges, separator_may_hide=True)
                         if spec.escape_whitespace and not spec.ignore_merges else None)
        self._word = self._word_cache(self._encode_word)

    def _encode_fragments(self, fragments: Sequence[Fragment], add_special: bool) -> list[int]:
        out: list[int] = []
        word = self._word
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                continue
            if self._spec.escape_whitespace:
                frag = frag.replace(" ", SPACE)
            for ids in map(word, self._pre.split(frag)):
                out.extend(ids)
        return self._with_bos_eos(out, add_special)

    def _rank(self, left: str, right: str) -> int | None:
        # llama.cpp cuts each merge line at its first space after position 0: a pair whose left side has a
        # space there can never have been read from the list
        if " " in left[1:]:
            return None
        return self._ranks.get(left + " " + right)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        to_id = self._vocab.token_to_id
        if self._newline_words and word.strip("\n") == "" and word in to_id:
            return (to_id[word],)  # Gemma-4: a run of newlines is one token when the vocabulary has it
        text = encode_bytes(word) if self._spec.byte_encode else word
        if self._spec.ignore_merges and text in to_id:
            return (to_id[text],)
        chunks = self._chunker.split(text) if self._chunker is not None else [text]
        out: list[int] = []
        for chunk in chunks:
            for sym in merge_symbols(chunk, self._rank):
                token = to_id.get(sym)
                if token is not None:
                    out.append(token)
                else:
                    out.extend(self._byte_fallback(sym))
        return tuple(out)

    def _byte_fallback(self, sym: str) -> list[int]:
        # llama.cpp looks each UTF-8 byte of the unmatched symbol up and silently drops the ones it cannot find
        to_id = self._vocab.token_to_id
        found: list[int | None]
        if self._spec.byte_encode:
            found = [to_id.get(chr(b)) for b in sym.encode("utf-8") if b < 0x80]
        else:
            found = [to_id.get(f"<0x{b:02X}>") for b in sym.encode("utf-8")]
        return [t for t in found if t is not None]

    def _normal_bytes(self, text: str) -> bytes:
        if self._spec.escape_whitespace:
            return text.replace(SPACE, " ").encode("utf-8")
        return decode_chars(text)
