"""Tiled image preprocessing (Llama 3.2 Vision; Hugging Face MllamaImageProcessor): pick the tile arrangement
(canvas) that needs the least upscaling (or, when every one shrinks, the least downscaling; ties go to the
smallest canvas), resize the image to fit it keeping the aspect ratio, pad bottom and right with black, normalise,
and cut it into tiles in row-major order. The arrangement's aspect-ratio id indexes the model's tile embeddings.

Arrangements are (tiles high, tiles wide) pairs listed with the first number outer, ids counting from 1 (0 is
the padding id): for 4 tiles (1,1)=1, (1,2)=2, (1,3)=3, (1,4)=4, (2,1)=5, (2,2)=6, (3,1)=7, (4,1)=8 — Hugging
Face's numbering, which the model was trained with. (Ollama's Go processor reads the pairs as (wide, high), so for
an image wider than tall its id is that of the transposed arrangement.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from PIL import Image

from models.vision.image import ImageSpec, to_pixels


@dataclass(frozen=True)
class TileSpec:
    tile_size: int
    max_tiles: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class TiledImage:
    """An image cut into tiles: float32 (n_tiles, 3, S, S), and its arrangement's aspect-ratio id."""

    pixels: npt.NDArray[np.float32]
    ratio_id: int

    @property
    def n_tiles(self) -> int:
        return int(self.pixels.shape[0])


@lru_cache(maxsize=16)
def aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (tiles high, tiles wide) arrangement of at most max_tiles tiles; id = index + 1."""
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def best_canvas(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(tiles high, tiles wide) of the canvas the image is fitted to."""
    options = aspect_ratios(max_tiles)
    scales = [min(h * tile / height, w * tile / width) for h, w in options]
    up = [s for s in scales if s >= 1.0]
    chosen = min(up) if up else max(scales)
    fits = [o for o, s in zip(options, scales) if s == chosen]
    return min(fits, key=lambda o: o[0] * o[1])  # the first of the smallest


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """(height, width) of the resized image: each side clipped into [tile, canvas side], the aspect kept by the
    side that shrinks most."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(max(math.floor(height * scale_w), 1), target_h), target_w
    return target_h, min(max(math.floor(width * scale_h), 1), target_w)


def tile_image(img: Image.Image, spec: TileSpec) -> TiledImage:
    """Resize (bilinear, as models.vision.image), pad, normalise and tile an RGB image."""
    width, height = img.size
    rows, cols = best_canvas(height, width, spec.tile_size, spec.max_tiles)
    s = spec.tile_size
    new_h, new_w = fit_to_canvas(height, width, rows * s, cols * s, s)
    resized = to_pixels(img, ImageSpec(new_w, new_h, spec.mean, spec.std))  # (3, new_h, new_w)
    black = (0.0 - np.asarray(spec.mean, dtype=np.float64)) / np.asarray(spec.std, dtype=np.float64)
    canvas = np.empty((3, rows * s, cols * s), dtype=np.float32)
    canvas[:] = black.astype(np.float32).reshape(3, 1, 1)
    canvas[:, :new_h, :new_w] = resized
    tiles = canvas.reshape(3, rows, s, cols, s).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
    return TiledImage(np.ascontiguousarray(tiles), aspect_ratios(spec.max_tiles).index((rows, cols)) + 1)
