"""The vocabulary shared by every tokenizer kind: token texts, types/attributes, special ids and flags.

Special-id defaults follow llama.cpp per tokenizer kind where they change how text is encoded (SentencePiece BOS
1 / UNK 0, BERT CLS 101 / UNK 100 / SEP 102). End-of-generation ids come from the metadata, with one default
Ollama's Go models apply: Gemma 3 and 4 end a turn with `<end_of_turn>` (`eot_token_id`, 106 when absent).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from models.tokenizer import metadata as md
from models.tokenizer.attrs import SPECIAL_ATTRS, apply_strip_fixups, apply_text_fixups, attrs_from_types

log = logging.getLogger(__name__)

# Ollama's gemma3/gemma4 models add `eot_token_id` (default 106, `<end_of_turn>`) to their end-of-generation set.
_GEMMA_EOT_ARCHS = frozenset({"gemma3", "gemma3n", "gemma4"})
_GEMMA_EOT = (106, "<end_of_turn>")


@dataclass(frozen=True, slots=True)
class SpecialIds:
    """Special token ids (None when absent or out of range)."""

    bos: int | None = None
    eos: int | None = None
    eot: int | None = None
    eom: int | None = None
    unk: int | None = None
    sep: int | None = None
    pad: int | None = None
    cls: int | None = None
    mask: int | None = None
    eos_list: tuple[int, ...] = ()

    def eog(self) -> frozenset[int]:
        """End-of-generation ids: eos, the eos_token_ids list, eot and eom (only those present)."""
        ids = {self.eos, self.eot, self.eom, *self.eos_list}
        return frozenset(i for i in ids if i is not None)


@dataclass(frozen=True, slots=True)
class Defaults:
    """Per-kind values llama.cpp assumes when the metadata is silent."""

    bos: int | None = None
    unk: int | None = None
    sep: int | None = None
    pad: int | None = None
    add_bos: bool = False
    add_space_prefix: bool = False
    bos_from_cls: bool = False  # BERT: the CLS token doubles as BOS


class Vocab:
    """Token texts, lookup table, attributes, scores and special ids read from GGUF metadata."""

    def __init__(self, meta: Mapping[str, object], defaults: Defaults, *, add_bos_default: bool | None = None) -> None:
        tokens = md.get_str_list(meta, md.key("tokens"))
        if not tokens:
            raise ValueError("tokenizer.ggml.tokens is missing or empty")
        n = len(tokens)
        if any(not t for t in tokens):
            # llama.cpp renames empty entries so they stay unique and unmatchable
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.tokens: list[str] = tokens
        # later duplicates win, as in llama.cpp's token_to_id map
        self.token_to_id: dict[str, int] = dict(zip(tokens, range(n)))

        types = md.get_int_array(meta, md.key("token_type"))
        if types is not None and len(types) < n:
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        self.token_type: npt.NDArray[np.int32] = (
            types[:n].copy() if types is not None else np.ones(n, dtype=np.int32))
        self.token_type.flags.writeable = False

        scores = md.get_float_array(meta, md.key("scores"))
        if scores is not None and len(scores) < n:
            raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        self.scores: list[float] | None = scores[:n].tolist() if scores is not None else None

        self.model = md.get_str(meta, md.key("model"), "") or ""
        self.pre = md.get_str(meta, md.key("pre"), "") or ""
        self.ids = self._read_ids(meta, defaults)

        add_bos = md.get_bool(meta, md.key("add_bos_token"))
        self.add_bos = add_bos if add_bos is not None else (
            add_bos_default if add_bos_default is not None else defaults.add_bos)
        self.add_eos = bool(md.get_bool(meta, md.key("add_eos_token")))
        prefix = md.get_bool(meta, md.key("add_space_prefix"))
        self.add_space_prefix = prefix if prefix is not None else defaults.add_space_prefix

        attrs = attrs_from_types(types, n)
        apply_text_fixups(attrs, self.token_to_id, meta,
                          [i for i in (self.ids.eos, self.ids.eot, self.ids.eom) if i is not None])
        special = np.flatnonzero(np.asarray(attrs, dtype=np.int32) & SPECIAL_ATTRS).tolist()
        apply_strip_fixups(attrs, self.token_to_id, special, self.pre,
                           md.get_str(meta, "general.architecture", "") or "",
                           md.get_str(meta, "general.name", "") or "")
        self.attrs: list[int] = attrs  # TokenAttr bits per token
        self.special_ids: list[int] = special

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def _valid(self, name: str, value: int | None) -> int | None:
        if value is None:
            return None
        if 0 <= value < len(self.tokens):
            return value
        log.warning("ignoring %s = %d: outside the vocabulary of %d tokens", name, value, len(self.tokens))
        return None

    def _read(self, meta: Mapping[str, object], name: str, default: int | None = None) -> int | None:
        full = md.key(name)
        value = self._valid(full, md.get_int(meta, full))
        return value if value is not None else self._valid(f"default {name}", default)

    def _gemma_eot(self, meta: Mapping[str, object]) -> int | None:
        """106 for a Gemma 3/4 vocabulary whose token 106 is `<end_of_turn>` (a file's own key wins)."""
        arch = md.get_str(meta, "general.architecture", "") or ""
        eot_id, text = _GEMMA_EOT
        if arch in _GEMMA_EOT_ARCHS and eot_id < len(self.tokens) and self.tokens[eot_id] == text:
            return eot_id
        return None

    def _read_ids(self, meta: Mapping[str, object], d: Defaults) -> SpecialIds:
        cls = self._read(meta, "cls_token_id")
        eos_list = md.get_int_array(meta, md.key("eos_token_ids"))
        return SpecialIds(
            bos=self._read(meta, "bos_token_id", cls if (cls is not None and d.bos_from_cls) else d.bos),
            eos=self._read(meta, "eos_token_id"),
            eot=self._read(meta, "eot_token_id", self._gemma_eot(meta)),
            eom=self._read(meta, "eom_token_id"),
            unk=self._read(meta, "unknown_token_id", d.unk),
            sep=self._read(meta, "seperator_token_id", d.sep),
            pad=self._read(meta, "padding_token_id", d.pad),
            cls=cls,
            mask=self._read(meta, "mask_token_id"),
            eos_list=tuple(v for v in (self._valid("eos_token_ids", int(i)) for i in (
                eos_list.tolist() if eos_list is not None else [])) if v is not None),
        )
