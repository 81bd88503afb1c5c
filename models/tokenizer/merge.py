"""Greedy pairwise merging of adjacent symbols, the core shared by BPE (merge ranks) and SentencePiece (scores).

Starting from one symbol per character, the adjacent pair with the best priority (lowest value; ties go to the
leftmost pair) is merged, new pairs with the neighbours are queued, and stale queue entries are skipped. This is
the order llama.cpp's BPE and SPM sessions apply merges in, so results match token for token.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable

# priority(left, right) -> lower merges first, None when the pair may not merge
Priority = Callable[[str, str], float | None]


def merge_symbols(word: str, priority: Priority) -> list[str]:
    """The symbols left after merging the characters of `word` as far as `priority` allows."""
    n = len(word)
    if n < 2:
        return [word] if word else []
    # symbol i starts at character i; merged-away symbols get length 0
    length = [1] * n
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    heap: list[tuple[float, int, int, int]] = []
    for i in range(n - 1):
        p = priority(word[i], word[i + 1])
        if p is not None:
            heap.append((p, i, i + 1, 2))
    heapq.heapify(heap)

    def push(left: int, right: int) -> None:
        a, b = length[left], length[right]
        p = priority(word[left:left + a], word[right:right + b])
        if p is not None:
            heapq.heappush(heap, (p, left, right, a + b))

    while heap:
        _, left, right, size = heapq.heappop(heap)
        if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
            continue  # one side changed since this pair was queued
        length[left] = size
        length[right] = 0
        after = nxt[right]
        nxt[left] = after
        if after >= 0:
            prev[after] = left
        if prev[left] >= 0:
            push(prev[left], left)
        if after >= 0:
            push(left, after)

    out = []
    i = 0
    while i >= 0:
        out.append(word[i:i + length[i]])
        i = nxt[i]
    return out
