"""Gemma 3 vision in Ollama's single-file layout: a tiny random-weight GGUF (text + `v.*` + `mm.*`) loads with every
tensor used and shapes checked, and its encoder output (tower + projector) matches the float64 reference in
vision_reference.py within the GeLU tolerance of the other tiny models; the reference is shown sensitive to each
feature the test relies on."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vision_reference as ref
from ggml import RuntimeOptions, load_backend
from ml.errors import ModelLoadError
from models import load_model
from models.vision.image import ImageSpec
from test_models_tiny import TOL_GELU, rel_err
from tiny_gguf import TinySpec, VisionSpec, gemma3_spec, make_vision_weights, write_gguf

VS = VisionSpec()
TEXT = gemma3_spec()


def write_vision_gguf(path: Path, vs: VisionSpec = VS, seed: int = 3, text: TinySpec = TEXT,
                      **edits: Any) -> dict[str, np.ndarray]:
    """A tiny gemma3 GGUF (the text model `text`) with a SigLIP tower and projector in Ollama's layout."""
    vision = make_vision_weights(vs, text.n_embd, seed)
    spec = text.with_(extra_kv={**vs.kv(), **edits.pop("kv", {})})
    return write_gguf(path, spec, add={**vision, **edits.pop("add", {})}, seed=seed, **edits)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, dict[str, np.ndarray]]]:
    path = tmp_path_factory.mktemp("vision") / "gemma3-vision.gguf"
    weights = write_vision_gguf(path)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        yield backend, load_model(backend, strict=True), weights
    finally:
        backend.close()


def _encode(backend: Any, model: Any, pixels: np.ndarray) -> np.ndarray:
    ctx = backend.new_context()
    try:
        out = model.encode_image(ctx, pixels)
        ctx.forward(out).compute(out)
        return np.array(out.numpy(), dtype=np.float64)  # numpy (tokens, n_text_embd)
    finally:
        ctx.close()


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (3, VS.image_size, VS.image_size)).astype(np.float32)


def test_file_loads_as_a_vision_model(loaded: tuple[Any, Any, dict[str, np.ndarray]]) -> None:
    _, model, _ = loaded
    v = model.vision
    assert v is not None
    assert (v.n_patches, v.pool_kernel, v.tokens_per_image, v.n_text_embd) == (16, 2, 4, TEXT.n_embd)
    assert model.image_spec() == ImageSpec(16, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_encoder_matches_reference(loaded: tuple[Any, Any, dict[str, np.ndarray]], seed: int) -> None:
    backend, model, w = loaded
    pixels = _pixels(seed)
    got = _encode(backend, model, pixels)
    want = ref.soft_tokens(VS, w, pixels)
    assert got.shape == want.shape == (VS.tokens_per_image, TEXT.n_embd)
    assert rel_err(got, want) < TOL_GELU
    for off in ("no_pos", "causal", "pool_transposed"):  # the comparison can tell each of these apart
        assert rel_err(got, ref.soft_tokens(VS, w, pixels, off)) > 20 * TOL_GELU, off


def test_a_different_image_gives_different_tokens(loaded: tuple[Any, Any, dict[str, np.ndarray]]) -> None:
    backend, model, _ = loaded
    assert rel_err(_encode(backend, model, _pixels(0)), _encode(backend, model, _pixels(1))) > 0.05


def test_text_only_gemma3_has_no_vision(tmp_path: Path) -> None:
    path = tmp_path / "text.gguf"
    write_gguf(path, TEXT)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        assert load_model(backend, strict=True).vision is None
    finally:
        backend.close()


@pytest.mark.parametrize("edit,message", [
    ({"add": {"v.position_embedding.weight": np.zeros((9, VS.n_embd), np.float32)}},
     r"v\.position_embedding\.weight has shape \[16, 9\], expected \[16, 16\]"),
    ({"add": {"mm.mm_input_projection.weight": np.zeros((TEXT.n_embd, VS.n_embd), np.float32)}},
     r"mm\.mm_input_projection\.weight has shape"),
    ({"kv": {"gemma3.mm_tokens_per_image": 5}}, "5 tokens per image do not tile"),
    ({"kv": {"gemma3.vision.patch_size": 5}}, "not a multiple of patch_size 5"),
])
def test_bad_vision_files_fail_to_load(tmp_path: Path, edit: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.gguf"
    write_vision_gguf(path, **edit)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        with pytest.raises(ModelLoadError, match=message):
            load_model(backend, strict=True)
    finally:
        backend.close()
