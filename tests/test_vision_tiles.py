"""Tiled preprocessing (Llama 3.2 Vision) against values worked out by hand from Hugging Face's
MllamaImageProcessor rules: the arrangement list and its ids, the canvas choice (least upscaling, else least
downscaling, ties to the smallest canvas), the fitted size, black padding, normalisation and row-major tiles."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.vision.mllama_vision import CLIP_MEAN, CLIP_STD
from models.vision.tiles import TileSpec, aspect_ratios, best_canvas, fit_to_canvas, tile_image

SPEC = TileSpec(8, 4, CLIP_MEAN, CLIP_STD)


def test_arrangements_and_ids() -> None:
    assert aspect_ratios(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    assert aspect_ratios(1) == ((1, 1),)
    assert aspect_ratios(2) == ((1, 1), (1, 2), (2, 1))


@pytest.mark.parametrize("h,w,canvas", [
    (560, 560, (1, 1)),  # exactly one tile: scale 1 is an upscale option (>= 1), the smallest canvas wins
    (100, 100, (1, 1)),  # every canvas upscales by 5.6: the smallest
    (560, 1120, (1, 2)),  # two tiles wide (high, wide)
    (1120, 560, (2, 1)),
    (300, 1000, (1, 2)),  # upscales: 1x2 by 1.12, 1x3/1x4/2x2 by 1.68 / 1.87 / 1.12 -> 1.12, smallest area
    (2000, 2000, (2, 2)),  # only downscales: 2x2 by 0.56 is the least
    (4000, 500, (4, 1)),
    (700, 3000, (1, 4)),
])
def test_canvas(h: int, w: int, canvas: tuple[int, int]) -> None:
    assert best_canvas(h, w, 560, 4) == canvas


@pytest.mark.parametrize("h,w,canvas,size", [
    (100, 100, (560, 560), (560, 560)),  # clipped up to the tile, aspect kept
    (300, 1000, (560, 1120), (300, 1000)),  # each side is clipped into [tile, canvas]: the width stays, so no resize
    (2000, 2000, (1120, 1120), (1120, 1120)),
    (4000, 500, (2240, 560), (2240, 280)),  # scale 0.56 by height: width floor(500 * 0.56) = 280
])
def test_fit(h: int, w: int, canvas: tuple[int, int], size: tuple[int, int]) -> None:
    assert fit_to_canvas(h, w, canvas[0], canvas[1], 560) == size


def _normalised(rgb: np.ndarray) -> np.ndarray:
    return (rgb.astype(np.float64) / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)


def test_two_tiles_without_resizing() -> None:
    """An 8 x 16 image (high x wide) is exactly a 1x2 canvas: no resize, id 2, left tile then right tile."""
    rgb = np.random.default_rng(0).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    tiled = tile_image(Image.fromarray(rgb), SPEC)
    assert tiled.ratio_id == 2 and tiled.pixels.shape == (2, 3, 8, 8)
    want = _normalised(rgb).transpose(2, 0, 1)  # (3, 8, 16)
    np.testing.assert_allclose(tiled.pixels[0], want[:, :, :8], atol=1e-5)
    np.testing.assert_allclose(tiled.pixels[1], want[:, :, 8:], atol=1e-5)


def test_padding_is_black_after_normalisation() -> None:
    """A 4 x 12 image (high x wide) goes on a 1x2 canvas (8 x 16) unresized (its width is within [8, 16], which
    keeps the scale at 1): the rest of the canvas is normalised black."""
    tall = tile_image(Image.new("RGB", (12, 4), (255, 255, 255)), SPEC)  # width 12, height 4
    assert tall.ratio_id == 2  # 1x2: scale min(8/4, 16/12) = 1.33, the least upscale
    # fitted: target (8, 12) -> scale_h 2 > scale_w 1 -> width 12, height floor(4 * 1) = 4
    black = (0.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    white = (1.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    np.testing.assert_allclose(tall.pixels[0][:, :4, :], np.broadcast_to(white[:, None, None], (3, 4, 8)), atol=1e-5)
    np.testing.assert_allclose(tall.pixels[0][:, 4:, :], np.broadcast_to(black[:, None, None], (3, 4, 8)), atol=1e-5)
    np.testing.assert_allclose(tall.pixels[1][:, :4, :4], np.broadcast_to(white[:, None, None], (3, 4, 4)),
                               atol=1e-5)
    np.testing.assert_allclose(tall.pixels[1][:, :, 4:], np.broadcast_to(black[:, None, None], (3, 8, 4)), atol=1e-5)


def test_tiles_are_row_major() -> None:
    """A 16 x 16 image in four solid quadrants becomes a 2x2 arrangement (id 6): top-left, top-right,
    bottom-left, bottom-right."""
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for i, c in enumerate(colours):
        r, col = divmod(i, 2)
        rgb[r * 8:(r + 1) * 8, col * 8:(col + 1) * 8] = c
    tiled = tile_image(Image.fromarray(rgb), SPEC)
    assert tiled.ratio_id == 6 and tiled.n_tiles == 4
    for i, c in enumerate(colours):
        want = _normalised(np.asarray(c, dtype=np.uint8))
        np.testing.assert_allclose(tiled.pixels[i].mean(axis=(1, 2)), want, atol=1e-5)
