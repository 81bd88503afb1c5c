"""KV caches: the Cache interface (base), the causal / sliding-window / chunked cache (causal), the encoder cache
for cross-attention (encoder) and the per-layer router (wrapper), over the backend-free cell table (cells)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mypy proves every implementation satisfies the one interface
    from kvcache.base import Cache
    from kvcache.causal import CausalCache
    from kvcache.encoder import EncoderCache
    from kvcache.wrapper import WrapperCache

    def _implementations(a: CausalCache, b: EncoderCache, c: WrapperCache) -> list[Cache]:
        return [a, b, c]
