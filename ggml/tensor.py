"""GgmlTensor: the `ml.Tensor` ops, each a thin wrapper over one ggml call (ggml order: shape[0] fastest)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ggml import guards, row_matmul
from ggml._lib import CData, check, ffi, in_host_memory, lib
from ml.dtype import DType, dtype_of
from ml.errors import GgmlError

if TYPE_CHECKING:
    from ggml.context import GgmlContext
    from ml.backend import Context, Tensor

# YaRN defaults that disable it (ggml.h, ggml_rope_ext).
_POOL = {"max": 0, "avg": 1}


def _c(ctx: Context) -> GgmlContext:
    return ctx  # type: ignore[return-value]


def _t(t: Tensor | None) -> CData:
    return ffi.NULL if t is None else t._ptr  # type: ignore[attr-defined]


def _ne(t: Tensor) -> guards.Ne:
    ne = _t(t).ne
    return (int(ne[0]), int(ne[1]), int(ne[2]), int(ne[3]))


def _meta(t: Tensor | None) -> tuple[DType, guards.Ne] | None:
    return None if t is None else (dtype_of(_t(t).type), _ne(t))


def _row_attention_usable(q: CData, k: CData, v: CData, mask: CData) -> bool:
    """Whether ggml/row_attention.c takes this attention: F32 queries, F16 keys and values in host memory (a cache
    layer on a GPU stays with ggml's kernel, which runs there), an F16 mask, 3-D operands. The answer depends on
    the model and the cache's type and placement only, never on the batch, so every batch of a run takes the same
    kernel."""
    return (mask != ffi.NULL and int(q.type) == lib.GGML_TYPE_F32 and int(k.type) == lib.GGML_TYPE_F16
            and int(v.type) == lib.GGML_TYPE_F16 and int(mask.type) == lib.GGML_TYPE_F16
            and int(q.ne[3]) == 1 and int(k.ne[3]) == 1 and int(v.ne[3]) == 1
            and int(mask.ne[2]) == 1 and int(mask.ne[3]) == 1
            and int(q.ne[2]) % int(k.ne[2]) == 0 and int(k.ne[2]) == int(v.ne[2])
            and in_host_memory(k) and in_host_memory(v))


def _transposed(t: Tensor) -> bool:
    return bool(_t(t).nb[0] > _t(t).nb[1])


class GgmlTensor:
    """A ggml tensor. Holds its owner (a context or backend) so the C memory outlives the wrapper."""

    __slots__ = ("_ptr", "_owner", "_value", "_plain")

    def __init__(self, ptr: CData, owner: object) -> None:
        self._ptr = ptr
        self._owner = owner
        self._value: npt.NDArray[Any] | None = None
        # (numpy dtype, numpy shape, bytes) once a read found a plain, contiguous, host-readable tensor: a reused
        # graph's output is read every step, and repeating those checks cost more than the copy
        self._plain: tuple[np.dtype[Any], tuple[int, ...], int] | None = None

    # ---- properties ----
    @property
    def shape(self) -> tuple[int, ...]:
        ne = self._ptr.ne
        n = 4
        while n > 1 and ne[n - 1] == 1:
            n -= 1
        return tuple(int(ne[i]) for i in range(n))

    @property
    def ne(self) -> tuple[int, int, int, int]:
        ne = self._ptr.ne
        return (int(ne[0]), int(ne[1]), int(ne[2]), int(ne[3]))

    @property
    def dtype(self) -> DType:
        return dtype_of(self._ptr.type)

    @property
    def nbytes(self) -> int:
        return int(lib.ggml_nbytes(self._ptr))

    @property
    def name(self) -> str:
        return str(ffi.string(self._ptr.name).decode())

    def stride(self, dim: int) -> int:
        return int(self._ptr.nb[dim])

    def __repr__(self) -> str:
        return f"GgmlTensor({self.name!r}, {self.dtype.name}, {list(self.shape)})"

    # ---- values ----
    def numpy(self) -> npt.NDArray[Any]:
        """The values as numpy (shape reversed from ggml order). Quantized tensors give raw block bytes per row;
        BF16 converts to float32. Raises for tensors without data (not computed yet, or repacked weights)."""
        if self._value is not None:
            return self._value
        return self._read()

    def _read(self) -> npt.NDArray[Any]:
        if getattr(self._owner, "closed", False):  # the C tensor was freed with its context or backend
            raise GgmlError("tensor belongs to a closed context or backend")
        p = self._ptr
        if p.data == ffi.NULL or p.buffer == ffi.NULL:
            raise GgmlError(f"tensor {self.name!r} has no data: compute it first (ctx.compute(t))")
        plain = self._plain
        if plain is not None:  # checked before: its type, shape and contiguity never change
            out = np.empty(plain[1], dtype=plain[0])
            lib.ggml_backend_tensor_get(p, ffi.from_buffer(out), 0, plain[2])
            return out
        if not lib.ggml_is_contiguous(p):
            raise GgmlError(f"tensor {self.name!r} is a non-contiguous view; make it contiguous before reading")
        if ffi.string(lib.ggml_backend_buft_name(lib.ggml_backend_buffer_get_type(p.buffer))) == b"CPU_REPACK":
            # ggml's repack buffer has no get_tensor (it would crash): the layout is not the file's anyway
            raise GgmlError(f"tensor {self.name!r} is a repacked weight (CPU_REPACK) and cannot be read back")
        ne = self.ne
        dt = self.dtype
        raw = np.empty(self.nbytes, dtype=np.uint8)
        lib.ggml_backend_tensor_get(p, ffi.from_buffer(raw), 0, raw.nbytes)
        if dt.is_quantized:
            blocks: npt.NDArray[Any] = raw.reshape(ne[3], ne[2], ne[1], dt.row_bytes(ne[0]))
            return np.asarray(blocks[tuple(self._squeeze())])
        if dt == DType.BF16:
            arr: npt.NDArray[Any] = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.view(dt.numpy)
            self._plain = (arr.dtype, tuple(reversed(self.shape)), raw.nbytes)
        return arr.reshape(tuple(reversed(self.shape)))

    def host_view(self, *, writable: bool = False) -> npt.NDArray[Any]:
        """The values as a read-only numpy view of the tensor's own memory, no copy: valid until that memory is
        written again (the next compute of its graph). For a plain (not quantized, not BF16) tensor in host memory;
        a reused graph's logits are 1 MB per row for a 262k vocabulary, and copying them out cost more per decode
        step than everything else the step does in Python. `writable`: a view to write through, for an allocated
        graph's input (what `ggml_backend_tensor_set` would copy there, without a call into C)."""
        if self._plain is None:
            self._read()  # checks everything once, and raises for what cannot be viewed either
        elif getattr(self._owner, "closed", False):  # before touching the C tensor, freed with its owner
            raise GgmlError("tensor belongs to a closed context or backend")
        plain = self._plain
        p = self._ptr
        if plain is None or not in_host_memory(p):
            raise GgmlError(f"tensor {self.name!r} cannot be viewed in place (not plain host memory)")
        view = np.frombuffer(ffi.buffer(p.data, plain[2]), dtype=plain[0]).reshape(plain[1])
        view.flags.writeable = writable
        return view

    def _squeeze(self) -> list[Any]:
        # Index that drops leading (outer) size-1 dims beyond the tensor's rank, keeping the byte dimension.
        n = len(self.shape)
        return [0] * (4 - n) + [slice(None)] * n

    # ---- element-wise ----
    def add(self, ctx: Context, b: Tensor) -> Tensor:
        guards.binary("add", self.dtype, self.ne, b.dtype, _ne(b))
        return _c(ctx).wrap(lib.ggml_add(_c(ctx).c, self._ptr, _t(b)))

    def sub(self, ctx: Context, b: Tensor) -> Tensor:
        guards.binary("sub", self.dtype, self.ne, b.dtype, _ne(b))
        return _c(ctx).wrap(lib.ggml_sub(_c(ctx).c, self._ptr, _t(b)))

    def mul(self, ctx: Context, b: Tensor) -> Tensor:
        guards.binary("mul", self.dtype, self.ne, b.dtype, _ne(b))
        return _c(ctx).wrap(lib.ggml_mul(_c(ctx).c, self._ptr, _t(b)))

    def div(self, ctx: Context, b: Tensor) -> Tensor:
        guards.binary("div", self.dtype, self.ne, b.dtype, _ne(b))
        return _c(ctx).wrap(lib.ggml_div(_c(ctx).c, self._ptr, _t(b)))

    def scale(self, ctx: Context, s: float) -> Tensor:
        guards.unary("scale", self.dtype, guards.SCALE_TYPES)
        guards.finite("scale", "the factor", s)
        return _c(ctx).wrap(lib.ggml_scale(_c(ctx).c, self._ptr, s))

    def neg(self, ctx: Context) -> Tensor:
        return _c(ctx).wrap(lib.ggml_neg(_c(ctx).c, self._ptr))

    def sqr(self, ctx: Context) -> Tensor:
        guards.unary("sqr", self.dtype)
        return _c(ctx).wrap(lib.ggml_sqr(_c(ctx).c, self._ptr))

    def sqrt(self, ctx: Context) -> Tensor:
        return _c(ctx).wrap(lib.ggml_sqrt(_c(ctx).c, self._ptr))

    def sin(self, ctx: Context) -> Tensor:
        return _c(ctx).wrap(lib.ggml_sin(_c(ctx).c, self._ptr))

    def cos(self, ctx: Context) -> Tensor:
        return _c(ctx).wrap(lib.ggml_cos(_c(ctx).c, self._ptr))

    def tanh(self, ctx: Context) -> Tensor:
        guards.unary("tanh", self.dtype)
        return _c(ctx).wrap(lib.ggml_tanh(_c(ctx).c, self._ptr))

    def sigmoid(self, ctx: Context) -> Tensor:
        guards.unary("sigmoid", self.dtype)
        return _c(ctx).wrap(lib.ggml_sigmoid(_c(ctx).c, self._ptr))

    def relu(self, ctx: Context) -> Tensor:
        guards.unary("relu", self.dtype)
        return _c(ctx).wrap(lib.ggml_relu(_c(ctx).c, self._ptr))

    def silu(self, ctx: Context) -> Tensor:
        guards.unary("silu", self.dtype)
        return _c(ctx).wrap(lib.ggml_silu(_c(ctx).c, self._ptr))

    def gelu(self, ctx: Context) -> Tensor:
        guards.unary("gelu", self.dtype)
        return _c(ctx).wrap(lib.ggml_gelu(_c(ctx).c, self._ptr))

    def gelu_quick(self, ctx: Context) -> Tensor:
        guards.unary("gelu_quick", self.dtype)
        return _c(ctx).wrap(lib.ggml_gelu_quick(_c(ctx).c, self._ptr))

    def swiglu(self, ctx: Context, up: Tensor) -> Tensor:
        """silu(self) * up, fused."""
        guards.same_shape("swiglu", self.dtype, self.ne, up.dtype, _ne(up))
        return _c(ctx).wrap(lib.ggml_swiglu_split(_c(ctx).c, self._ptr, _t(up)))

    def geglu(self, ctx: Context, up: Tensor) -> Tensor:
        """gelu(self) * up, fused."""
        guards.same_shape("geglu", self.dtype, self.ne, up.dtype, _ne(up))
        return _c(ctx).wrap(lib.ggml_geglu_split(_c(ctx).c, self._ptr, _t(up)))

    def clamp(self, ctx: Context, lo: float, hi: float) -> Tensor:
        guards.unary("clamp", self.dtype, guards.CLAMP_TYPES)
        return _c(ctx).wrap(lib.ggml_clamp(_c(ctx).c, self._ptr, lo, hi))

    # ---- linear algebra, normalisation, attention ----
    def matmul(self, ctx: Context, b: Tensor) -> Tensor:
        """self [k, m, ...] x b [k, n, ...] -> [m, n, ...] (numpy: b @ self.T); b broadcasts over dims 2 and 3."""
        guards.matmul(self.dtype, self.ne, b.dtype, _ne(b), _transposed(self))
        c = _c(ctx)
        if c.runtime.row_matmul and row_matmul.usable(self._ptr, _t(b)):
            return c.wrap(row_matmul.matmul(c.c, self._ptr, _t(b), c.row_matmul_casts))
        return c.wrap(lib.ggml_mul_mat(c.c, self._ptr, _t(b)))

    def matmul_full(self, ctx: Context, b: Tensor) -> Tensor:
        """matmul with f32 accumulation requested (matters on GPUs that default to f16)."""
        guards.matmul(self.dtype, self.ne, b.dtype, _ne(b), _transposed(self))
        out = lib.ggml_mul_mat(_c(ctx).c, self._ptr, _t(b))
        lib.ggml_prec_set_acc(out, lib.GGML_PREC_F32)
        return _c(ctx).wrap(out)

    def matmul_id(self, ctx: Context, b: Tensor, ids: Tensor) -> Tensor:
        """Expert matmul: self [k, m, n_expert], b [k, n_used or 1, n_tokens], ids I32 [n_used, n_tokens]."""
        guards.matmul_id(self.dtype, self.ne, b.dtype, _ne(b), ids.dtype, _ne(ids), _transposed(self))
        return _c(ctx).wrap(lib.ggml_mul_mat_id(_c(ctx).c, self._ptr, _t(b), _t(ids)))

    def softmax(self, ctx: Context, mask: Tensor | None = None, scale: float = 1.0,
                softcap: float = 0.0) -> Tensor:
        """softmax(self*scale + mask) over dim 0; with softcap > 0, scores become softcap*tanh(score/softcap)
        before the mask (gemma2), which ggml's fused soft_max has no parameter for."""
        guards.softmax(self.dtype, self.ne, bool(lib.ggml_is_contiguous(self._ptr)), _meta(mask))
        guards.finite("soft_max", "scale", scale)
        guards.finite("soft_max", "softcap", softcap)
        c = _c(ctx)
        x = self._ptr
        if softcap > 0.0:
            x = lib.ggml_scale(c.c, lib.ggml_tanh(c.c, lib.ggml_scale(c.c, x, scale / softcap)), softcap)
            scale = 1.0
        return c.wrap(lib.ggml_soft_max_ext(c.c, x, _t(mask), scale, 0.0))

    def rms_norm(self, ctx: Context, eps: float) -> Tensor:
        guards.norm("rms_norm", self.dtype, eps)
        return _c(ctx).wrap(lib.ggml_rms_norm(_c(ctx).c, self._ptr, eps))

    def layer_norm(self, ctx: Context, eps: float) -> Tensor:
        guards.norm("norm", self.dtype, eps)
        return _c(ctx).wrap(lib.ggml_norm(_c(ctx).c, self._ptr, eps))

    def rope(self, ctx: Context, positions: Tensor, n_dims: int, base: float, *, neox: bool = False,
             freq_factors: Tensor | None = None, freq_scale: float = 1.0, n_ctx_orig: int = 0,
             ext_factor: float = 0.0, attn_factor: float = 1.0, beta_fast: float = 32.0,
             beta_slow: float = 1.0) -> Tensor:
        """Rotary embedding of self [head_dim, n_head, n_tokens] at I32 `positions` [n_tokens]."""
        guards.rope(self.dtype, self.ne, positions.dtype, _ne(positions), n_dims, base, _meta(freq_factors),
                    freq_scale)
        for name, value in (("ext_factor", ext_factor), ("attn_factor", attn_factor), ("beta_fast", beta_fast),
                            ("beta_slow", beta_slow)):
            guards.finite("rope", name, value)
        mode = lib.GGML_ROPE_TYPE_NEOX if neox else 0
        return _c(ctx).wrap(lib.ggml_rope_ext(_c(ctx).c, self._ptr, _t(positions), _t(freq_factors), n_dims, mode,
                                              n_ctx_orig, base, freq_scale, ext_factor, attn_factor, beta_fast,
                                              beta_slow))

    def flash_attn(self, ctx: Context, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                   softcap: float = 0.0) -> Tensor:
        """Fused attention. self = q [d, n_tokens, n_head]; k, v [d, n_kv, n_head_kv] (F16 or quantized);
        mask F16 [n_kv, n_tokens_padded]; returns [d_v, n_head, n_tokens] (permuted, as ggml gives it)."""
        guards.flash_attn(self.ne, k.dtype, _ne(k), v.dtype, _ne(v), _meta(mask))
        guards.finite("flash_attn_ext", "scale", scale)
        guards.finite("flash_attn_ext", "softcap", softcap)
        c = _c(ctx)
        if c.runtime.row_attention and _row_attention_usable(self._ptr, _t(k), _t(v), _t(mask)):
            return c.wrap(lib.pyrunner_row_attention(c.c, self._ptr, _t(k), _t(v), _t(mask), scale, softcap))
        out = lib.ggml_flash_attn_ext(c.c, self._ptr, _t(k), _t(v), _t(mask), scale, 0.0, softcap)
        lib.ggml_prec_set_acc(out, lib.GGML_PREC_F32)
        return c.wrap(out)

    # ---- shape and layout ----
    def reshape(self, ctx: Context, *shape: int) -> Tensor:
        guards.reshape(self.ne, shape, bool(lib.ggml_is_contiguous(self._ptr)))
        ne = list(shape) + [1] * (4 - len(shape))
        return _c(ctx).wrap(lib.ggml_reshape_4d(_c(ctx).c, self._ptr, *ne))

    def view(self, ctx: Context, offset: int, shape: Sequence[int], strides: Sequence[int] = ()) -> Tensor:
        """A view of `shape` starting `offset` bytes in; `strides` are the byte strides of dims 1.. (default:
        contiguous rows of this tensor's type)."""
        ne = list(shape) + [1] * (4 - len(shape))
        nb = list(strides)
        if len(nb) < 3:
            row = self.dtype.row_bytes(ne[0])
            full = [row, row * ne[1], row * ne[1] * ne[2]]
            nb = nb + full[len(nb):]
        guards.view(self.nbytes, offset, ne, nb, self.dtype.row_bytes(ne[0]))
        return _c(ctx).wrap(lib.ggml_view_4d(_c(ctx).c, self._ptr, ne[0], ne[1], ne[2], ne[3], nb[0], nb[1], nb[2],
                                             offset))

    def permute(self, ctx: Context, *axes: int) -> Tensor:
        """ggml_permute: dimension i of self becomes dimension axes[i] of the result."""
        ax = list(axes) + list(range(len(axes), 4))
        return _c(ctx).wrap(lib.ggml_permute(_c(ctx).c, self._ptr, *ax))

    def transpose(self, ctx: Context) -> Tensor:
        return self.permute(ctx, 1, 0, 2, 3)

    def contiguous(self, ctx: Context) -> Tensor:
        return _c(ctx).wrap(lib.ggml_cont(_c(ctx).c, self._ptr))

    def concat(self, ctx: Context, b: Tensor, dim: int) -> Tensor:
        guards.concat(self.dtype, self.ne, b.dtype, _ne(b), dim)
        return _c(ctx).wrap(lib.ggml_concat(_c(ctx).c, self._ptr, _t(b), dim))

    def get_rows(self, ctx: Context, ids: Tensor) -> Tensor:
        """Rows of self [n_embd, n_rows, ...] picked by I32 `ids` -> [n_embd, len(ids), ...] (dequantized)."""
        guards.get_rows(self.ne, ids.dtype, _ne(ids))
        return _c(ctx).wrap(lib.ggml_get_rows(_c(ctx).c, self._ptr, _t(ids)))

    def set_rows(self, ctx: Context, src: Tensor, ids: Tensor) -> Tensor:
        """Write rows of `src` into self at I64/I32 `ids` (converting type); returns a view of self."""
        guards.set_rows(self.ne, src.dtype, _ne(src), ids.dtype, _ne(ids))
        return _c(ctx).wrap(lib.ggml_set_rows(_c(ctx).c, self._ptr, _t(src), _t(ids)))

    def copy(self, ctx: Context, dst: Tensor) -> Tensor:
        """Copy self into `dst` (same element count, converting type); returns a view of dst."""
        guards.copy(self.dtype, self.ne, dst.dtype, _ne(dst))
        return _c(ctx).wrap(lib.ggml_cpy(_c(ctx).c, self._ptr, _t(dst)))

    def cast(self, ctx: Context, dtype: DType) -> Tensor:
        guards.copy(self.dtype, self.ne, dtype, self.ne)
        return _c(ctx).wrap(lib.ggml_cast(_c(ctx).c, self._ptr, int(dtype)))

    def pad(self, ctx: Context, *pads: int) -> Tensor:
        guards.unary("pad", self.dtype, guards.F32_ONLY)
        """Zero-pad at the end of each dimension by pads[i]."""
        p = list(pads) + [0] * (4 - len(pads))
        return _c(ctx).wrap(lib.ggml_pad_ext(_c(ctx).c, self._ptr, 0, p[0], 0, p[1], 0, p[2], 0, p[3]))

    def repeat(self, ctx: Context, like: Tensor) -> Tensor:
        if self.dtype.is_quantized or not guards.can_repeat(self.ne, _ne(like)):
            raise GgmlError(f"repeat: {self.dtype.name} {list(self.ne)} does not tile {list(_ne(like))}")
        return _c(ctx).wrap(lib.ggml_repeat(_c(ctx).c, self._ptr, _t(like)))

    # ---- reductions ----
    def sum_rows(self, ctx: Context) -> Tensor:
        guards.unary("sum_rows", self.dtype, guards.F32_ONLY)
        return _c(ctx).wrap(lib.ggml_sum_rows(_c(ctx).c, self._ptr))

    def mean(self, ctx: Context) -> Tensor:
        guards.unary("mean", self.dtype, guards.F32_ONLY)
        return _c(ctx).wrap(lib.ggml_mean(_c(ctx).c, self._ptr))

    def argmax(self, ctx: Context) -> Tensor:
        guards.unary("argmax", self.dtype, guards.F32_ONLY)
        return _c(ctx).wrap(lib.ggml_argmax(_c(ctx).c, self._ptr))

    def top_k(self, ctx: Context, k: int) -> Tensor:
        """I32 indices of the k largest values of each row, in no particular order."""
        guards.unary("top_k", self.dtype, guards.F32_ONLY)
        if not 0 < k <= self.ne[0]:
            raise GgmlError(f"top_k: k={k} for rows of {self.ne[0]}")
        return _c(ctx).wrap(lib.ggml_top_k(_c(ctx).c, self._ptr, k))

    # ---- vision ----
    def im2col(self, ctx: Context, kernel: Tensor, s0: int, s1: int, p0: int, p1: int, d0: int = 1,
               d1: int = 1) -> Tensor:
        """self is the input [W, H, C, N]; `kernel` [KW, KH, C, OC] gives the patch size; F32 columns."""
        guards.unary("im2col", self.dtype, guards.F32_ONLY)
        return _c(ctx).wrap(lib.ggml_im2col(_c(ctx).c, _t(kernel), self._ptr, s0, s1, p0, p1, d0, d1, True,
                                            int(DType.F32)))

    def conv2d(self, ctx: Context, kernel: Tensor, s0: int, s1: int, p0: int = 0, p1: int = 0, d0: int = 1,
               d1: int = 1) -> Tensor:
        """2-D convolution of self [W, H, C, N] with kernel [KW, KH, C, OC] -> [OW, OH, OC, N]."""
        return _c(ctx).wrap(lib.ggml_conv_2d(_c(ctx).c, _t(kernel), self._ptr, s0, s1, p0, p1, d0, d1))

    def pool2d(self, ctx: Context, kind: str, k0: int, k1: int, s0: int, s1: int, p0: float = 0.0,
               p1: float = 0.0) -> Tensor:
        if kind not in _POOL:
            raise ValueError(f"pool kind must be one of {sorted(_POOL)}, not {kind!r}")
        return _c(ctx).wrap(lib.ggml_pool_2d(_c(ctx).c, self._ptr, _POOL[kind], k0, k1, s0, s1, p0, p1))


def new_tensor_ptr(c: CData, dtype: DType, shape: Sequence[int]) -> CData:
    """Create a tensor of `shape` (ggml order) in ggml context `c`."""
    if not 1 <= len(shape) <= 4:
        raise ValueError(f"tensors have 1 to 4 dimensions, not {len(shape)}")
    ne = ffi.new("int64_t[]", [int(d) for d in shape])
    return check(lib.ggml_new_tensor(c, int(dtype), len(shape), ne), "ggml_new_tensor",
                 f"{dtype.name} {list(shape)}")
