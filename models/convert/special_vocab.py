"""Special token ids, add-special-token flags and normalizer flags, resolved as llama.cpp's converter does.

Sources, in priority order: tokenizer_config.json's `{typ}_token` names looked up among tokenizer.json's
`added_tokens`, then config.json's `{typ}_token_id`. The post-processor template decides which of BOS/EOS/SEP
the tokenizer adds. A folder with only vocab.txt therefore gets just the ids config.json states.
(Only tokenizer_config.json's `chat_template` is read; BERT folders carry no chat_template.jinja.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.convert.hf_files import read_optional_json_object

logger = logging.getLogger(__name__)

TOKEN_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


@dataclass
class SpecialVocab:
    """Insertion order of the dicts is the order the keys are written."""

    token_ids: dict[str, int] = field(default_factory=dict)
    add_token: dict[str, bool] = field(default_factory=dict)
    normalizer_lowercase: bool | None = None
    normalizer_strip_accents: bool | None = None
    chat_template: str | None = None


def _special_id(tmpl_item: dict[str, Any]) -> str | None:
    special = tmpl_item.get("SpecialToken")
    return str(special.get("id")) if isinstance(special, dict) and special.get("id") else None


def _parse_normalizer(spec: Any, out: SpecialVocab) -> None:
    if not isinstance(spec, dict):
        return
    kind = spec.get("type")
    if kind == "Lowercase":
        out.normalizer_lowercase = True
    elif kind == "StripAccents":
        out.normalizer_strip_accents = True
    elif kind == "BertNormalizer":
        # an explicit null strip_accents ("follow lowercase") is left unwritten
        if "lowercase" in spec:
            out.normalizer_lowercase = spec["lowercase"]
        if "strip_accents" in spec:
            out.normalizer_strip_accents = spec["strip_accents"]
    elif kind == "Sequence":
        for sub in spec.get("normalizers", []):
            _parse_normalizer(sub, out)


class _Names:
    """The special token strings from tokenizer_config.json, filled in from each other and the template."""

    def __init__(self, config: dict[str, Any] | None) -> None:
        self.config = config
        get = (config or {}).get
        self.bos, self.cls, self.eos, self.sep = get("bos_token"), get("cls_token"), get("eos_token"), get("sep_token")
        # BERT has no BOS/EOS: its CLS/SEP play those parts
        if not self.bos and self.cls and config:
            config["bos_token"] = self.bos = self.cls
        if not self.eos and self.sep and config:
            config["eos_token"] = self.eos = self.sep


def _apply_template(proc: dict[str, Any], names: _Names, out: SpecialVocab) -> None:
    """Which special tokens a TemplateProcessing adds (only simple templates are understood)."""
    single: list[dict[str, Any]] = proc.get("single", [])
    pair: list[dict[str, Any]] = proc.get("pair", [])
    first = last = None
    if len(single) > 1:
        first = _special_id(single[0])
        if first:
            if not names.config:
                names.bos = first
            elif first not in (names.bos, names.cls):
                if not names.bos:
                    names.config["bos_token"] = names.bos = first
                if not names.cls:
                    names.config["cls_token"] = names.cls = first
            out.add_token["bos"] = first in (names.bos, names.cls)
        last = _special_id(single[-1])
        if last:
            if not names.config:
                names.eos = last
            elif last != names.eos:
                logger.warning("template ends with %r, not the EOS token %r; using it as EOS", last, names.eos)
                names.config["eos_token"] = names.eos = last
            out.add_token["eos"] = last == names.eos
    if not pair:
        return
    start = 1 if first and _special_id(pair[0]) == first else 0
    stop = -1 if last and _special_id(pair[-1]) == last else None
    pair = pair[start:stop]
    if not pair:
        return
    seq_a = (pair[0].get("Sequence") or {}).get("id")
    seq_b = (pair[-1].get("Sequence") or {}).get("id")
    middle = pair[1:-1]
    if seq_a != "A" or seq_b != "B" or not middle:
        return
    separators = (names.sep, names.eos)
    add_sep = False
    first_mid = _special_id(middle[0])
    if first_mid in separators and not last:
        add_sep = True
    if len(middle) == 2 and _special_id(middle[1]) in separators:
        add_sep = True
    out.add_token["sep"] = add_sep
    if add_sep and not names.sep and names.config:
        names.config["sep_token"] = names.eos


def _apply_post_processor(post: dict[str, Any], names: _Names, out: SpecialVocab) -> None:
    for proc in post.get("processors", [post]):
        kind = proc.get("type")
        if kind == "ByteLevel":
            out.add_token.setdefault("bos", False)
            out.add_token.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            out.add_token.update(bos=True, eos=True, sep=True)
            if not names.cls and names.config:
                names.config["cls_token"] = names.cls = proc.get("cls", [names.bos])[0]
            if not names.sep and names.config:
                names.config["sep_token"] = names.sep = proc.get("sep", [names.eos])[0]
        elif kind == "TemplateProcessing":
            _apply_template(proc, names, out)


def _set_id(out: SpecialVocab, typ: str, tid: Any, n_vocab: int) -> None:
    """First source wins; ids outside the vocab are dropped with a warning."""
    if not isinstance(tid, int) or isinstance(tid, bool) or typ in out.token_ids:
        return
    if not 0 <= tid < n_vocab:
        logger.warning("special token %s id %d is outside the vocab (%d); skipping", typ, tid, n_vocab)
        return
    out.token_ids[typ] = tid


def load_special_vocab(src_dir: Path, n_vocab: int) -> SpecialVocab:
    """Resolve the special-token metadata of `src_dir` for a vocab of `n_vocab` tokens."""
    out = SpecialVocab()
    tokenizer = read_optional_json_object(src_dir / "tokenizer.json")
    tok_config = read_optional_json_object(src_dir / "tokenizer_config.json")
    added: list[dict[str, Any]] = []
    if tokenizer is not None:
        _parse_normalizer(tokenizer.get("normalizer"), out)
        added = list(tokenizer.get("added_tokens") or [])
        names = _Names(tok_config)
        if isinstance(post := tokenizer.get("post_processor"), dict):
            _apply_post_processor(post, names, out)
    if tok_config:
        template = tok_config.get("chat_template")
        if isinstance(template, str):
            out.chat_template = template
        for typ in TOKEN_TYPES:
            flag = tok_config.get(f"add_{typ}_token")
            if isinstance(flag, bool) and typ not in out.add_token:
                out.add_token[typ] = flag
            entry = tok_config.get(f"{typ}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if not isinstance(content, str):
                continue
            tid = next((a.get("id") for a in added if a.get("content") == content), None)
            _set_id(out, typ, tid, n_vocab)
    config = read_optional_json_object(src_dir / "config.json") or {}
    for typ in TOKEN_TYPES:
        _set_id(out, typ, config.get(f"{typ}_token_id"), n_vocab)
    return out
