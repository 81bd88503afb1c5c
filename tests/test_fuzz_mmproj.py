"""Hostile projector files (llama.cpp's split layout, `--mmproj`): mutated headers of a tiny Gemma 3 projector and
hyper-parameters that would size the tower or its pooling wrongly, each loaded beside the text model the way the
runner loads them, in test_fuzz_gguf's worker subprocess (memory-limited), and an image encoded when the load
succeeds. The only acceptable outcomes are a clean load (and encode) or a ModelLoadError."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

from test_fuzz_gguf import _header_size, _mutate, _set_field, load_all
from test_vision_mmproj import write_split

N_MUTATIONS = 120


def test_mutated_projector_headers_load_or_fail_cleanly(tmp_path: Path) -> None:
    text, proj = write_split(tmp_path)
    data, header = proj.read_bytes(), _header_size(proj)
    rng = random.Random(99)
    lines = []
    for i in range(N_MUTATIONS):
        path = tmp_path / f"p{i:03d}.gguf"
        path.write_bytes(_mutate(bytearray(data), header, rng))
        lines.append(f"{text}\t{path}")
    results = load_all(lines, timeout=300)  # type: ignore[arg-type]
    bad = {p: r for p, r in results.items() if r["result"] not in ("ok", "ModelLoadError")}
    assert not bad, bad
    assert {r["result"] for r in results.values()} == {"ok", "ModelLoadError"}


def test_targeted_projector_keys_fail_with_the_key_named(tmp_path: Path) -> None:
    text, proj = write_split(tmp_path)
    edits: list[tuple[str, str, int | float, str]] = [
        ("blocks-2^28", "clip.vision.block_count", 1 << 28, "required tensor missing; tried v.blk.2.layer_norm1"),
        ("blocks-0", "clip.vision.block_count", 0, "zero width, head count, depth"),
        ("heads-0", "clip.vision.attention.head_count", 0, "zero width, head count"),
        ("heads-not-dividing", "clip.vision.attention.head_count", 3, "not a multiple of head_count 3"),
        ("patch-0", "clip.vision.patch_size", 0, "depth or patch size"),
        ("patch-over-image", "clip.vision.patch_size", 32, "image_size 16 is not a multiple of patch_size 32"),
        ("image-huge", "clip.vision.image_size", 1 << 30, "v.position_embd.weight has shape [16, 16], expected"),
        ("scale-0", "clip.vision.projector.scale_factor", 0, "scale_factor 0 does not divide the 4 patches"),
        ("eps-nan", "clip.vision.attention.layer_norm_epsilon", float("nan"), "layer_norm_epsilon nan"),
        ("width-0", "clip.vision.embedding_length", 0, "zero width"),
        ("ff-huge", "clip.vision.feed_forward_length", 1 << 31, "v.blk.0.ffn_up.weight has shape [16, 40], expected"),
    ]
    lines, expect = [], {}
    for name, key, value, message in edits:
        path = tmp_path / f"{name}.gguf"
        shutil.copy(proj, path)
        _set_field(path, key, value)
        lines.append(f"{text}\t{path}")
        expect[lines[-1]] = (name, message)
    results = load_all(lines, timeout=120)  # type: ignore[arg-type]
    for line, (name, message) in expect.items():
        rec = results[line]
        assert rec["result"] == "ModelLoadError" and message in rec["message"], (name, rec)
