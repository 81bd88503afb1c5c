"""Checks run before an op reaches ggml, for every type and shape combination on which ggml would assert or
abort the process (ggml.c's graph-building GGML_ASSERTs and ggml-cpu's "unsupported type" aborts).

Each guard takes the operands' types and `ne` (four dims, ggml order) and raises GgmlError naming the op and
the offending operands; GgmlTensor calls them before the C call. The audit covers the ops the models use:
element-wise binary ops, unary activations, norms, RoPE, mat-mul (plain and expert), row lookup and row
writes, soft-max, fused attention, reshape, view, copy, concat and the gated activations.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ml.dtype import DType
from ml.errors import GgmlError

Ne = tuple[int, int, int, int]

FLOATS = frozenset({DType.F32, DType.F16, DType.BF16})
# (src0, src1) pairs ggml-cpu's binary ops implement (binary-ops.cpp: the result has src0's type).
_BINARY = frozenset({(DType.F32, DType.F32), (DType.F16, DType.F16), (DType.BF16, DType.BF16),
                     (DType.BF16, DType.F32), (DType.F16, DType.F32)})
# Types the CPU mat-mul cannot take as its weight side (no vec_dot of their own): integers, F64, and the
# activation-only Q8_1 / Q8_K. The backend refuses files whose tensors have one of them.
NOT_WEIGHT_TYPES = frozenset({DType.I8, DType.I16, DType.I32, DType.I64, DType.F64, DType.Q8_1, DType.Q8_K})


def _fail(op: str, why: str) -> GgmlError:
    return GgmlError(f"{op}: {why}")


def _n(ne: Ne) -> int:
    return ne[0] * ne[1] * ne[2] * ne[3]


def can_repeat(small: Ne, big: Ne) -> bool:
    """Whether `small` broadcasts over `big` (ggml_can_repeat: an empty tensor only over an empty one)."""
    if _n(small) == 0:
        return _n(big) == 0
    return all(b % s == 0 for s, b in zip(small, big))


def binary(op: str, a: DType, a_ne: Ne, b: DType, b_ne: Ne) -> None:
    if (a, b) not in _BINARY:
        raise _fail(op, f"unsupported types {a.name} and {b.name}")
    if not can_repeat(b_ne, a_ne):
        raise _fail(op, f"shape {list(b_ne)} does not broadcast over {list(a_ne)}")


def unary(op: str, a: DType, allowed: frozenset[DType] = FLOATS) -> None:
    if a not in allowed:
        raise _fail(op, f"unsupported type {a.name} (ggml-cpu has {', '.join(sorted(d.name for d in allowed))})")


F32_ONLY = frozenset({DType.F32})
SCALE_TYPES = frozenset({DType.F32, DType.BF16})
CLAMP_TYPES = frozenset({DType.F32, DType.F16})


def finite(op: str, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise _fail(op, f"{name} must be finite, not {value}")


def norm(op: str, a: DType, eps: float) -> None:
    if a != DType.F32:
        raise _fail(op, f"unsupported type {a.name} (F32 only)")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise _fail(op, f"eps must be finite and >= 0, not {eps}")


def rope(a: DType, a_ne: Ne, pos: DType, pos_ne: Ne, n_dims: int, base: float, freqs: tuple[DType, Ne] | None,
         freq_scale: float) -> None:
    if a not in (DType.F32, DType.F16):
        raise _fail("rope", f"unsupported type {a.name}")
    if pos != DType.I32 or pos_ne[0] != a_ne[2] or _n(pos_ne) != pos_ne[0]:
        raise _fail("rope", f"positions must be I32 [{a_ne[2]}], not {pos.name} {list(pos_ne)}")
    if n_dims <= 0 or n_dims % 2 or n_dims > a_ne[0]:
        raise _fail("rope", f"n_dims {n_dims} must be even, positive and at most the row size {a_ne[0]}")
    if not (math.isfinite(base) and base > 0.0) or not (math.isfinite(freq_scale) and freq_scale > 0.0):
        raise _fail("rope", f"base {base} and freq_scale {freq_scale} must be finite and positive")
    if freqs is not None and (freqs[0] != DType.F32 or freqs[1][0] < n_dims // 2):
        raise _fail("rope", f"frequency factors must be F32 with at least {n_dims // 2} values")


def matmul(a: DType, a_ne: Ne, b: DType, b_ne: Ne, a_transposed: bool) -> None:
    # b is F32, or already the weight's own dot type (F16 x F16, BF16 x BF16); anything else aborts ggml-cpu.
    if a in NOT_WEIGHT_TYPES or not (b == DType.F32 or (b == a and a in (DType.F16, DType.BF16))):
        raise _fail("mul_mat", f"unsupported types {a.name} x {b.name}")
    if a_ne[0] != b_ne[0] or b_ne[2] % a_ne[2] or b_ne[3] % a_ne[3]:
        raise _fail("mul_mat", f"shapes {list(a_ne)} and {list(b_ne)} do not multiply")
    if a_transposed:
        raise _fail("mul_mat", "the first operand must not be transposed")


def matmul_id(a: DType, a_ne: Ne, b: DType, b_ne: Ne, ids: DType, ids_ne: Ne, a_transposed: bool) -> None:
    if a in NOT_WEIGHT_TYPES or b not in FLOATS or ids != DType.I32 or a_transposed:
        raise _fail("mul_mat_id", f"unsupported operands {a.name} x {b.name} with ids {ids.name}")
    if a_ne[0] != b_ne[0] or a_ne[3] != 1 or b_ne[2] != ids_ne[1] or b_ne[3] != 1 or ids_ne[2] != 1 \
            or ids_ne[3] != 1 or ids_ne[0] % b_ne[1]:
        raise _fail("mul_mat_id", f"shapes {list(a_ne)}, {list(b_ne)} and ids {list(ids_ne)} do not fit")


def get_rows(a_ne: Ne, ids: DType, ids_ne: Ne) -> None:
    if ids != DType.I32:
        raise _fail("get_rows", f"ids must be I32, not {ids.name}")
    if a_ne[2] != ids_ne[1] or a_ne[3] != ids_ne[2] or ids_ne[3] != 1:
        raise _fail("get_rows", f"ids {list(ids_ne)} do not index a table of {list(a_ne)}")


def set_rows(a_ne: Ne, src: DType, src_ne: Ne, ids: DType, ids_ne: Ne) -> None:
    if ids not in (DType.I32, DType.I64) or src not in (DType.F32, DType.F16):
        raise _fail("set_rows", f"unsupported types: rows {src.name}, ids {ids.name}")
    if a_ne[0] != src_ne[0] or a_ne[2] != src_ne[2] or a_ne[3] != src_ne[3] or ids_ne[0] != src_ne[1] \
            or src_ne[2] % ids_ne[1] or src_ne[3] % ids_ne[2] or ids_ne[3] != 1:
        raise _fail("set_rows", f"rows {list(src_ne)} at ids {list(ids_ne)} do not fit {list(a_ne)}")


def softmax(a: DType, a_ne: Ne, contiguous: bool, mask: tuple[DType, Ne] | None) -> None:
    if a != DType.F32 or not contiguous:
        raise _fail("soft_max", f"needs a contiguous F32 tensor, not {a.name}")
    if mask is not None:
        m, m_ne = mask
        if m not in (DType.F16, DType.F32) or m_ne[0] != a_ne[0] or m_ne[1] < a_ne[1] \
                or a_ne[2] % m_ne[2] or a_ne[3] % m_ne[3]:
            raise _fail("soft_max", f"mask {m.name} {list(m_ne)} does not fit scores {list(a_ne)}")


def flash_attn(q_ne: Ne, k: DType, k_ne: Ne, v: DType, v_ne: Ne, mask: tuple[DType, Ne] | None) -> None:
    if q_ne[0] != k_ne[0] or k_ne[1] != v_ne[1] or k_ne[2] != v_ne[2] or q_ne[2] % k_ne[2] \
            or q_ne[3] != k_ne[3] or q_ne[3] != v_ne[3]:
        raise _fail("flash_attn_ext", f"q {list(q_ne)}, k {list(k_ne)}, v {list(v_ne)} do not fit")
    if k != v or k in NOT_WEIGHT_TYPES:
        raise _fail("flash_attn_ext", f"K and V must share a float or quantized type, not {k.name} and {v.name}")
    if mask is not None:
        m, m_ne = mask
        if m != DType.F16 or m_ne[0] != k_ne[1] or m_ne[1] < q_ne[1] or q_ne[2] % m_ne[2] or q_ne[3] % m_ne[3]:
            raise _fail("flash_attn_ext", f"mask {m.name} {list(m_ne)} does not fit {k_ne[1]} keys")


def reshape(a_ne: Ne, shape: Sequence[int], contiguous: bool) -> None:
    if any(d <= 0 for d in shape) or math.prod(shape) != _n(a_ne):
        raise _fail("reshape", f"{list(a_ne)} cannot become {list(shape)}")
    if not contiguous:
        raise _fail("reshape", "the tensor must be contiguous")


def view(nbytes: int, offset: int, shape: Sequence[int], strides: Sequence[int], row_bytes: int) -> None:
    if offset < 0 or any(d <= 0 for d in shape) or any(s < 0 for s in strides):
        raise _fail("view", f"offset {offset}, shape {list(shape)}, strides {list(strides)}")
    last = offset + row_bytes + sum((d - 1) * s for d, s in zip(shape[1:], strides))
    if last > nbytes:
        raise _fail("view", f"reaches byte {last} of a {nbytes}-byte tensor")


def copy(a: DType, a_ne: Ne, b: DType, b_ne: Ne) -> None:
    """ggml_cpy / ggml_cast: quantized data only dequantizes to F32 on the CPU."""
    if a.is_quantized and b != DType.F32:
        raise _fail("cpy", f"{a.name} converts to F32 only, not {b.name}")
    if _n(a_ne) != _n(b_ne):
        raise _fail("cpy", f"{list(a_ne)} and {list(b_ne)} hold different numbers of elements")


def same_shape(op: str, a: DType, a_ne: Ne, b: DType, b_ne: Ne) -> None:
    if a != b or a not in FLOATS or a_ne != b_ne:
        raise _fail(op, f"needs two tensors of one type and shape, not {a.name} {list(a_ne)}, {b.name} {list(b_ne)}")


def concat(a: DType, a_ne: Ne, b: DType, b_ne: Ne, dim: int) -> None:
    if not 0 <= dim < 4 or a != b or any(x != y for i, (x, y) in enumerate(zip(a_ne, b_ne)) if i != dim):
        raise _fail("concat", f"{a.name} {list(a_ne)} and {b.name} {list(b_ne)} along dim {dim}")
