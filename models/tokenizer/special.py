"""Cutting special tokens out of raw text before the model-specific tokenizer runs (llama.cpp's st_partition).

llama.cpp walks its special tokens from longest to shortest text (byte length) and, for each one, splits every
remaining raw-text fragment at each occurrence. The result is not a leftmost-longest scan: a long token wins over
a shorter one that starts earlier and overlaps it. That exact order is kept here, but only for the special tokens
that occur in the text at all; those are found in one pass with a trie-shaped regex, so the cost does not grow
with the (sometimes thousands of) special tokens in the vocabulary.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import regex

from models.tokenizer.attrs import HIDDEN_ATTRS, TokenAttr

# Characters C's isspace() accepts in the "C" locale: what LSTRIP/RSTRIP remove.
_C_SPACES = " \t\n\v\f\r"

Fragment = str | int  # raw text still to tokenize, or a token id already decided


def trie_regex(words: Iterable[str]) -> str:
    """A regex matching any of `words`, longest first, shaped as a trie so matching cost is per character."""
    root: dict[str, dict[str, object]] = {}
    for word in words:
        node: dict[str, dict[str, object]] = root
        for ch in word:
            node = node.setdefault(ch, {})  # type: ignore[assignment]
        node[""] = {}  # end-of-word marker; real keys are single characters

    def build(node: Mapping[str, object]) -> str:
        alts = [regex.escape(ch) + build(child) for ch, child in node.items()  # type: ignore[arg-type]
                if ch != ""]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        # a longer special token wins: try to continue before accepting the end of a shorter one
        return "(?:" + body + ")?" if "" in node else body

    return build(root)


class _Table:
    """The special tokens one parse mode considers, in llama.cpp's processing order."""

    def __init__(self, entries: Sequence[tuple[int, str]], attrs: Sequence[int]) -> None:
        by_text: dict[str, int] = {}
        for token_id, text in entries:
            by_text.setdefault(text, token_id)  # duplicate texts: the lowest id takes every match
        self.by_text = by_text
        # longest byte length first; ties by id (llama.cpp's unstable sort leaves them unordered)
        ordered = sorted(by_text.items(), key=lambda kv: (-len(kv[0].encode("utf-8")), kv[1]))
        self.rank = {text: i for i, (text, _) in enumerate(ordered)}
        self.strip = {text: (bool(attrs[i] & TokenAttr.LSTRIP), bool(attrs[i] & TokenAttr.RSTRIP))
                      for text, i in by_text.items()}
        # for each token, the shorter special tokens that are its prefixes (they occur wherever it does)
        self.prefixes = {text: [text[:k] for k in range(1, len(text)) if text[:k] in by_text] for text in by_text}
        self.pattern = regex.compile(trie_regex(by_text)) if by_text else None

    def present(self, text: str) -> list[str]:
        """The special texts occurring anywhere in `text`, in processing order."""
        if self.pattern is None:
            return []
        found: set[str] = set()
        for m in self.pattern.finditer(text, overlapped=True):
            hit = m.group()
            if hit not in found:
                found.add(hit)
                found.update(self.prefixes[hit])
        return sorted(found, key=self.rank.__getitem__)


class SpecialSplitter:
    """Splits text into raw fragments and special token ids."""

    def __init__(self, tokens: Sequence[str], attrs: Sequence[int], special_ids: Iterable[int]) -> None:
        entries = [(i, tokens[i]) for i in special_ids]
        self._all = _Table(entries, attrs)
        # without parse_special only user-defined tokens are cut out (llama.cpp / HF added-token behaviour)
        self._user = _Table([(i, t) for i, t in entries if not attrs[i] & HIDDEN_ATTRS], attrs)

    def split(self, text: str, parse_special: bool) -> list[Fragment]:
        """`text` as raw-text fragments and special token ids, in order."""
        table = self._all if parse_special else self._user
        fragments: list[Fragment] = [text] if text else []
        for special in table.present(text):
            token_id = table.by_text[special]
            lstrip, rstrip = table.strip[special]
            fragments = _cut(fragments, special, token_id, lstrip, rstrip)
        return fragments


def _cut(fragments: list[Fragment], special: str, token_id: int, lstrip: bool, rstrip: bool) -> list[Fragment]:
    out: list[Fragment] = []
    size = len(special)
    for frag in fragments:
        if isinstance(frag, int):
            out.append(frag)
            continue
        pos = 0
        while (hit := frag.find(special, pos)) >= 0:
            left = frag[pos:hit]
            if lstrip:
                left = left.rstrip(_C_SPACES)
            if left:
                out.append(left)
            out.append(token_id)
            pos = hit + size
            if rstrip:
                while pos < len(frag) and frag[pos] in _C_SPACES:
                    pos += 1
        if pos < len(frag):
            out.append(frag[pos:] if pos else frag)
    return out
