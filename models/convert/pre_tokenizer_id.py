"""`tokenizer.ggml.pre`: llama.cpp names the pre-tokenizer by hashing the ids of a fixed probe text."""
from __future__ import annotations

import hashlib
import logging

from models.convert.tokenizer_files import WordPieceTokenizer
from models.convert.wordpiece_encode import encode

logger = logging.getLogger(__name__)

# The probe text llama.cpp's converter encodes (its `chktxt`), verbatim.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# Known fingerprints of WordPiece tokenizers → the name llama.cpp writes. (bert-base-uncased's vocab, as in
# bge-small-en-v1.5 and all-MiniLM-L6-v2, shares its hash with jina-embeddings-v2-base-en, which llama.cpp
# checks last, so that name is the one written.)
KNOWN_HASHES = {
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
}

# llama.cpp ignores tokenizer.ggml.pre for the WPM (bert) tokenizer, so an unknown one is harmless.
FALLBACK = "default"


def probe_hash(tok: WordPieceTokenizer) -> str | None:
    """sha256 of `str(ids)` of the probe text, or `None` if this tokenizer's pipeline is not plain BERT."""
    if tok.normalization is None or not tok.pre_tokenizer_is_bert:
        return None
    ids = encode(PROBE_TEXT, tok, tok.normalization)
    return hashlib.sha256(str(ids).encode()).hexdigest()


def pre_tokenizer_name(tok: WordPieceTokenizer) -> str:
    """The `tokenizer.ggml.pre` value for this tokenizer."""
    digest = probe_hash(tok)
    name = KNOWN_HASHES.get(digest) if digest is not None else None
    if name is None:
        logger.warning("pre-tokenizer not recognised (hash %s); writing %r", digest, FALLBACK)
        return FALLBACK
    return name
