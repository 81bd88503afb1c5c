"""Additive attention masks for ggml, built from cell metadata with numpy.

Layout (what ggml wants)
------------------------
``ggml_soft_max_ext(kq, mask)`` and ``ggml_flash_attn_ext(q, k, v, mask)``
take a mask with ``ne = [n_kv, n_rows]``: ``ne0`` (contiguous) runs over
the KV cells and must equal the K view's cell count; ``ne1`` runs over the
batch tokens and must be ``>= n_tokens``.  In numpy (row-major) that is an
array of shape ``(n_rows, n_kv)``: one row per token, one column per cell.
Entry ``[t, c]`` is ``0.0`` when token ``t`` may attend to cell ``c`` and
``-inf`` otherwise (it is added to the scaled scores before softmax).

Padding
-------
The pinned ggml (llama-cpp-python 0.3.36) no longer defines
``GGML_KQ_MASK_PAD``: extra mask rows are allowed but not required, so the
row padding defaults to 1 (none).  Two things still matter:

* ``ggml_flash_attn_ext`` asserts an F16, contiguous mask -- build it with
  ``dtype=np.float16`` (``-inf`` is exact in f16) to skip a cast node;
  ``ggml_soft_max_ext`` takes F32 or F16.
* The CUDA flash-attention kernels only take their fast paths when
  ``n_kv % 256 == 0`` (``FATTN_KQ_STRIDE``), hence :data:`KV_PAD_DEFAULT`.

Padding rows (token index ``>= n_tokens``) and columns whose cells do not
hold a visible entry are ``-inf``.  Padding columns need no special case:
the caller only pads over empty cells (position -1, no sequence), which are
never visible.

Visibility rule
---------------
Token ``t`` (position ``p``, sequence ``s``) sees cell ``c`` (position
``q``) iff all of:

* ``c`` holds sequence ``s``;
* causal rows: ``q <= p``;
* ``window`` given: ``p - q <= window`` -- Ollama's sliding-window rule
  (a cell is hidden when ``q < p - window``), so ``window + 1`` positions
  ``p - window .. p`` are visible;
* ``chunk`` given: ``q // chunk == p // chunk`` (llama4-style chunked
  attention).  For causal rows this equals Ollama's "``q`` at or after the
  start of ``p``'s chunk"; for non-causal rows it also hides later chunks.

Every condition is an interval on ``q`` per row, so the whole mask is the
membership of the cell in the row's sequence and two comparisons against
per-row bounds ``lo <= q <= hi``: one pass of a C loop
(``ggml/host_cache.c``), which reads the cell table's arrays in place.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from ggml.host import attention_mask

KV_PAD_DEFAULT = 256
"""Default multiple for the mask's KV width (CUDA ``FATTN_KQ_STRIDE``)."""

ROW_PAD_DEFAULT = 1
"""Default multiple for the mask's row count (this ggml needs none)."""

_I32_MAX = np.iinfo(np.int32).max

MaskDType = type[np.float32] | type[np.float16]


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= n`` (``multiple >= 1``)."""
    if multiple < 1:
        raise ValueError(f"padding multiple must be >= 1, got {multiple}")
    return -(-n // multiple) * multiple


def row_bounds(
    positions: NDArray[np.int32],
    *,
    window: int | None = None,
    chunk: int | None = None,
    causal: bool | NDArray[np.bool_] = True,
    spans: NDArray[np.int32] | None = None,
) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    """Per-token inclusive bounds ``(lo, hi)`` on visible cell positions.

    Args:
        positions: int32[n_tokens] token positions.
        window: sliding-window size (``window + 1`` positions visible), or None.
        chunk: chunk length for chunked attention, or None.
        causal: True/False for all rows, or bool[n_tokens] per row (False
            rows see later positions too).
        spans: int32[n_tokens, 2] or None: positions ``spans[t, 0] .. spans[t, 1]``
            (which hold ``p``) are visible to row ``t`` whatever the causal and
            window rules say -- the tokens of one image see each other (Gemma 3:
            HF ORs this onto the causal and sliding-window masks).

    Returns:
        ``lo, hi``: int32[n_tokens] each; a cell at position ``q`` passes the
        position tests of row ``t`` iff ``lo[t] <= q <= hi[t]``.
    """
    if (isinstance(causal, bool) and causal and chunk is None and spans is None and window is not None
            and 0 <= window <= _I32_MAX):
        # A causal sliding window alone (every decode step of gemma's local layers): two int32 operations;
        # p - window >= -window >= -int32 max, so nothing overflows
        p32 = positions.astype(np.int32, copy=False)
        return np.maximum(p32 - np.int32(window), np.int32(0)), p32
    p = positions.astype(np.int64)  # no int32 overflow in p - window etc.
    if isinstance(causal, bool):
        hi = p if causal else np.full_like(p, _I32_MAX)
    else:
        hi = np.where(causal, p, np.int64(_I32_MAX))
    lo = np.zeros_like(p)
    if window is not None:
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        lo = np.maximum(p - window, 0)
    if spans is not None:  # the span holds p, so it joins [lo, hi] into one interval
        lo = np.minimum(lo, spans[:, 0].astype(np.int64))
        hi = np.maximum(hi, spans[:, 1].astype(np.int64))
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        start = p - p % chunk
        lo = np.maximum(lo, start)
        hi = np.minimum(hi, start + (chunk - 1))
    # 0 <= lo <= p and hi <= int32 max, so both narrow back losslessly.
    return lo.astype(np.int32), hi.astype(np.int32)


def build_mask(
    cell_positions: NDArray[np.int32],
    member: NDArray[np.bool_],
    positions: NDArray[np.int32],
    *,
    window: int | None = None,
    chunk: int | None = None,
    causal: bool | NDArray[np.bool_] = True,
    spans: NDArray[np.int32] | None = None,
    n_rows: int | None = None,
    dtype: MaskDType = np.float32,
) -> NDArray[np.floating[Any]]:
    """Additive mask for one forward batch over a range of cells.

    Args:
        cell_positions: int32[n_kv] positions of the cells in the range
            (-1 for empty cells).
        member: bool[n_tokens, n_kv]; ``member[t, c]`` is True iff cell
            ``c`` holds token ``t``'s sequence (read, not changed).
        positions: int32[n_tokens] token positions.
        window, chunk, causal, spans: see :func:`row_bounds`.
        n_rows: total rows (``>= n_tokens``); rows past ``n_tokens`` are
            all ``-inf``.  Default ``n_tokens``.
        dtype: np.float32 (soft_max_ext) or np.float16 (flash_attn_ext).

    Returns:
        ``(n_rows, n_kv)`` array of ``0`` / ``-inf``, C-contiguous, i.e. a
        ggml tensor with ``ne = [n_kv, n_rows]``.
    """
    n_tokens, n_kv = member.shape
    if cell_positions.shape != (n_kv,) or positions.shape != (n_tokens,):
        raise ValueError(
            f"shape mismatch: member {member.shape}, cell_positions "
            f"{cell_positions.shape}, positions {positions.shape}"
        )
    # a table of n_tokens "sequences", row t being token t's
    return table_mask(np.ascontiguousarray(cell_positions, dtype=np.int32), np.ascontiguousarray(member), (0, n_kv),
                      np.arange(n_tokens, dtype=np.intp), positions, window=window, chunk=chunk, causal=causal,
                      spans=spans, n_rows=n_rows, dtype=dtype)


def table_mask(
    cell_positions: NDArray[np.int32],
    member: NDArray[np.bool_],
    kv_range: tuple[int, int],
    seqs: NDArray[np.intp],
    positions: NDArray[np.int32],
    *,
    window: int | None = None,
    chunk: int | None = None,
    causal: bool | NDArray[np.bool_] = True,
    spans: NDArray[np.int32] | None = None,
    n_rows: int | None = None,
    dtype: MaskDType = np.float32,
) -> NDArray[np.floating[Any]]:
    """:func:`build_mask` for a batch over the cells ``[start, stop)`` of a whole cell table, read in place:
    ``cell_positions`` int32[capacity] and ``member`` bool[n_sequences, capacity] are the table's arrays, token
    ``t`` belongs to sequence ``seqs[t]``. The same mask as ``build_mask(cell_positions[start:stop],
    member[seqs, start:stop], positions, ...)`` without gathering the membership rows first."""
    n_tokens = positions.shape[0]
    start, stop = kv_range
    if seqs.shape != (n_tokens,):
        raise ValueError(f"shape mismatch: seqs {seqs.shape}, positions {positions.shape}")
    rows = _check_rows(n_tokens, n_rows, causal, spans, dtype)
    lo, hi = _bounds(positions, window=window, chunk=chunk, causal=causal, spans=spans)
    return attention_mask(cell_positions, member, start, stop - start, seqs, lo, hi, rows, dtype)


def _check_rows(n_tokens: int, n_rows: int | None, causal: bool | NDArray[np.bool_],
                spans: NDArray[np.int32] | None, dtype: MaskDType) -> int:
    """The mask's row count, after checking the per-token arguments against ``n_tokens``."""
    if dtype is not np.float32 and dtype is not np.float16:
        raise ValueError(f"mask dtype must be np.float32 or np.float16, got {dtype}")
    if isinstance(causal, np.ndarray) and causal.shape != (n_tokens,):
        raise ValueError(f"causal {causal.shape} must be a bool per token ({n_tokens})")
    if spans is not None and spans.shape != (n_tokens, 2):
        raise ValueError(f"spans {spans.shape} must be (n_tokens, 2) = ({n_tokens}, 2)")
    rows = n_tokens if n_rows is None else n_rows
    if rows < n_tokens:
        raise ValueError(f"n_rows={rows} < n_tokens={n_tokens}")
    return rows


def _bounds(
    positions: NDArray[np.int32],
    *,
    window: int | None,
    chunk: int | None,
    causal: bool | NDArray[np.bool_],
    spans: NDArray[np.int32] | None,
) -> tuple[NDArray[np.int32] | None, NDArray[np.int32] | None]:
    """The per-row bounds the mask needs, None where a bound is implied: no lower bound without a window, chunk
    or span (empty cells hold no sequence, so membership already excludes them), no upper one for non-causal
    rows without a chunk."""
    if isinstance(causal, bool) and causal and window is None and chunk is None and spans is None:
        return None, np.ascontiguousarray(positions, dtype=np.int32)  # plain causal decode: only q <= p
    lo, hi = row_bounds(positions, window=window, chunk=chunk, causal=causal, spans=spans)
    no_upper = isinstance(causal, bool) and not causal and chunk is None
    no_lower = window is None and chunk is None and spans is None
    return None if no_lower else lo, None if no_upper else hi
