"""Exceptions raised by the KV cache layers.

Both derive from :class:`KVCacheError` so a runner can catch "anything the
cache refused" in one place, while still telling the two cases apart:

* :class:`CacheFullError` -- the batch does not fit even after compaction;
  the runner should shrink the batch or evict a sequence and retry.
* :class:`NotSupportedError` -- the operation is valid in general but not for
  this cache state (e.g. shifting cells shared by several sequences); the
  runner should fall back, typically by re-processing the prompt.

Every operation that raises one of these leaves the cache state untouched.
"""
from __future__ import annotations


class KVCacheError(Exception):
    """Base class of the cache's refusals."""


class CacheFullError(KVCacheError):
    """Not enough free cells for the batch, even after defragmentation."""


class NotSupportedError(KVCacheError):
    """The requested operation cannot be done on the current cache state."""
