"""When a mat-mul runs on the row kernels of ggml/row_matmul.c instead of ggml_mul_mat.

Those kernels read each weight block once for up to four activation columns, where ggml's reference mat-mul
re-reads and re-unpacks it per column; every output element gets the float operations of ggml's own vec_dot, so
results stay batch-invariant (and equal ggml's on an AVX2 build). They serve 2-D Q4_1, Q8_0, Q4_K and Q6_K weights
in host memory, times contiguous f32 activations, on a CPU with AVX2/FMA/F16C; anything else goes to ggml_mul_mat.
"""
from __future__ import annotations

from functools import cache

from ggml._lib import CData, ffi, in_host_memory, lib


@cache
def _supported(ggml_type: int) -> bool:
    return bool(lib.pyrunner_row_matmul_supports(ggml_type))


@cache
def vnni() -> bool:
    """Whether the Q4_1 / Q8_0 kernels take their AVX-VNNI variant (same bits, one instruction fewer per block)."""
    return bool(lib.pyrunner_row_matmul_has_vnni())


@cache
def _max_k() -> int:
    return int(lib.pyrunner_row_matmul_max_k())


_K_QUANTS = frozenset((lib.GGML_TYPE_Q4_K, lib.GGML_TYPE_Q6_K))


def usable(w: CData, b: CData) -> bool:
    """Whether w [K, M] x b [K, ...] can run on the row kernels (the caller checked the runtime allows them).

    A single K-quant column stays with ggml_mul_mat: there is nothing to share between columns, and ggml's vec_dot
    is a little faster alone (5-20% measured). Both give the same bits, so the choice never changes a result."""
    if int(w.type) in _K_QUANTS and int(b.ne[1]) * int(b.ne[2]) * int(b.ne[3]) == 1:
        return False
    return (_supported(int(w.type)) and int(b.type) == lib.GGML_TYPE_F32 and int(w.ne[0]) <= _max_k()
            and int(w.ne[2]) == 1 and int(w.ne[3]) == 1
            and bool(lib.ggml_is_contiguous(w)) and bool(lib.ggml_is_contiguous(b)) and in_host_memory(w))


def matmul(ctx: CData, w: CData, b: CData, casts: dict[tuple[int, int], CData]) -> CData:
    """w [K, M] x b [K, n1, n2, n3] -> [M, n1, n2, n3] f32 through the row kernels (see `usable`).

    `casts` holds the quantized copies of activations already made in this graph, by (tensor address, type): the
    q, k and v projections of one input (gate and up likewise) share one, so the graph quantizes it once and has
    two ops and two thread barriers fewer. The cast is the same op either way: the bits do not change."""
    n1, n2, n3 = int(b.ne[1]), int(b.ne[2]), int(b.ne[3])
    vec_type = int(lib.pyrunner_row_matmul_vec_type(w.type))
    key = (int(ffi.cast("uintptr_t", b)), vec_type)
    bq = casts.get(key)
    if bq is None:
        flat = b if n2 == 1 and n3 == 1 else lib.ggml_reshape_4d(ctx, b, int(b.ne[0]), n1 * n2 * n3, 1, 1)
        bq = casts[key] = lib.ggml_cast(ctx, flat, vec_type)
    out = lib.pyrunner_row_matmul_q(ctx, w, bq, int(vnni()))
    return out if n2 == 1 and n3 == 1 else lib.ggml_reshape_4d(ctx, out, int(w.ne[1]), n1, n2, n3)
