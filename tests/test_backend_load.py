"""Loading GGUF files into ggml backend buffers: the real default model byte for byte against gguf.GGUFReader,
progress reporting, typed metadata access, corrupt and hostile files (always ModelLoadError, never a crash or a
huge allocation), and quantized matmul weights placed in the CPU_REPACK buffer."""
from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from ggml import GgmlBackend, GgmlError, RuntimeOptions, load_backend
from ggml._lib import ffi, lib
from ml.dtype import DType
from ml.errors import ModelLoadError

# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Iterator[tuple[GgmlBackend, list[float]]]:
    calls: list[float] = []
    backend = load_backend(smollm2_path, RuntimeOptions(threads=2), progress=calls.append)
    yield backend, calls
    backend.close()


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_path)


def _trim(shape: tuple[int, ...]) -> tuple[int, ...]:
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return shape[:n]


def _bytes(a: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1)


def test_every_tensor_loaded_byte_for_byte(smollm2: tuple[GgmlBackend, list[float]],
                                           smollm2_reader: gguf.GGUFReader) -> None:
    backend, _ = smollm2
    names = [t.name for t in smollm2_reader.tensors]
    assert sorted(backend.tensor_names()) == sorted(names)
    for rt in smollm2_reader.tensors:
        t = backend.get(rt.name)
        assert t is not None, rt.name
        assert t.dtype == DType(int(rt.tensor_type)), rt.name
        assert t.shape == _trim(tuple(int(d) for d in rt.shape)), rt.name
        assert t.nbytes == int(rt.n_bytes), rt.name
        got = t.numpy()  # raw block bytes for quantized tensors
        assert np.array_equal(_bytes(got), _bytes(np.asarray(rt.data))), f"{rt.name}: bytes differ from the file"
    assert backend.get("no.such.tensor") is None


def test_progress_monotone_ending_at_one(smollm2: tuple[GgmlBackend, list[float]]) -> None:
    _, calls = smollm2
    assert len(calls) > 2
    assert calls[0] == 0.0
    assert all(0.0 <= c <= 1.0 for c in calls)
    assert all(b >= a for a, b in zip(calls, calls[1:])), "progress went backwards"
    assert calls[-1] == 1.0


def test_loaded_weights_compute(smollm2: tuple[GgmlBackend, list[float]], smollm2_reader: gguf.GGUFReader) -> None:
    """get_rows on the Q8_0 embedding table and a matmul with a Q4_1 weight, against gguf's dequantization."""
    backend, _ = smollm2
    raw = {t.name: t for t in smollm2_reader.tensors}
    emb_raw, wq_raw = raw["token_embd.weight"], raw["blk.0.attn_q.weight"]
    ids = np.array([0, 1, 1234, 49151], np.int32)
    x = np.random.default_rng(0).standard_normal((3, 576)).astype(np.float32)
    with backend.new_context() as ctx:
        emb, wq = backend.get("token_embd.weight"), backend.get("blk.0.attn_q.weight")
        assert emb is not None and wq is not None
        rows = emb.get_rows(ctx, ctx.from_numpy(ids))
        y = wq.matmul(ctx, ctx.from_numpy(x))
        ctx.compute(rows, y)
        ref_rows = dequantize(np.asarray(emb_raw.data)[ids], emb_raw.tensor_type)
        np.testing.assert_array_equal(rows.numpy(), ref_rows)
        w = dequantize(np.asarray(wq_raw.data), wq_raw.tensor_type).astype(np.float64)
        ref = x.astype(np.float64) @ w.T
        err = float(np.mean((y.numpy() - ref) ** 2) / np.mean(ref ** 2))
        assert err < 5e-4, f"matmul nmse {err}"


def test_typed_metadata(smollm2: tuple[GgmlBackend, list[float]]) -> None:
    b, _ = smollm2
    assert b.architecture == "llama"
    assert b.metadata["llama.block_count"] == 30
    # keys outside general./tokenizer. are looked up under the architecture
    assert b.uint("block_count") == 30
    assert b.uint("embedding_length") == 576
    assert b.uint("attention.head_count_kv") == 3
    assert b.uint("tokenizer.ggml.bos_token_id") == 1
    assert b.string("general.architecture") == "llama"
    assert b.string("tokenizer.ggml.model") == "gpt2"
    assert b.float("rope.freq_base") == 100000.0
    assert b.float("attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert b.float("block_count") == 30.0  # an integer is a number
    assert b.bool("tokenizer.ggml.add_bos_token") is False
    assert isinstance(b.bool("tokenizer.ggml.add_space_prefix"), bool)
    assert b.strings("general.languages") == ["en"]
    tokens = b.strings("tokenizer.ggml.tokens")
    assert len(tokens) == 49152 and all(isinstance(s, str) for s in tokens[:100])
    tt = b.ints("tokenizer.ggml.token_type")
    assert tt.dtype == np.int64 and tt.shape == (49152,)
    assert b.ints("block_count").tolist() == [30]
    fl = b.floats("rope.freq_base")
    assert fl.dtype == np.float32 and fl.tolist() == [100000.0]
    assert b.has("block_count") and not b.has("llama.block_count")  # the prefix is added, never doubled


def test_metadata_defaults(smollm2: tuple[GgmlBackend, list[float]]) -> None:
    b, _ = smollm2
    assert b.uint("expert_count", 0) == 0
    assert b.uint("missing.key", 7) == 7
    assert b.string("general.nothing", "x") == "x"
    assert b.float("rope.scaling.factor", 1.5) == 1.5
    assert b.bool("use_parallel_residual", False) is False
    assert b.strings("tokenizer.ggml.nothing", []) == []
    assert b.ints("attention.sliding_window_pattern", [1, 0]).tolist() == [1, 0]
    assert b.floats("rope.freq_factors", [1.0, 2.0]).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("call,key", [
    ("uint", "nope"), ("string", "general.nope"), ("float", "nope"), ("bool", "nope"), ("strings", "tokenizer.nope"),
    ("ints", "nope"), ("floats", "nope"), ("uint", "llama.block_count"),
])
def test_metadata_missing_key_raises(smollm2: tuple[GgmlBackend, list[float]], call: str, key: str) -> None:
    b, _ = smollm2
    with pytest.raises(ModelLoadError, match="missing"):
        getattr(b, call)(key)


@pytest.mark.parametrize("call,key", [
    ("uint", "general.architecture"), ("uint", "rope.freq_base"), ("string", "block_count"),
    ("bool", "block_count"), ("float", "general.name"), ("strings", "tokenizer.ggml.token_type"),
    ("strings", "general.name"), ("ints", "tokenizer.ggml.tokens"), ("ints", "general.name"),
    ("floats", "general.languages"), ("uint", "tokenizer.ggml.add_bos_token"),
])
def test_metadata_wrong_type_raises(smollm2: tuple[GgmlBackend, list[float]], call: str, key: str) -> None:
    b, _ = smollm2
    with pytest.raises(ModelLoadError, match="expected|not an"):
        getattr(b, call)(key)


# ---------------------------------------------------------------- a tiny valid GGUF and corrupted copies of it


def _q_bytes(x: npt.NDArray[np.float32], q: GGMLQuantizationType) -> npt.NDArray[np.uint8]:
    return quantize(x, q)


def write_tiny(path: Path, tensors: dict[str, tuple[npt.NDArray[Any], GGMLQuantizationType | None]],
               arch: str | None = "llama") -> None:
    """A small GGUF (version 3, 32-byte alignment) with scalars, strings and arrays of every common kind."""
    w = gguf.GGUFWriter(path, arch=arch or "llama")
    if arch is None:
        w.kv_data[0].pop("general.architecture")
    w.add_uint32("llama.block_count", 1)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("general.name", "tiny test model")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<s>"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    for name, (data, raw) in tensors.items():
        if raw is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_tensors() -> dict[str, tuple[npt.NDArray[Any], GGMLQuantizationType | None]]:
    g = np.random.default_rng(7)
    return {
        "blk.0.attn_norm.weight": (g.standard_normal(8).astype(np.float32), None),
        "blk.0.ffn_up.weight": (g.standard_normal((4, 8)).astype(np.float32), None),
        "blk.0.attn_q.weight": (_q_bytes(g.standard_normal((2, 64)).astype(np.float32),
                                         GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0),
    }


class Layout:
    """Byte positions inside the tiny file, found with gguf.GGUFReader and the GGUF v3 layout."""

    def __init__(self, path: Path) -> None:
        r = gguf.GGUFReader(path)
        self.size = path.stat().st_size
        self.data_offset = int(r.data_offset)
        self.data_end = max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors)  # before the final padding
        self.kv: dict[str, int] = {k: int(f.offset) for k, f in r.fields.items() if not k.startswith("GGUF.")}
        raw = path.read_bytes()
        self.tensor: dict[str, dict[str, int]] = {}
        for t in r.tensors:
            pos = int(t.field.offset)
            (name_len,) = struct.unpack_from("<Q", raw, pos)
            n_dims_at = pos + 8 + name_len
            (n_dims,) = struct.unpack_from("<I", raw, n_dims_at)
            dims_at = n_dims_at + 4
            type_at = dims_at + 8 * n_dims
            self.tensor[t.name] = {"start": pos, "n_dims": n_dims_at, "dims": dims_at, "type": type_at,
                                   "offset": type_at + 4}

    def value_at(self, key: str) -> int:
        """Where the value of `key` starts (after key length, key bytes and the u32 value type)."""
        return self.kv[key] + 8 + len(key.encode()) + 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Layout]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny(path, _tiny_tensors())
    return path.read_bytes(), Layout(path)


def _patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


Q = "<Q"
I = "<I"
# name -> (make the bad bytes from (valid bytes, layout), regex the ModelLoadError message must match)
BAD: dict[str, tuple[Callable[[bytes, Layout], bytes], str]] = {
    "empty": (lambda d, L: b"", "empty"),
    "magic-only": (lambda d, L: d[:4], "truncated"),
    "truncated-in-header": (lambda d, L: d[:13], "truncated"),
    "truncated-in-kv-key": (lambda d, L: d[:L.kv["general.name"] + 10], "truncated"),
    "truncated-in-kv-string": (lambda d, L: d[:L.value_at("general.name") + 8 + 3], "truncated"),
    "truncated-in-kv-array": (lambda d, L: d[:L.value_at("tokenizer.ggml.token_type") + 14], "truncated"),
    "truncated-in-tensor-info": (lambda d, L: d[:L.tensor["blk.0.ffn_up.weight"]["dims"] + 5], "truncated"),
    "truncated-at-data": (lambda d, L: d[:L.data_offset], "past the end|truncated"),
    "truncated-in-data": (lambda d, L: d[:L.data_end - 5], "past the end|truncated"),
    "wrong-magic": (lambda d, L: b"GGML" + d[4:], "not a GGUF"),
    "version-1": (lambda d, L: _patch(d, 4, I, 1), "version"),
    "version-huge": (lambda d, L: _patch(d, 4, I, 0xFFFFFFFF), "version"),
    "tensor-count-huge": (lambda d, L: _patch(d, 8, Q, 2**62), "implausible|truncated"),
    "kv-count-huge": (lambda d, L: _patch(d, 16, Q, 2**63), "implausible|truncated"),
    "kv-count-too-many": (lambda d, L: _patch(d, 16, Q, 1000), "."),  # tensor infos parsed as metadata
    "key-length-huge": (lambda d, L: _patch(d, L.kv["general.name"], Q, 2**63 - 5), "truncated"),
    "string-length-huge": (lambda d, L: _patch(d, L.value_at("general.name"), Q, 2**62), "truncated"),
    "string-length-past-end": (lambda d, L: _patch(d, L.value_at("general.name"), Q, L.size), "truncated"),
    "string-array-count-huge": (lambda d, L: _patch(d, L.value_at("tokenizer.ggml.tokens") + 4, Q, 2**60),
                                "claims|truncated"),
    "int-array-count-huge": (lambda d, L: _patch(d, L.value_at("tokenizer.ggml.token_type") + 4, Q, 2**61),
                             "truncated"),
    "array-element-type-unknown": (lambda d, L: _patch(d, L.value_at("tokenizer.ggml.tokens"), I, 77), "unknown"),
    "value-type-unknown": (lambda d, L: _patch(d, L.value_at("general.name") - 4, I, 99), "unknown value type"),
    "key-not-utf8": (lambda d, L: _patch(d, L.kv["general.name"] + 8, "<B", 0xFF), "UTF-8"),
    "n-dims-100": (lambda d, L: _patch(d, L.tensor["blk.0.ffn_up.weight"]["n_dims"], I, 100), "dimensions"),
    "n-dims-0": (lambda d, L: _patch(d, L.tensor["blk.0.ffn_up.weight"]["n_dims"], I, 0), "dimensions"),
    "dim-2**62": (lambda d, L: _patch(d, L.tensor["blk.0.ffn_up.weight"]["dims"], Q, 2**62), "implausible shape"),
    "dim-2**64-1": (lambda d, L: _patch(d, L.tensor["blk.0.ffn_up.weight"]["dims"] + 8, Q, 2**64 - 1),
                    "implausible shape"),
    "dim-zero": (lambda d, L: _patch(d, L.tensor["blk.0.ffn_up.weight"]["dims"], Q, 0), "implausible shape"),
    # each dim plausible on its own (<= 8 * file size), their product far past the end of the file
    "dims-product-huge": (lambda d, L: _patch(_patch(d, L.tensor["blk.0.ffn_up.weight"]["dims"], Q, L.size),
                                              L.tensor["blk.0.ffn_up.weight"]["dims"] + 8, Q, L.size),
                          "past the end"),
    "type-unknown": (lambda d, L: _patch(d, L.tensor["blk.0.attn_q.weight"]["type"], I, 99), "unsupported ggml type"),
    "type-removed-q4_2": (lambda d, L: _patch(d, L.tensor["blk.0.attn_q.weight"]["type"], I, 4),
                          "unsupported ggml type"),
    "quant-row-not-block-multiple": (lambda d, L: _patch(d, L.tensor["blk.0.attn_q.weight"]["dims"], Q, 48),
                                     "block size"),
    "offset-past-end": (lambda d, L: _patch(d, L.tensor["blk.0.attn_q.weight"]["offset"], Q, 2**40), "past the end"),
    "offset-just-past-end": (lambda d, L: _patch(d, L.tensor["blk.0.attn_q.weight"]["offset"], Q,
                                                 -(-(L.size - L.data_offset) // 32) * 32), "past the end"),
    "offset-huge": (lambda d, L: _patch(d, L.tensor["blk.0.attn_q.weight"]["offset"], Q, 2**64 - 32),
                    "past the end"),
    "offset-misaligned": (lambda d, L: _patch(d, L.tensor["blk.0.attn_q.weight"]["offset"], Q, 3), "aligned"),
}


def _load_expect_error(path: Path, match: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError, match=match) as info:
            load_backend(path, RuntimeOptions(threads=1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value) or path.name in str(info.value), "the message should name the file"
    assert peak < 16 * 2**20, f"parsing a bad file allocated {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_raises_model_load_error(tiny: tuple[bytes, Layout], tmp_path: Path, case: str) -> None:
    data, layout = tiny
    make, match = BAD[case]
    bad = make(data, layout)
    assert bad != data
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(bad)
    _load_expect_error(path, match)


def test_tiny_valid_file_loads(tiny: tuple[bytes, Layout], tmp_path: Path) -> None:
    data, _ = tiny
    path = tmp_path / "ok.gguf"
    path.write_bytes(data)
    tensors = _tiny_tensors()
    with load_backend(path, RuntimeOptions(threads=1)) as b:
        assert b.architecture == "llama" and b.uint("block_count") == 1
        assert b.string("general.name") == "tiny test model"
        assert b.strings("tokenizer.ggml.tokens") == ["a", "b", "<s>"]
        assert b.bool("tokenizer.ggml.add_bos_token") is True
        for name, (arr, _raw) in tensors.items():
            t = b.get(name)
            assert t is not None
            assert np.array_equal(_bytes(t.numpy()), _bytes(arr)), name
        kept = b.get("blk.0.ffn_up.weight")
    assert b.get("blk.0.ffn_up.weight") is None  # closed: tensors are gone
    assert kept is not None
    with pytest.raises(GgmlError, match="closed"):
        kept.numpy()


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot open"):
        load_backend(tmp_path / "nope.gguf")


def test_directory_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        load_backend(tmp_path)


def test_missing_architecture(tmp_path: Path) -> None:
    path = tmp_path / "noarch.gguf"
    write_tiny(path, _tiny_tensors(), arch=None)
    _load_expect_error(path, "general.architecture")


# ---------------------------------------------------------------- CPU_REPACK placement


def _buft_name(t: Any) -> str:
    return ffi.string(lib.ggml_backend_buft_name(lib.ggml_backend_buffer_get_type(t._ptr.buffer))).decode()


def test_q4_weights_go_to_repack_buffer(tmp_path: Path) -> None:
    g = np.random.default_rng(8)
    w_q40 = g.standard_normal((16, 64)).astype(np.float32)     # ggml [64, 16]: 16 rows, a multiple of 8
    w_q4k = g.standard_normal((8, 256)).astype(np.float32)     # ggml [256, 8]
    w_odd = g.standard_normal((12, 64)).astype(np.float32)     # 12 rows: not repackable
    emb = g.standard_normal((16, 64)).astype(np.float32)       # a lookup table: stays readable
    q4k_bytes = np.empty((8, 144), np.uint8)
    lib.ggml_quantize_chunk(int(DType.Q4_K), ffi.from_buffer("float[]", w_q4k), ffi.from_buffer(q4k_bytes), 0, 8,
                            256, ffi.NULL)                     # gguf has no numpy Q4_K quantizer
    q40 = GGMLQuantizationType.Q4_0
    tensors = {
        "blk.0.attn_q.weight": (_q_bytes(w_q40, q40), q40),
        "blk.0.ffn_up.weight": (q4k_bytes, GGMLQuantizationType.Q4_K),
        "blk.0.attn_k.weight": (_q_bytes(w_odd, q40), q40),
        "token_embd.weight": (_q_bytes(emb, q40), q40),
    }
    path = tmp_path / "repack.gguf"
    write_tiny(path, tensors)
    with load_backend(path, RuntimeOptions(threads=1, fast_kernels=True)) as b:
        if b.runtime.repack_buft is None:
            pytest.skip("no CPU_REPACK buffer type (needs AVX2)")
        assert _buft_name(b.get("blk.0.attn_q.weight")) == "CPU_REPACK"
        assert _buft_name(b.get("blk.0.ffn_up.weight")) == "CPU_REPACK"
        assert _buft_name(b.get("blk.0.attn_k.weight")) == "CPU"
        assert _buft_name(b.get("token_embd.weight")) == "CPU"
        x = g.standard_normal((5, 64)).astype(np.float32)
        x4 = g.standard_normal((3, 256)).astype(np.float32)
        with b.new_context() as ctx:
            xt = ctx.from_numpy(x)
            outs = [b.get(n).matmul(ctx, xt) for n in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")]
            outs.append(b.get("blk.0.ffn_up.weight").matmul(ctx, ctx.from_numpy(x4)))
            rows = b.get("token_embd.weight").get_rows(ctx, ctx.from_numpy(np.array([3, 0], np.int32)))
            ctx.compute(*outs, rows)
            for out, (name, inp) in zip(outs, [("blk.0.attn_q.weight", x), ("blk.0.attn_k.weight", x),
                                               ("blk.0.ffn_up.weight", x4)]):
                raw, qt = tensors[name]
                ref = inp.astype(np.float64) @ dequantize(raw, qt).astype(np.float64).T
                err = float(np.mean((out.numpy() - ref) ** 2) / np.mean(ref ** 2))
                assert err < 5e-4, f"{name}: matmul nmse {err}"
            np.testing.assert_array_equal(rows.numpy(), dequantize(tensors["token_embd.weight"][0][[3, 0]], q40))
        # repacked data is not the file's layout and ggml cannot read it back: a clear error, not a crash
        with pytest.raises(GgmlError, match="repacked"):
            b.get("blk.0.attn_q.weight").numpy()
        assert np.array_equal(b.get("blk.0.attn_k.weight").numpy(), tensors["blk.0.attn_k.weight"][0])


def test_use_repack_false_keeps_weights_readable(tmp_path: Path) -> None:
    w = np.random.default_rng(9).standard_normal((16, 64)).astype(np.float32)
    raw = _q_bytes(w, GGMLQuantizationType.Q4_0)
    path = tmp_path / "norepack.gguf"
    write_tiny(path, {"blk.0.attn_q.weight": (raw, GGMLQuantizationType.Q4_0)})
    with load_backend(path, RuntimeOptions(threads=1, fast_kernels=True, use_repack=False)) as b:
        t = b.get("blk.0.attn_q.weight")
        assert _buft_name(t) == "CPU"
        assert np.array_equal(t.numpy(), raw)


def test_widen_holds_quantized_matmul_weights_in_a_wider_type(tmp_path: Path) -> None:
    """`widen` dequantizes 2-D mat-mul weights of the named types while loading (the values gguf's reference
    dequantizer gives, rounded to F16); lookup tables, 1-D tensors and other types keep their stored bytes."""
    g = np.random.default_rng(4)
    w8 = g.standard_normal((16, 64)).astype(np.float32)
    w4 = g.standard_normal((16, 64)).astype(np.float32)
    emb = g.standard_normal((8, 64)).astype(np.float32)
    q8, q4 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0
    tensors: dict[str, tuple[npt.NDArray[Any], GGMLQuantizationType | None]] = {
        "blk.0.attn_q.weight": (_q_bytes(w8, q8), q8),
        "blk.0.attn_k.weight": (_q_bytes(w4, q4), q4),
        "token_embd.weight": (_q_bytes(emb, q8), q8),
        "blk.0.attn_norm.weight": (np.ones(64, np.float32), None),
    }
    path = tmp_path / "widen.gguf"
    write_tiny(path, tensors)
    seen: list[str] = []

    def widen(arch: str) -> dict[DType, DType]:
        seen.append(arch)
        return {DType.Q8_0: DType.F16}

    with load_backend(path, RuntimeOptions(threads=1), widen=widen) as b:
        assert seen == [b.architecture]
        q = b.get("blk.0.attn_q.weight")
        assert q.dtype == DType.F16 and tuple(q.shape) == (64, 16)
        np.testing.assert_array_equal(q.numpy(), dequantize(tensors["blk.0.attn_q.weight"][0], q8).astype(np.float16))
        assert b.get("blk.0.attn_k.weight").dtype == DType.Q4_0  # not named
        assert b.get("token_embd.weight").dtype == DType.Q8_0  # a lookup table
        x = g.standard_normal((3, 64)).astype(np.float32)
        with b.new_context() as ctx:
            y = q.matmul(ctx, ctx.from_numpy(x))
            ctx.compute(y)
            ref = x.astype(np.float64) @ dequantize(tensors["blk.0.attn_q.weight"][0], q8).astype(np.float64).T
            assert np.max(np.abs(y.numpy() - ref)) < 2e-2 * np.max(np.abs(ref))
