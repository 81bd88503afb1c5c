"""Choosing the tokenizer implementation from `tokenizer.ggml.model`."""
from __future__ import annotations

from collections.abc import Mapping

from models.tokenizer import metadata as md
from models.tokenizer.base import Tokenizer
from models.tokenizer.bpe import BpeTokenizer
from models.tokenizer.spm import SpmTokenizer
from models.tokenizer.wpm import WpmTokenizer

SUPPORTED_MODELS = ("gpt2", "gemma4", "llama", "bert")


def tokenizer_from_metadata(meta: Mapping[str, object]) -> Tokenizer:
    """The tokenizer described by GGUF metadata (`tokenizer.ggml.*` keys, plus `general.name`/`architecture`
    for llama.cpp's per-model whitespace quirks).

    `tokenizer.ggml.model` picks the kind: "gpt2" (and "gemma4") -> BPE, "llama" -> SentencePiece,
    "bert" -> WordPiece. Raises ValueError for any other kind, an unknown pre-tokenizer, or malformed keys."""
    model = md.get_str(meta, md.key("model"))
    if model in ("gpt2", "gemma4"):
        return BpeTokenizer(meta)
    if model == "llama":
        return SpmTokenizer(meta)
    if model == "bert":
        return WpmTokenizer(meta)
    if model is None:
        raise ValueError("GGUF metadata has no tokenizer.ggml.model")
    raise ValueError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                     f"supported: {', '.join(SUPPORTED_MODELS)}")
