"""A WordPiece (BERT) tokenizer as a model folder describes it: tokenizer.json, else vocab.txt + tokenizer_config."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.convert.errors import ConversionError
from models.convert.hf_files import read_json_object, read_optional_json_object

logger = logging.getLogger(__name__)

# BertTokenizer's special tokens when tokenizer_config.json names none.
_DEFAULT_SPECIALS = {"unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "mask": "[MASK]"}


@dataclass(frozen=True)
class AddedToken:
    """A token registered on top of the WordPiece vocab (tokenizers' `added_tokens`)."""

    content: str
    special: bool


@dataclass(frozen=True)
class BertNormalization:
    """The BertNormalizer settings; `strip_accents=None` means "same as lowercase"."""

    clean_text: bool
    handle_chinese_chars: bool
    strip_accents: bool | None
    lowercase: bool


@dataclass(frozen=True)
class WordPieceTokenizer:
    """Everything the converter needs about the tokenizer.

    `normalization` is `None` when tokenizer.json uses a normalizer other than BertNormalizer
    (the vocab still converts; only the pre-tokenizer fingerprint is then unknown).
    `template` is the single-sequence post-processing template: special token strings around `None` (the text).
    """

    vocab: dict[str, int]
    added: dict[int, AddedToken]
    normalization: BertNormalization | None
    pre_tokenizer_is_bert: bool
    unk_token: str
    continuing_prefix: str
    max_input_chars_per_word: int
    template: tuple[str | None, ...]


def _special_name(config: dict[str, Any], typ: str) -> str:
    """`{typ}_token` from tokenizer_config.json (a string or an AddedToken dict), else BertTokenizer's default."""
    entry = config.get(f"{typ}_token")
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else _DEFAULT_SPECIALS[typ]


def _normalization(spec: Any) -> BertNormalization | None:
    if not isinstance(spec, dict) or spec.get("type") != "BertNormalizer":
        return None
    strip = spec.get("strip_accents")
    return BertNormalization(
        clean_text=bool(spec.get("clean_text", True)),
        handle_chinese_chars=bool(spec.get("handle_chinese_chars", True)),
        strip_accents=None if strip is None else bool(strip),
        lowercase=bool(spec.get("lowercase", True)),
    )


def _template(post: Any) -> tuple[str | None, ...]:
    """The single-sequence template of a TemplateProcessing / BertProcessing post-processor."""
    if not isinstance(post, dict):
        return (None,)
    if post.get("type") == "Sequence":
        for sub in post.get("processors", []):
            if isinstance(sub, dict) and sub.get("type") in ("TemplateProcessing", "BertProcessing"):
                return _template(sub)
        return (None,)
    if post.get("type") == "BertProcessing":
        return (str(post["cls"][0]), None, str(post["sep"][0]))
    if post.get("type") == "TemplateProcessing":
        items: list[str | None] = []
        for piece in post.get("single", []):
            if "SpecialToken" in piece:
                items.append(str(piece["SpecialToken"]["id"]))
            else:
                items.append(None)
        return tuple(items)
    return (None,)


def _from_tokenizer_json(path: Path) -> WordPieceTokenizer:
    tok = read_json_object(path)
    model = tok.get("model")
    if not isinstance(model, dict) or model.get("type") != "WordPiece":
        kind = model.get("type") if isinstance(model, dict) else None
        raise ConversionError(f"{path}: tokenizer model {kind!r} is unsupported (BERT needs WordPiece)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ConversionError(f"{path}: WordPiece model has no vocab")
    added: dict[int, AddedToken] = {}
    for entry in tok.get("added_tokens") or []:
        added[int(entry["id"])] = AddedToken(content=str(entry["content"]), special=bool(entry.get("special")))
    # get_vocab() of a fast tokenizer includes the added tokens
    full_vocab = {str(k): int(v) for k, v in vocab.items()}
    full_vocab.update({a.content: i for i, a in added.items()})
    pre = tok.get("pre_tokenizer")
    return WordPieceTokenizer(
        vocab=full_vocab,
        added=added,
        normalization=_normalization(tok.get("normalizer")),
        pre_tokenizer_is_bert=isinstance(pre, dict) and pre.get("type") == "BertPreTokenizer",
        unk_token=str(model.get("unk_token", "[UNK]")),
        continuing_prefix=str(model.get("continuing_subword_prefix", "##")),
        max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
        template=_template(tok.get("post_processor")),
    )


def _from_vocab_txt(path: Path, config: dict[str, Any]) -> WordPieceTokenizer:
    """What transformers builds from a slow BertTokenizer's files (vocab.txt + tokenizer_config.json)."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        vocab[line.rstrip("\r")] = i
    if not vocab:
        raise ConversionError(f"{path} is empty")
    added: dict[int, AddedToken] = {}
    for typ in ("unk", "sep", "pad", "cls", "mask"):
        name = _special_name(config, typ)
        if name in vocab:
            added[vocab[name]] = AddedToken(content=name, special=True)
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for k, entry in decoder.items():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                added[int(k)] = AddedToken(content=entry["content"], special=bool(entry.get("special")))
                vocab[entry["content"]] = int(k)
    strip = config.get("strip_accents")
    return WordPieceTokenizer(
        vocab=vocab,
        added=added,
        normalization=BertNormalization(
            clean_text=True,
            handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
            strip_accents=None if strip is None else bool(strip),
            lowercase=bool(config.get("do_lower_case", True)),
        ),
        pre_tokenizer_is_bert=True,
        unk_token=_special_name(config, "unk"),
        continuing_prefix="##",
        max_input_chars_per_word=100,
        template=(_special_name(config, "cls"), None, _special_name(config, "sep")),
    )


def load_wordpiece_tokenizer(src_dir: Path) -> WordPieceTokenizer:
    """Read the folder's tokenizer; tokenizer.json wins over vocab.txt, as with transformers' fast tokenizers."""
    tokenizer_json = src_dir / "tokenizer.json"
    vocab_txt = src_dir / "vocab.txt"
    try:
        if tokenizer_json.is_file():
            return _from_tokenizer_json(tokenizer_json)
        if vocab_txt.is_file():
            logger.info("no tokenizer.json in %s; reading vocab.txt", src_dir)
            config = read_optional_json_object(src_dir / "tokenizer_config.json") or {}
            return _from_vocab_txt(vocab_txt, config)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"malformed tokenizer files in {src_dir}: {e!r}") from e
    raise ConversionError(f"missing tokenizer: {src_dir} has neither tokenizer.json nor vocab.txt")
