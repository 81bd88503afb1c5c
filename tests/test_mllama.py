"""mllama (Llama 3.2 Vision) against the float64 reference in mllama_reference.py, on a tiny random-weight GGUF in
Ollama's layout: the layer list whose kind differs by index loads with every tensor used and shapes checked; text
without an image, the vision tower + projector, and text with cross-attention to an image match the reference
(each feature the match relies on is shown to matter); the image's keys and values are computed once, by the
forward that reaches the image, and read from the encoder cache afterwards; rows before the image do not see it,
so how a prompt is batched does not change its logits."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mllama_reference as ref
from ggml import RuntimeOptions, load_backend
from kvcache.causal import CausalCache
from kvcache.encoder import EncoderCache
from kvcache.wrapper import WrapperCache
from ml.batch import Batch, MultimodalInput
from ml.dtype import DType
from ml.errors import ModelLoadError
from models import load_model
from models.mllama import CrossBlock
from models.decoder import Block
from models.vision.tiles import TiledImage
from mllama_tiny import CROSS, IMAGE_TOKEN, N_TEXT_VOCAB, TEXT, VS, write_mllama
from test_models_tiny import TOL, TOL_GELU, model_logits as logits, rel_err

PROMPT = [5, 17, IMAGE_TOKEN, 42, 8, 29, 11, 3]
IMAGE_AT = 2


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, dict[str, np.ndarray]]]:
    path = tmp_path_factory.mktemp("mllama") / "mllama.gguf"
    weights = write_mllama(path)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        yield backend, load_model(backend, strict=True), weights
    finally:
        backend.close()


def image(seed: int, n_tiles: int = 2, ratio_id: int = 2) -> TiledImage:
    pixels = np.random.default_rng(seed).uniform(-1.5, 1.5, (n_tiles, 3, VS.image_size, VS.image_size))
    return TiledImage(pixels.astype(np.float32), ratio_id)


def new_cache(backend: Any, model: Any) -> Any:
    cache = model.new_cache()
    cache.init(backend, DType.F32, 1, 64, 32)
    return cache


def with_image(tokens: list[int], start: int, img: TiledImage | None, at: int = IMAGE_AT) -> Batch:
    b = Batch.single(tokens, start, all_logits=True)
    return b if img is None else dataclasses.replace(b, multimodal=(MultimodalInput(at - start, img),))


def encode(backend: Any, model: Any, img: TiledImage) -> np.ndarray:
    ctx = backend.new_context()
    try:
        out = model.encode_image(ctx, img)
        ctx.forward(out).compute(out)
        return np.array(out.numpy(), dtype=np.float64)
    finally:
        ctx.close()


def reference_states(w: dict[str, np.ndarray], img: TiledImage, *off: str) -> np.ndarray:
    return ref.project(w, ref.tower(VS, w, img.pixels, img.ratio_id, *off))


def test_layers_differ_by_index_and_the_cache_routes_them(loaded: tuple[Any, Any, dict[str, np.ndarray]]) -> None:
    backend, model, _ = loaded
    kinds = [type(b) for b in model.blk]
    assert kinds == [CrossBlock if il in CROSS else Block for il in range(TEXT.n_layer)]
    assert (model.params.n_vocab, model.params.n_vocab_embd, model.image_token) == (N_TEXT_VOCAB, 64, IMAGE_TOKEN)
    assert model.vision is not None and len(model.v.global_blk) == VS.n_global_layer
    cache = model.new_cache()
    assert isinstance(cache, WrapperCache)
    causal, encoder = cache.caches
    assert isinstance(causal, CausalCache) and isinstance(encoder, EncoderCache)
    assert [cache.route(il) for il in range(TEXT.n_layer)] == [1 if il in CROSS else 0 for il in range(4)]


def test_text_without_an_image_matches_reference(loaded: tuple[Any, Any, dict[str, np.ndarray]]) -> None:
    backend, model, w = loaded
    tokens = [5, 17, 3, 42, 8, 29, 11]
    got = logits(backend, model, Batch.single(tokens, all_logits=True), new_cache(backend, model))
    want = ref.text_logits(TEXT, w, tokens)
    assert got.shape == want.shape == (len(tokens), N_TEXT_VOCAB)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("n_tiles,ratio_id", [(1, 1), (2, 2), (4, 6), (3, 7)])
def test_tower_and_projector_match_reference(loaded: tuple[Any, Any, dict[str, np.ndarray]], n_tiles: int,
                                             ratio_id: int) -> None:
    backend, model, w = loaded
    img = image(n_tiles, n_tiles, ratio_id)
    got = encode(backend, model, img)
    want = reference_states(w, img)
    assert got.shape == want.shape == (n_tiles * VS.n_positions, TEXT.n_embd)
    assert rel_err(got, want) < TOL_GELU
    for off in ("no_pre_tile", "no_tile_position", "no_padding", "no_gates", "concat_layers"):  # the comparison can tell each of these apart
        assert rel_err(got, reference_states(w, img, off)) > 20 * TOL_GELU, off


def test_padded_tiles_are_computed_but_not_kept(loaded: tuple[Any, Any, dict[str, np.ndarray]]) -> None:
    """The zero tiles take part in the tower's attention (changing the own tiles' states), and leave it."""
    backend, model, w = loaded
    img = image(5, 2, 2)
    got = encode(backend, model, img)
    assert got.shape[0] == 2 * VS.n_positions
    alone = ref.project(w, ref.tower(dataclasses.replace(VS, max_tiles=2), _two_tile_weights(w), img.pixels, 2))
    assert rel_err(got, alone) > 20 * TOL_GELU


def _two_tile_weights(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights restricted to the first two tile slots (a tower that never sees the padded tiles)."""
    out = dict(w)
    d, n = VS.n_embd, VS.n_positions
    for name in ("pre_tile_position_embd", "post_tile_position_embd"):
        out[f"v.{name}.weight"] = w[f"v.{name}.weight"][:, :2 * d]
    out["v.tile_position_embd.weight"] = w["v.tile_position_embd.weight"][:, :2 * n * d]
    return out


def test_cross_attention_matches_reference(loaded: tuple[Any, Any, dict[str, np.ndarray]]) -> None:
    backend, model, w = loaded
    img = image(1)
    got = logits(backend, model, with_image(PROMPT, 0, img), new_cache(backend, model))
    states = reference_states(w, img)
    want = ref.text_logits(TEXT, w, PROMPT, states, IMAGE_AT)
    assert rel_err(got, want) < TOL_GELU
    assert rel_err(got, ref.text_logits(TEXT, w, PROMPT)) > 0.1  # the image matters
    for off in ("no_qk_norm", "all_rows", "no_tanh"):
        assert rel_err(got, ref.text_logits(TEXT, w, PROMPT, states, IMAGE_AT, off)) > 20 * TOL_GELU, off
    # rows before the image are the text-only rows, bit for bit in the reference's terms
    assert rel_err(got[:IMAGE_AT], ref.text_logits(TEXT, w, PROMPT[:IMAGE_AT])) < TOL


def test_the_image_is_encoded_once_and_read_from_the_encoder_cache(
        loaded: tuple[Any, Any, dict[str, np.ndarray]]) -> None:
    backend, model, w = loaded
    img = image(2, 4, 6)
    cache = new_cache(backend, model)
    runs = model.images_encoded
    logits(backend, model, with_image(PROMPT, 0, img), cache)
    assert model.images_encoded == runs + 1
    steps = []
    tokens = list(PROMPT)
    for t in (9, 14, 21):
        steps.append(logits(backend, model, Batch.single([t], len(tokens)), cache)[-1])
        tokens.append(t)
    assert model.images_encoded == runs + 1  # decode steps read the cached keys and values
    want = ref.text_logits(TEXT, w, tokens, reference_states(w, img), IMAGE_AT)
    assert rel_err(np.stack(steps), want[-3:]) < TOL_GELU
    # once the image's position is removed, the layers are skipped again: text-only results
    cache.remove(0, IMAGE_AT, None)
    got = logits(backend, model, Batch.single([42, 8], IMAGE_AT, all_logits=True), cache)
    assert rel_err(got, ref.text_logits(TEXT, w, PROMPT[:IMAGE_AT] + [42, 8])[IMAGE_AT:]) < TOL
    assert model.images_encoded == runs + 1


@pytest.mark.parametrize("flash", [False, True], ids=["f16-cache", "f16-cache-flash"])
def test_f16_cache_and_flash_attention(loaded: tuple[Any, Any, dict[str, np.ndarray]], flash: bool) -> None:
    """The runner's default F16 K/V (and ggml's fused attention, which the cross-attention layers use too): f16
    rounding of keys and values, hence the looser bound of the other tiny models' F16 test."""
    backend, model, w = loaded
    img = image(6, 3, 7)
    try:
        cache = model.new_cache(flash=flash)
        cache.init(backend, DType.F16, 1, 64, 32)
        got = logits(backend, model, with_image(PROMPT, 0, img), cache)
        step = logits(backend, model, Batch.single([9], len(PROMPT)), cache)
    finally:
        model.new_cache()  # the model's attention path back to the unfused default
    want = ref.text_logits(TEXT, w, PROMPT + [9], reference_states(w, img), IMAGE_AT)
    assert rel_err(np.concatenate([got, step]), want) < 5e-3


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_batching_does_not_change_the_logits(loaded: tuple[Any, Any, dict[str, np.ndarray]], split: int) -> None:
    """The prompt in two forwards (the image in the first or the second) gives the logits of one forward (to the
    last bits the tiny f32 model's matmuls change with the batch's row count, text-only too: ~1e-6), and the rows
    before the image are those of the prompt without it, bit for bit. (Ollama lets every row of the image's batch
    see it: rows 0..1 would move by far more than the bound.)"""
    backend, model, w = loaded
    img = image(3)
    whole = logits(backend, model, with_image(PROMPT, 0, img), new_cache(backend, model))
    cache = new_cache(backend, model)
    first = logits(backend, model, with_image(PROMPT[:split], 0, img if split > IMAGE_AT else None), cache)
    second = logits(backend, model, with_image(PROMPT[split:], split, img if split <= IMAGE_AT else None), cache)
    assert rel_err(np.concatenate([first, second]), whole) < TOL / 10
    text_only = logits(backend, model, Batch.single(PROMPT, all_logits=True), new_cache(backend, model))
    np.testing.assert_array_equal(whole[:IMAGE_AT], text_only[:IMAGE_AT])
    seen_by_all = ref.text_logits(TEXT, w, PROMPT, reference_states(w, img), IMAGE_AT, "all_rows")
    assert rel_err(whole[:IMAGE_AT], seen_by_all[:IMAGE_AT]) > 100 * TOL


def test_a_shift_moves_the_image_position(loaded: tuple[Any, Any, dict[str, np.ndarray]]) -> None:
    """Discarding rows before the image keeps it cached at its new position: rows after it still see it."""
    backend, model, w = loaded
    img = image(4)
    cache = new_cache(backend, model)
    logits(backend, model, with_image(PROMPT, 0, img), cache)
    cache.remove(0, 0, 1)  # drop the first token: the image now sits at position 1
    encoder = cache.caches[1]
    assert encoder.encoder_cached and encoder.encoder_pos == IMAGE_AT - 1


def test_a_text_only_file_loads_without_vision(tmp_path: Path) -> None:
    path = tmp_path / "text.gguf"
    w = write_mllama(path, vision=False)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        model = load_model(backend, strict=True)
        assert model.vision is None
        tokens = [5, 17, 3, 42]
        got = logits(backend, model, Batch.single(tokens, all_logits=True), new_cache(backend, model))
        assert rel_err(got, ref.text_logits(TEXT, w, tokens)) < TOL
    finally:
        backend.close()


@pytest.mark.parametrize("edit,message", [
    ({"add": {"blk.1.cross_attn_k_norm.weight": np.ones(5, np.float32)}},
     r"blk\.1\.cross_attn_k_norm\.weight has shape \[5\], expected \[8\]"),
    ({"drop": ("blk.3.cross_attn_mlp_gate",)}, r"blk\.3\.cross_attn_mlp_gate"),
    ({"kv": {"mllama.attention.cross_attention_layers": [1, 9]}}, r"outside 0\.\.3"),
    ({"add": {"v.tile_position_embd.weight": np.zeros((9, 4 * 4 * 16), np.float32)}},
     r"v\.tile_position_embd\.weight has shape"),
    ({"add": {"mm.0.weight": np.zeros((32, 32), np.float32)}}, r"mm\.0\.weight has shape"),
    ({"kv": {"mllama.vision.intermediate_layers_indices": [0, 7]}}, "intermediate_layers_indices"),
])
def test_bad_files_fail_to_load(tmp_path: Path, edit: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.gguf"
    write_mllama(path, **edit)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        with pytest.raises(ModelLoadError, match=message):
            load_model(backend, strict=True)
    finally:
        backend.close()


def test_a_quantized_cache(tmp_path: Path) -> None:
    """--cache-type q8_0 (with flash attention): the cross-attention keys and values are stored as Q8_0 too; the
    error is that of the text-only model's Q8_0 cache (heads of 32, a multiple of the Q8_0 block)."""
    import mllama_tiny as mt
    from tiny_gguf import write_gguf
    spec = TEXT.with_(head_dim=32, n_embd=128)
    tensors = mt.make_text_weights(spec, 0)
    tensors.update(mt.make_vision_weights(VS, spec.n_embd, 1))
    kv = {"mllama.attention.cross_attention_layers": list(CROSS), "mllama.vocab_size": N_TEXT_VOCAB, **VS.kv()}
    path = tmp_path / "mllama-32.gguf"
    w = write_gguf(path, spec.with_(extra_kv=kv, write_vocab_size=False), tensors)
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        model = load_model(backend, strict=True)
        img = image(7, 3, 7)
        cache = model.new_cache(flash=True)
        cache.init(backend, DType.Q8_0, 1, 64, 32)
        got = logits(backend, model, with_image(PROMPT, 0, img), cache)
        step = logits(backend, model, Batch.single([9], len(PROMPT)), cache)
        want = ref.text_logits(spec, w, PROMPT + [9], reference_states(w, img), IMAGE_AT)
        assert rel_err(np.concatenate([got, step]), want) < 3e-2
        assert rel_err(np.concatenate([got, step]), ref.text_logits(spec, w, PROMPT + [9])) > 0.1
    finally:
        backend.close()
