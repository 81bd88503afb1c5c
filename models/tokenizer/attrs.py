"""Token types (as stored in GGUF) and token attributes (as llama.cpp derives them at load time).

llama.cpp does not use `tokenizer.ggml.token_type` as-is: it turns each type into an attribute flag and then
patches attributes by token text (known end-of-turn markers become CONTROL, a few harmony markers become
USER_DEFINED, phi-3 special tokens strip whitespace to their right, ...). Those patches decide which strings the
special-token splitter cuts out of a prompt, so they are reproduced here to tokenize exactly as llama.cpp does.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, MutableSequence
from types import MappingProxyType

import numpy as np
import numpy.typing as npt


class TokenType(enum.IntEnum):
    """Values of `tokenizer.ggml.token_type`."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class TokenAttr(enum.IntFlag):
    """Per-token attribute bits (llama.cpp's llama_token_attr)."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# Tokens the special-token splitter cuts out of raw text (when parse_special allows it).
SPECIAL_ATTRS = int(TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN)
# Tokens that render as nothing unless special rendering is asked for.
HIDDEN_ATTRS = int(TokenAttr.CONTROL | TokenAttr.UNKNOWN)

# plain ints, not enum members: attribute lists hold one entry per token and enum arithmetic is slow
_TYPE_TO_ATTR: Mapping[int, int] = MappingProxyType({
    int(TokenType.UNDEFINED): int(TokenAttr.UNDEFINED),
    int(TokenType.NORMAL): int(TokenAttr.NORMAL),
    int(TokenType.UNKNOWN): int(TokenAttr.UNKNOWN),
    int(TokenType.CONTROL): int(TokenAttr.CONTROL),
    int(TokenType.USER_DEFINED): int(TokenAttr.USER_DEFINED),
    int(TokenType.UNUSED): int(TokenAttr.UNUSED),
    int(TokenType.BYTE): int(TokenAttr.BYTE),
})

# Texts llama.cpp promotes to CONTROL because they end a turn or generation (its EOT/EOM/EOG name lists).
_END_MARKERS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})

# Fill-in-the-middle markers, per metadata key: llama.cpp promotes one of them to CONTROL when the key is absent.
_FIM_MARKERS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "tokenizer.ggml.fim_pre_token_id": (
        "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
        "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "tokenizer.ggml.fim_suf_token_id": (
        "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
        "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "tokenizer.ggml.fim_mid_token_id": (
        "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
        "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "tokenizer.ggml.fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "tokenizer.ggml.fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "tokenizer.ggml.fim_sep_token_id": ("<|file_sep|>",),
})

# gpt-oss (harmony) markers that must always be cut out and rendered.
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def attrs_from_types(types: npt.NDArray[np.int32] | None, n_tokens: int) -> list[int]:
    """Initial attribute bits: NORMAL for every token when no types are stored, unknown type values -> UNDEFINED."""
    if types is None:
        return [int(TokenAttr.NORMAL)] * n_tokens
    if len(types) < n_tokens:
        raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {n_tokens} tokens")
    get = _TYPE_TO_ATTR.get
    return [get(t, 0) for t in types[:n_tokens].tolist()]


def _set(attrs: MutableSequence[int], ids: Iterable[int | None], flag: TokenAttr, on: bool) -> None:
    for i in ids:
        if i is not None:
            attrs[i] = (attrs[i] | int(flag)) if on else (attrs[i] & ~int(flag))


def apply_text_fixups(attrs: MutableSequence[int], token_to_id: Mapping[str, int],
                      meta: Mapping[str, object], end_ids: Iterable[int]) -> None:
    """Patch attributes by token text the way llama.cpp's vocab loader does (before its special-token cache).

    `end_ids` are the metadata eos/eot/eom ids, needed for the plamo-style `</s>` exception."""
    for name, texts in _FIM_MARKERS.items():
        if meta.get(name) is None:
            found = [token_to_id[t] for t in texts if t in token_to_id]
            if found:
                _set(attrs, [min(found)], TokenAttr.CONTROL, True)
    _set(attrs, (token_to_id.get(t) for t in _END_MARKERS), TokenAttr.CONTROL, True)
    for text in _ALWAYS_USER_DEFINED:
        if text in token_to_id:
            attrs[token_to_id[text]] = int(TokenAttr.USER_DEFINED)
    # harmony / solar-open: "<|end|>" ends a message, not generation, and is kept as plain text
    has = token_to_id.__contains__
    end_id = token_to_id.get("<|end|>")
    if end_id is not None and ((has("<|return|>") and has("<|call|>"))
                               or ((has("<|call|>") or has("<|calls|>")) and has("<|flush|>"))):
        attrs[end_id] = int(TokenAttr.USER_DEFINED)
    # gemma4 / plamo: "</s>" is an ordinary token there
    s_id = token_to_id.get("</s>")
    plamo_eos = token_to_id.get("<|plamo:eos|>")
    if s_id is not None and (has("<|tool_response>") or (plamo_eos is not None and plamo_eos in set(end_ids))):
        attrs[s_id] = int(TokenAttr.NORMAL)


def apply_strip_fixups(attrs: MutableSequence[int], token_to_id: Mapping[str, int],
                       special_ids: Iterable[int], pre: str, arch: str, name: str) -> None:
    """Whitespace-stripping attributes llama.cpp sets by model/tokenizer name (phi-3, jina v2, nomic, modern-bert)."""
    name = name.lower()
    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
            s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
        _set(attrs, [token_to_id.get("<mask>")], TokenAttr.LSTRIP, True)
    elif "phi-3" in name or "phi3" in name:
        _set(attrs, special_ids, TokenAttr.RSTRIP, True)
        _set(attrs, [token_to_id.get("</s>")], TokenAttr.RSTRIP, True)
        _set(attrs, (token_to_id.get(t) for t in ("<unk>", "<s>", "<|endoftext|>")), TokenAttr.RSTRIP, False)
    elif "modern-bert" in name:
        _set(attrs, [token_to_id.get("[MASK]")], TokenAttr.LSTRIP, True)
