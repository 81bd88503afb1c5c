"""Hostile model files: hundreds of mutated GGUF headers and the hyper-parameter and tensor-type cases that used to
abort or hang the process inside ggml. Each file is loaded the way the runner loads it (weights, model, tokenizer,
the warm-up forward pass) in a worker subprocess with a memory limit; the only acceptable outcomes are a clean
load or a ModelLoadError, with no crash, no hang and bounded memory.
"""
from __future__ import annotations

import json
import math
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import pytest

from tiny_gguf import gemma3_spec, llama_spec, write_gguf

WORKER = Path(__file__).resolve().parent / "gguf_load_worker.py"
MEMORY_LIMIT = 4 << 30  # address space per worker: the 2^28-layer header used to take 2.2 GB before failing
N_HEADER_MUTATIONS = 320
T = gguf.GGMLQuantizationType


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def load_all(paths: list[Path], timeout: float) -> dict[str, dict[str, Any]]:
    """Results per path from one worker process. A crash or hang fails the test naming the file in progress."""
    proc = subprocess.run([sys.executable, str(WORKER)], input="\n".join(map(str, paths)) + "\n",
                          capture_output=True, text=True, timeout=timeout, preexec_fn=_limit_memory)
    results: dict[str, dict[str, Any]] = {}
    started = None
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        if rec.get("started"):
            started = rec["path"]
        else:
            results[rec["path"]] = rec
    if proc.returncode != 0:
        pytest.fail(f"worker died (status {proc.returncode}) on {started}: {proc.stderr[-2000:]}")
    assert len(results) == len(paths)
    return results


def _header_size(path: Path) -> int:
    reader = gguf.GGUFReader(path)
    return int(reader.data_offset)


def _mutate(data: bytearray, header: int, rng: random.Random) -> bytearray:
    out = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # a few random bytes anywhere in the header
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(header)] = rng.randrange(256)
    elif kind == 1:  # one 8-byte little-endian field set to an extreme value (counts, lengths, dims, offsets)
        pos = rng.randrange(8, header - 8)
        value = rng.choice([0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, rng.randrange(2**64)])
        out[pos:pos + 8] = value.to_bytes(8, "little")
    elif kind == 2:  # one 4-byte field (types, f32 values, u32 hyper-parameters)
        pos = rng.randrange(4, header - 4)
        value = rng.choice([0, 1, 7, 2**31 - 1, 2**32 - 1, 0x7FC00000, 0x7F800000, 0xFF800000, rng.randrange(2**32)])
        out[pos:pos + 4] = value.to_bytes(4, "little")
    else:  # truncated anywhere
        del out[rng.randrange(len(out)):]
    return out


def test_mutated_headers_load_or_fail_cleanly(tmp_path: Path) -> None:
    bases = [tmp_path / "llama.gguf", tmp_path / "gemma3.gguf"]
    write_gguf(bases[0], llama_spec())
    write_gguf(bases[1], gemma3_spec(n_layer=2))
    rng = random.Random(1234)
    paths = []
    for i in range(N_HEADER_MUTATIONS):
        base = bases[i % 2]
        data = bytearray(base.read_bytes())
        path = tmp_path / f"m{i:03d}.gguf"
        path.write_bytes(_mutate(data, _header_size(base), rng))
        paths.append(path)
    results = load_all(paths, timeout=300)
    outcomes = {r["result"] for r in results.values()}
    bad = {p: r for p, r in results.items() if r["result"] not in ("ok", "ModelLoadError")}
    assert not bad, bad
    assert outcomes == {"ok", "ModelLoadError"}  # both kinds happen: the mutations are neither all fatal nor inert


def _set_field(path: Path, key: str, value: float | int) -> None:
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    reader.data.flush()  # type: ignore[attr-defined]


def _targeted(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the text its ModelLoadError must contain)."""
    cases: dict[str, tuple[Path, str]] = {}
    base = tmp_path / "base.gguf"
    write_gguf(base, llama_spec())  # head_dim 8, 4 heads, 2 kv heads, 2 layers
    edits: list[tuple[str, str, float | int, str]] = [
        ("rope-dims-0", "llama.rope.dimension_count", 0, "rope.dimension_count"),
        ("rope-dims-odd", "llama.rope.dimension_count", 7, "rope.dimension_count"),
        ("rope-dims-over-head", "llama.rope.dimension_count", 16, "rope.dimension_count"),
        ("eps-nan", "llama.attention.layer_norm_rms_epsilon", math.nan, "layer_norm_rms_epsilon"),
        ("eps-negative", "llama.attention.layer_norm_rms_epsilon", -1e-5, "layer_norm_rms_epsilon"),
        ("eps-inf", "llama.attention.layer_norm_rms_epsilon", math.inf, "layer_norm_rms_epsilon"),
        ("rope-base-0", "llama.rope.freq_base", 0.0, "rope.freq_base"),
        ("rope-base-nan", "llama.rope.freq_base", math.nan, "rope.freq_base"),
        ("rope-base-negative", "llama.rope.freq_base", -10000.0, "rope.freq_base"),
        ("block-count-2^28", "llama.block_count", 1 << 28, "block_count"),
        ("block-count-over-tensors", "llama.block_count", 3, "block_count"),
        ("block-count-0", "llama.block_count", 0, "block_count"),
        ("heads-0", "llama.attention.head_count", 0, ""),
        ("kv-heads-not-dividing", "llama.attention.head_count_kv", 3, "head_count_kv"),
        ("kv-heads-0", "llama.attention.head_count_kv", 0, "head_count_kv"),
        ("width-0", "llama.embedding_length", 0, ""),
        ("context-huge", "llama.context_length", 2**31, "context_length"),
        ("ffn-0", "llama.feed_forward_length", 0, ""),
    ]
    for name, key, value, expect in edits:
        path = tmp_path / f"{name}.gguf"
        shutil.copy(base, path)
        _set_field(path, key, value)
        cases[name] = (path, expect)
    return cases


def test_targeted_hyper_parameters_fail_with_the_key_named(tmp_path: Path) -> None:
    cases = _targeted(tmp_path)
    results = load_all([p for p, _ in cases.values()], timeout=120)
    for name, (path, expect) in cases.items():
        rec = results[str(path)]
        assert rec["result"] == "ModelLoadError", (name, rec)
        assert expect in rec["message"], (name, rec["message"])


NORM_TYPES = [T.F16, T.BF16, T.Q8_0, T.Q4_0]


def test_norm_weights_of_any_type_are_held_as_f32(tmp_path: Path) -> None:
    """Norm weights stored as F16/BF16/Q8_0/Q4_0 used to abort in ggml's binary ops; they load and run now."""
    paths = []
    for qtype in NORM_TYPES:
        path = tmp_path / f"norm-{qtype.name}.gguf"
        write_gguf(path, llama_spec(n_embd=64, n_head=4, head_dim=16),
                   types={"blk.0.attn_norm.weight": qtype, "blk.1.ffn_norm.weight": qtype,
                          "output_norm.weight": qtype})
        paths.append(path)
    results = load_all(paths, timeout=120)
    assert all(r["result"] == "ok" for r in results.values()), results


@pytest.mark.parametrize("qtype", [T.I32, T.I16], ids=lambda t: t.name)
def test_weights_of_a_non_weight_type_are_refused(tmp_path: Path, qtype: T) -> None:
    """An F32 mat-mul weight relabelled as an integer type (same or fewer bytes: the file stays consistent)."""
    path = tmp_path / "bad.gguf"
    write_gguf(path, llama_spec())
    reader = gguf.GGUFReader(path, "r+")
    (tensor,) = [t for t in reader.tensors if t.name == "blk.0.attn_q.weight"]
    type_part = tensor.field.parts[-2]  # name length, name, n_dims, dims, type, offset
    assert int(type_part[0]) == int(T.F32)
    type_part[0] = int(qtype)
    reader.data.flush()  # type: ignore[attr-defined]
    rec = load_all([path], timeout=60)[str(path)]
    assert rec["result"] == "ModelLoadError" and "not a weight type" in rec["message"], rec
