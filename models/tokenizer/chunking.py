"""Cutting SentencePiece-style text (spaces shown as U+2581) into independently tokenizable chunks.

Whole-fragment merging (SentencePiece, Gemma-4 BPE) has no word boundaries, which would defeat per-word caching
and make long prompts quadratic-ish. But a merge can only join two symbols when the joined text exists in the
vocabulary (SentencePiece) or in the merge list (BPE). If no such text contains "X\u2581" for a character X,
no merged symbol can straddle a boundary placed between X and a following U+2581, so cutting there changes
nothing. The set of such X is computed from the vocabulary once; only the rare X that do occur (e.g. '>' in
Gemma's ">\u2581</") block a cut.
"""
from __future__ import annotations

from collections.abc import Iterable

import regex

SPACE = "\u2581"


class Chunker:
    """Splits text before each run of U+2581 unless the preceding character may merge across it."""

    def __init__(self, texts: Iterable[str], separator_may_hide: bool = False) -> None:
        """texts: every text a merge can produce (tokens, or merge lines "left right").

        separator_may_hide: the texts are merge lines, where "X \u2581" also joins X to U+2581."""
        joined = "\x00".join(texts)
        gap = " ?" if separator_may_hide else ""
        blockers = set(regex.findall(f"([^{SPACE}\x00]){gap}{SPACE}", joined))
        blockers.add("\x00")  # the joiner hides any "\x00\u2581" inside a text: stay safe
        if separator_may_hide:
            blockers.add(" ")
        cls = "".join(regex.escape(c) for c in sorted(blockers))
        self._pattern = regex.compile(f"(?<=[^{SPACE}{cls}])(?={SPACE})")

    def split(self, text: str) -> list[str]:
        """Chunks of `text` that tokenize independently (concatenating them gives `text`)."""
        return [c for c in self._pattern.split(text) if c]
