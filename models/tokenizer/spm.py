"""SentencePiece (BPE-style, score-driven) tokenization as llama.cpp runs it for `tokenizer.ggml.model` = "llama".

Each raw fragment gets a leading space when `add_space_prefix` is set and it starts the text or follows a special
token; spaces become U+2581; characters are merged pairwise, highest token score first; characters that never
merged into a known token fall back to their UTF-8 bytes as <0xXX> tokens.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from models.tokenizer.base import Tokenizer
from models.tokenizer.chunking import SPACE, Chunker
from models.tokenizer.merge import merge_symbols
from models.tokenizer.special import Fragment
from models.tokenizer.vocab import Defaults, Vocab

log = logging.getLogger(__name__)

# llama.cpp's defaults for SentencePiece vocabularies without the corresponding keys
_SPM_DEFAULTS = Defaults(bos=1, unk=0, add_bos=True, add_space_prefix=True)


class SpmTokenizer(Tokenizer):
    """SentencePiece with scores and byte fallback (llama-2, gemma, phi-3, ...)."""

    def __init__(self, meta: Mapping[str, object]) -> None:
        vocab = Vocab(meta, _SPM_DEFAULTS)
        super().__init__(vocab)
        self._scores = vocab.scores if vocab.scores is not None else [0.0] * vocab.n_tokens
        self._chunker = Chunker(vocab.tokens)
        self._chunk = self._word_cache(self._encode_chunk)

    def _encode_fragments(self, fragments: Sequence[Fragment], add_special: bool) -> list[int]:
        out: list[int] = []
        prefix = self._vocab.add_space_prefix
        after_special = True  # the text start counts as "after a special token"
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                after_special = True
                continue
            text = (" " + frag if prefix and after_special else frag).replace(" ", SPACE)
            for chunk in self._chunker.split(text):
                out.extend(self._chunk(chunk))
            after_special = False
        return self._with_bos_eos(out, add_special)

    def _priority(self, left: str, right: str) -> float | None:
        token = self._vocab.token_to_id.get(left + right)
        return None if token is None else -self._scores[token]

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        to_id = self._vocab.token_to_id
        out: list[int] = []
        for sym in merge_symbols(chunk, self._priority):
            token = to_id.get(sym)
            if token is not None:
                out.append(token)
                continue
            for b in sym.encode("utf-8"):
                byte_token = to_id.get(f"<0x{b:02X}>")
                if byte_token is None and b < 0x80:
                    byte_token = to_id.get(chr(b))
                if byte_token is None:
                    byte_token = self._vocab.ids.unk
                    log.warning("no byte token for 0x%02X; using the unknown token", b)
                if byte_token is not None:
                    out.append(byte_token)
        return tuple(out)

    def _normal_bytes(self, text: str) -> bytes:
        return text.replace(SPACE, " ").encode("utf-8")
