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


class _Index:
    """All special tokens, in llama.cpp's processing order, with what is needed to find them in a text."""

    def __init__(self, entries: Sequence[tuple[int, str]], attrs: Sequence[int]) -> None:
        texts = {text for _, text in entries}
        # longest byte length first; ties by id (llama.cpp's unstable sort leaves them unordered)
        ordered = sorted(entries, key=lambda e: (-len(e[1].encode("utf-8")), e[0]))
        self.rank: dict[str, int] = {}
        for position, (_, text) in enumerate(ordered):
            self.rank.setdefault(text, position)
        lstrip, rstrip = int(TokenAttr.LSTRIP), int(TokenAttr.RSTRIP)
        self.strip = {i: (bool(attrs[i] & lstrip), bool(attrs[i] & rstrip)) for i, _ in entries}
        self.overlapping = _overlapping(texts)
        self.pattern = regex.compile(trie_regex(texts)) if texts else None

    def present(self, text: str, allowed: Mapping[str, int]) -> list[str]:
        """The `allowed` special texts that may occur in `text` (a superset of those that do), in order."""
        if self.pattern is None:
            return []
        # A left-to-right scan for the longest special text finds, at every offset it visits, the longest
        # token there; any other occurrence starts at a visited offset (a prefix of what was found) or inside
        # an earlier find, where it is covered by that find's `overlapping` set. This holds for any subset of
        # the special tokens, so one index serves both parse modes.
        found: set[str] = set(self.pattern.findall(text))
        for hit in list(found):
            found.update(self.overlapping[hit])
        return sorted((t for t in found if t in allowed), key=self.rank.__getitem__)


class _Node:
    __slots__ = ("children", "word", "below")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.word: str | None = None  # the text ending here, if any
        self.below: list[str] = []  # every text ending at or under this node


def _overlapping(texts: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """For each text, the other texts that can occur overlapping one of its occurrences: its prefixes, the
    texts inside it, and the texts that begin with one of its proper suffixes."""
    root = _Node()
    for text in texts:
        node = root
        node.below.append(text)
        for ch in text:
            node = node.children.setdefault(ch, _Node())
            node.below.append(text)
        node.word = text
    result: dict[str, tuple[str, ...]] = {}
    for text in root.below:
        rel: set[str] = set()
        for start in range(len(text)):
            node = root
            for ch in text[start:]:
                child = node.children.get(ch)
                if child is None:
                    break
                node = child
                if node.word is not None:
                    rel.add(node.word)  # a text inside (or a prefix of) this one
            else:
                if start:
                    rel.update(node.below)  # texts continuing past this one's end
        rel.discard(text)
        result[text] = tuple(rel)
    return result


class SpecialSplitter:
    """Splits text into raw fragments and special token ids."""

    def __init__(self, tokens: Sequence[str], attrs: Sequence[int], special_ids: Iterable[int]) -> None:
        entries = [(i, tokens[i]) for i in special_ids]
        self._index = _Index(entries, attrs)
        # text -> id per parse mode; a text listed twice keeps its lowest id. Without parse_special only
        # user-defined tokens are cut out (llama.cpp / HF added-token behaviour).
        self._all: dict[str, int] = {}
        self._user: dict[str, int] = {}
        for i, text in entries:
            self._all.setdefault(text, i)
            if not attrs[i] & HIDDEN_ATTRS:
                self._user.setdefault(text, i)

    def split(self, text: str, parse_special: bool) -> list[Fragment]:
        """`text` as raw-text fragments and special token ids, in order."""
        allowed = self._all if parse_special else self._user
        present = self._index.present(text, allowed) if allowed else []
        if not present:
            return [text] if text else []
        # Instead of re-splitting a fragment list once per special token, mark characters that are taken (by
        # a token or by LSTRIP/RSTRIP) in a mask: an occurrence is usable iff none of its characters is taken,
        # which is exactly "it lies inside one remaining raw fragment" in llama.cpp's formulation.
        taken = bytearray(len(text))
        tokens: dict[int, int] = {}  # start offset -> token id
        for special in present:
            token_id = allowed[special]
            _claim(text, taken, tokens, special, token_id, *self._index.strip[token_id])
        return _assemble(text, taken, tokens)


def _claim(text: str, taken: bytearray, tokens: dict[int, int], special: str, token_id: int,
           lstrip: bool, rstrip: bool) -> None:
    size, n = len(special), len(text)
    pos = 0
    while (hit := text.find(special, pos)) >= 0:
        blocked = taken.find(1, hit, hit + size)
        if blocked >= 0:
            # every occurrence starting before the next free character overlaps a taken one
            pos = taken.find(0, blocked)
            if pos < 0:
                return
            continue
        taken[hit:hit + size] = b"\x01" * size
        tokens[hit] = token_id
        if lstrip:
            left = hit
            while left > 0 and not taken[left - 1] and text[left - 1] in _C_SPACES:
                left -= 1
            taken[left:hit] = b"\x01" * (hit - left)
        pos = hit + size
        if rstrip:
            while pos < n and not taken[pos] and text[pos] in _C_SPACES:
                taken[pos] = 1
                pos += 1


_FREE_RUN = regex.compile(b"\x00+")


def _assemble(text: str, taken: bytearray, tokens: dict[int, int]) -> list[Fragment]:
    # raw fragments are the maximal runs of untaken characters; merge them with the tokens by offset
    events: list[tuple[int, Fragment]] = [(m.start(), text[m.start():m.end()]) for m in _FREE_RUN.finditer(taken)]
    events.extend(tokens.items())
    events.sort(key=lambda e: e[0])
    return [fragment for _, fragment in events]
