"""Host-side loops in C for the KV cache's per-step inputs (ggml/host_mask.c): no ggml graph, plain numpy in and out.

Every index the C code follows is checked here first, so a wrong argument raises ValueError instead of reading
outside an array.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from ggml._lib import ffi, lib


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
