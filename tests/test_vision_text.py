"""The text side of Gemma 3 vision against the float64 reference: the tiny model's logits for a prompt with two
images (soft tokens merged into the token embeddings, unscaled, each image's tokens seeing their whole image in
window and global layers alike) match test_models_tiny's reference forward, given either the model's own soft
tokens (the text part alone) or vision_reference's (tower, projector and text end to end). The reference is shown
sensitive to the bidirectional image mask and to the embeddings being left unscaled."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import test_vision_gemma3 as tv
import vision_reference as vref
from ml.dtype import DType
from models.vision.image import preprocess
from runner import images
from runner.cli import Loaded
from test_models_tiny import TOL_GELU, reference_logits, rel_err
from test_vision_engine import png, request
from tiny_gguf import gemma3_spec

SPEC = gemma3_spec(image_tokens=True)
PROMPT = "the a [img-0] the [img-1] a the"
IMAGES = {0: png(1), 1: png(2)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Loaded, dict[str, np.ndarray]]]:
    path = tmp_path_factory.mktemp("vision-text") / "gemma3-vision.gguf"
    weights = tv.write_vision_gguf(path, text=SPEC)
    m = Loaded(str(path), 1)
    yield m, weights
    m.backend.close()


def _model_logits(m: Loaded, tokens: list[int], rows: dict[int, images.ImageRow]) -> np.ndarray:
    """All rows' logits of the prompt in one forward pass."""
    n = len(tokens)
    cache = m.model.new_cache()
    cache.init(m.backend, DType.F32, 1, 128, 64)
    ctx = m.backend.new_context()
    try:
        b = images.batch(tokens, np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.arange(n, dtype=np.int32),
                         rows)
        out = m.model.forward(ctx, b, cache)
        ctx.forward(out).compute(out)
        return np.array(out.numpy(), dtype=np.float64).reshape(n, -1)
    finally:
        ctx.close()
        cache.close()


def _same_image(tokens: list[int], rows: dict[int, images.ImageRow]) -> np.ndarray:
    """(T, T): True where both rows belong to the same image (found from the inputs: runs of image rows, each run
    index 0..length-1)."""
    n = len(tokens)
    group = np.full(n, -1)
    image = -1
    for i, t in enumerate(tokens):
        if t < 0:
            image += rows[t].index == 0
            group[i] = image
    return np.asarray((group[:, None] == group[None, :]) & (group[:, None] >= 0))


@pytest.fixture(scope="module")
def prompt(tiny: tuple[Loaded, dict[str, np.ndarray]]) -> dict[str, Any]:
    m, _ = tiny
    tokens, rows = images.prompt_inputs(m.model, m.backend, m.tokenizer, request(PROMPT, IMAGES))
    return {"tokens": tokens, "rows": rows, "logits": _model_logits(m, tokens, rows),
            "visible": _same_image(tokens, rows)}


def _ref(tiny: tuple[Loaded, dict[str, np.ndarray]], prompt: dict[str, Any], embeds: dict[int, np.ndarray],
         **off: Any) -> np.ndarray:
    _, w = tiny
    visible = None if off.pop("no_image_mask", False) else prompt["visible"]
    return reference_logits(SPEC, w, prompt["tokens"], embeds=embeds, also_visible=visible, **off)


def _model_embeds(prompt: dict[str, Any]) -> dict[int, np.ndarray]:
    return {i: prompt["rows"][t].embedding.astype(np.float64) for i, t in enumerate(prompt["tokens"]) if t < 0}


def test_layout_two_images_longer_than_the_window(prompt: dict[str, Any]) -> None:
    tokens, visible = prompt["tokens"], prompt["visible"]
    n_image = sum(t < 0 for t in tokens)
    assert n_image == 2 * tv.VS.tokens_per_image and tv.VS.tokens_per_image > SPEC.window
    assert visible.sum() == 2 * tv.VS.tokens_per_image ** 2


def test_text_forward_over_image_embeddings_matches_reference(tiny: tuple[Loaded, dict[str, np.ndarray]],
                                                              prompt: dict[str, Any]) -> None:
    embeds = _model_embeds(prompt)
    want = _ref(tiny, prompt, embeds)
    assert rel_err(prompt["logits"], want) < TOL_GELU
    for off in ("no_image_mask", "scale_embeds"):  # the comparison can tell each of these apart
        assert rel_err(prompt["logits"], _ref(tiny, prompt, embeds, **{off: True})) > 20 * TOL_GELU, off


def test_end_to_end_matches_reference(tiny: tuple[Loaded, dict[str, np.ndarray]], prompt: dict[str, Any]) -> None:
    """Pixels -> tower -> projector -> text, all in the reference (the pipeline's pixels are the input)."""
    m, w = tiny
    soft = {k: vref.soft_tokens(tv.VS, w, preprocess(data, m.model.image_spec())) for k, data in IMAGES.items()}
    embeds: dict[int, np.ndarray] = {}
    image = -1
    for i, t in enumerate(prompt["tokens"]):
        if t < 0:
            row = prompt["rows"][t]
            image += row.index == 0
            embeds[i] = soft[image][row.index]
    assert rel_err(prompt["logits"], _ref(tiny, prompt, embeds)) < TOL_GELU
