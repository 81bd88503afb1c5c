"""Host-side loops in C for a decode step's bookkeeping: the KV cache's (ggml/host_cache.c) and the sampler's
(ggml/host_sample.c). No ggml graph, plain numpy in and out.

Every index the C code follows is checked here first, so a wrong argument raises ValueError instead of reading
outside an array.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from ggml._lib import ffi, lib

PLACE_MAX = 64
"""Tokens `place_decode` takes at most (PYR_PLACE_MAX)."""


def _check_table(pos: NDArray[np.int32], member: NDArray[np.bool_], summary: NDArray[np.int64],
                 seqs: NDArray[np.intp], per_token: NDArray[Any], per_token_dtype: type[np.generic]) -> None:
    """ValueError unless the arrays are a cell table's (int32 positions, bool membership of the same capacity, its
    summary), all writable and contiguous, with distinct sequence ids in range and one `per_token` entry each."""
    n = seqs.shape[0]
    if (pos.dtype != np.int32 or pos.ndim != 1 or member.dtype != np.bool_ or member.ndim != 2
            or member.shape[1] != pos.shape[0] or summary.dtype != np.int64 or summary.shape != (2 + member.shape[0],)
            or seqs.dtype != np.intp or per_token.dtype != per_token_dtype or per_token.shape != (n,)
            or not (pos.flags.c_contiguous and member.flags.c_contiguous and summary.flags.c_contiguous
                    and seqs.flags.c_contiguous and per_token.flags.c_contiguous and pos.flags.writeable
                    and member.flags.writeable and summary.flags.writeable)):
        raise ValueError("bad cell table arrays")
    ids = seqs.tolist()
    if not 1 <= n <= PLACE_MAX or min(ids) < 0 or max(ids) >= member.shape[0] or len(set(ids)) != n:
        raise ValueError(f"{n} tokens of sequences {ids}: 1 to {PLACE_MAX} distinct ones in [0, {member.shape[0]})")
    capacity = pos.shape[0]
    if not 0 <= int(summary[1]) <= capacity or not all(-1 <= int(summary[2 + s]) < capacity for s in ids):
        raise ValueError("the summary points outside the table")


def evict_decode(pos: NDArray[np.int32], member: NDArray[np.bool_], summary: NDArray[np.int64],
                 seqs: NDArray[np.intp], thresholds: NDArray[np.int64]) -> NDArray[np.int32]:
    """The sliding window's eviction on a decode step (CellTable.evict_outside_window, one token per sequence):
    sequence seqs[i] lets go of its cells at positions below thresholds[i], cells no sequence holds become empty,
    the summary (see `place_decode`) follows. Returns the cells freed, ascending."""
    _check_table(pos, member, summary, seqs, thresholds, np.int64)
    freed = np.empty(pos.shape[0], dtype=np.int32)  # a cell is freed once at most
    n = lib.pyrunner_evict_decode(ffi.from_buffer("int32_t[]", pos), ffi.from_buffer("bool[]", member), pos.shape[0],
                                  member.shape[0], ffi.from_buffer("int64_t[]", summary),
                                  ffi.from_buffer("int64_t[]", seqs), ffi.from_buffer("int64_t[]", thresholds),
                                  seqs.shape[0], ffi.from_buffer("int32_t[]", freed))
    out = freed[:n]
    if seqs.shape[0] > 1 and n > 1:
        out.sort()
    return out


def place_decode(pos: NDArray[np.int32], member: NDArray[np.bool_], summary: NDArray[np.int64],
                 seqs: NDArray[np.intp], positions: NDArray[np.int32],
                 max_holes: int | None, *, store: bool = True) -> NDArray[np.int64] | None:
    """Ordered placement of one token per sequence (CellTable's decode step), with `store` stored in the table's
    arrays `pos` int32[capacity] and `member` bool[n_sequences, capacity] and its summary int64[2 + n_sequences]
    (n_used, extent, each sequence's last cell): the cells taken (int64, the set_rows indices), or None with
    nothing changed when some sequence has no free cell above its last one or `max_holes` or more empty cells would
    stay below the extent. Without `store` nothing changes either way (CellTable.ordered_free_cells).

    The caller checked positions >= 0 and that enough cells are free; sequences must be distinct."""
    _check_table(pos, member, summary, seqs, positions, np.int32)
    n = seqs.shape[0]
    if max_holes is not None and max_holes <= 0:
        return None  # every placement leaves at least 0 empty cells below the extent
    cells = np.empty(n, dtype=np.int64)
    ok = lib.pyrunner_place_decode(ffi.from_buffer("int32_t[]", pos), ffi.from_buffer("bool[]", member), pos.shape[0],
                                   ffi.from_buffer("int64_t[]", summary), ffi.from_buffer("int64_t[]", seqs),
                                   ffi.from_buffer("int32_t[]", positions), n, -1 if max_holes is None else max_holes,
                                   int(store), ffi.from_buffer("int64_t[]", cells))
    return cells if ok else None


def attention_mask(cell_pos: NDArray[np.int32], member: NDArray[np.bool_], start: int, n_kv: int,
                   rows: NDArray[np.intp], lo: NDArray[np.int32] | None, hi: NDArray[np.int32] | None,
                   n_rows: int, dtype: type[np.float16] | type[np.float32]) -> NDArray[Any]:
    """(n_rows, n_kv) additive mask over cells [start, start + n_kv): entry [t, c] is 0 when cell start + c holds
    sequence `rows[t]` (`member[rows[t], cell]`) and `lo[t] <= cell_pos[cell] <= hi[t]`, else -inf (a None bound
    is no bound); rows past `rows.size` are all -inf.

    cell_pos: int32[capacity]; member: bool[n_sequences, capacity], C-contiguous; rows: intp[n_tokens];
    lo, hi: int32[n_tokens] or None."""
    capacity = cell_pos.shape[0]
    n_tokens = rows.shape[0]
    if (cell_pos.dtype != np.int32 or cell_pos.ndim != 1 or member.dtype != np.bool_ or member.ndim != 2
            or member.shape[1] != capacity or rows.dtype != np.intp or rows.ndim != 1
            or not (cell_pos.flags.c_contiguous and member.flags.c_contiguous and rows.flags.c_contiguous)):
        raise ValueError(f"attention_mask: bad arrays (cell_pos {cell_pos.dtype}{cell_pos.shape}, member "
                         f"{member.dtype}{member.shape}, rows {rows.dtype}{rows.shape})")
    if not 0 <= start <= start + n_kv <= capacity or not n_tokens <= n_rows:
        raise ValueError(f"attention_mask: cells [{start}, {start + n_kv}) of {capacity}, {n_rows} rows for "
                         f"{n_tokens} tokens")
    if n_tokens:
        first, last = (int(rows.min()), int(rows.max())) if n_tokens > 64 else (min(rows.tolist()), max(rows.tolist()))
        if first < 0 or last >= member.shape[0]:
            raise ValueError(f"attention_mask: rows outside [0, {member.shape[0]})")
    bounds = []
    for b in (lo, hi):
        if b is None:
            bounds.append(ffi.NULL)
            continue
        if b.dtype != np.int32 or b.shape != (n_tokens,) or not b.flags.c_contiguous:
            raise ValueError(f"attention_mask: bounds must be int32[{n_tokens}], got {b.dtype}{b.shape}")
        bounds.append(ffi.from_buffer("int32_t[]", b))
    if dtype is not np.float16 and dtype is not np.float32:
        raise ValueError(f"attention_mask: dtype must be float16 or float32, not {dtype}")
    out = np.empty((n_rows, n_kv), dtype=dtype)
    if out.size:
        lib.pyrunner_attention_mask(ffi.from_buffer("int32_t[]", cell_pos), ffi.from_buffer("bool[]", member),
                                    capacity, start, n_kv, ffi.from_buffer("int64_t[]", rows), bounds[0], bounds[1],
                                    n_tokens, n_rows, int(dtype is np.float16), ffi.from_buffer(out))
    return out


SAMPLE_MAX_K = 256
"""The largest top-k `sample_top_k` takes (PYR_SAMPLE_MAX_K)."""


def sample_top_k(row: NDArray[np.float32], history: NDArray[np.int64], repeat_penalty: float, presence_penalty: float,
                 frequency_penalty: float, k: int,
                 seen: NDArray[np.uint8]) -> tuple[NDArray[np.int64], NDArray[np.float32]] | None:
    """The k best tokens of `row` after the repetition penalties of `history` (runner/sampling.py's
    apply_penalties, bit for bit), by logit down and id up, with their penalised logits; None when the row holds
    a NaN or +inf (the sampler's general path reports or handles them). `history` is overwritten; `seen` is
    scratch of at least row.size zero bytes, zero again afterwards. The row is read once and not copied."""
    n = row.shape[0]
    if (row.dtype != np.float32 or row.ndim != 1 or history.dtype != np.int64 or history.ndim != 1
            or seen.dtype != np.uint8 or seen.shape[0] < n
            or not (row.flags.c_contiguous and history.flags.c_contiguous and history.flags.writeable
                    and seen.flags.c_contiguous and seen.flags.writeable)):
        raise ValueError("sample_top_k: bad arrays")
    if not 1 <= k <= min(n, SAMPLE_MAX_K):
        raise ValueError(f"sample_top_k: k={k} outside [1, {min(n, SAMPLE_MAX_K)}]")
    h = max(history.shape[0], 1)
    pen_ids, pen_vals = np.empty(h, dtype=np.int64), np.empty(h, dtype=np.float32)
    ids, vals = np.empty(k, dtype=np.int64), np.empty(k, dtype=np.float32)
    got = lib.pyrunner_sample_top_k(ffi.from_buffer("float[]", row), n, ffi.from_buffer("int64_t[]", history),
                                    history.shape[0], repeat_penalty, presence_penalty, frequency_penalty,
                                    ffi.from_buffer("uint8_t[]", seen), ffi.from_buffer("int64_t[]", pen_ids),
                                    ffi.from_buffer("float[]", pen_vals), k, ffi.from_buffer("int64_t[]", ids),
                                    ffi.from_buffer("float[]", vals))
    return (ids, vals) if got == k else None
