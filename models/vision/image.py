"""The image pipeline every vision model shares: raw file bytes -> decoded RGB -> resized, rescaled, normalised
float32 pixels [C, H, W] (planar, row-major: a ggml tensor [W, H, C]), plus the `[img-N]` prompt markers.

Hostile input fails its own request with an ImageError and touches nothing else: the format, the size and the
pixel budget are checked from the header (Pillow's `Image.open` is lazy) before any pixel is decoded, and no
Pillow global (MAX_IMAGE_PIXELS, LOAD_TRUNCATED_IMAGES) is read for that or changed.
"""
from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

# What the Go server passes on (runner-protocol.md, "Images") plus GIF, whose first frame is used.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# 48 megapixels (8000 x 6000 camera pictures fit): decoded RGBA that is ~200 MB, the most one request may cost.
PIXEL_BUDGET = 48_000_000
MARKER = re.compile(r"\[img-(\d+)\]")


class ImageError(ValueError):
    """An image that cannot be used; the message says why, for that request's error."""


@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its pixels: output size, rescale factor and per-channel mean / std (values are
    `(pixel * rescale - mean) / std`)."""

    width: int
    height: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale: float = 1.0 / 255.0

    @staticmethod
    def read(metadata: Mapping[str, Any], prefix: str, *, default_mean: Sequence[float] = (0.5, 0.5, 0.5),
             default_std: Sequence[float] = (0.5, 0.5, 0.5)) -> ImageSpec:
        """From GGUF keys `<prefix>image_size`, `<prefix>image_mean`, `<prefix>image_std` (llama.cpp's clip
        writes the last two; Ollama's gemma3 files have none and use the model's defaults)."""
        size = int(metadata[prefix + "image_size"])
        mean = tuple(float(v) for v in np.asarray(metadata.get(prefix + "image_mean", default_mean)).reshape(-1))
        std = tuple(float(v) for v in np.asarray(metadata.get(prefix + "image_std", default_std)).reshape(-1))
        if size <= 0 or len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"invalid image settings: size {size}, mean {mean}, std {std}")
        return ImageSpec(size, size, (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))


def decode(data: bytes, pixel_budget: int = PIXEL_BUDGET) -> Image.Image:
    """Decode an image file into an RGB image, upright (EXIF orientation applied), transparency composited on
    white; a GIF gives its first frame.

    Raises:
        ImageError: not an image of a known format, truncated or corrupt, or over `pixel_budget` pixels.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) above its own global limit; our budget decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                width, height = img.size  # from the header: nothing decoded yet
                if width <= 0 or height <= 0:
                    raise ImageError(f"image has no pixels ({width}x{height})")
                if width * height > pixel_budget:
                    raise ImageError(f"image is too large: {width}x{height} pixels is over the limit of "
                                     f"{pixel_budget}")
                img.load()
                upright = ImageOps.exif_transpose(img)
                return _to_rgb(upright)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own hard limit (twice its global) hit in open()
        raise ImageError(f"image is too large: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("failed to decode image: unknown or unsupported format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # truncated data, corrupt chunks, bad headers: Pillow's errors are all of these kinds
        raise ImageError(f"failed to decode image: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_pixels(img: Image.Image, spec: ImageSpec) -> npt.NDArray[np.float32]:
    """Resize (bilinear, antialiased when shrinking, as Hugging Face's processors via Pillow) to the spec's size
    and normalise: float32 [3, height, width]. Resampling runs on float channels, so no 8-bit rounding is added."""
    channels = []
    for band in img.convert("RGB").split():
        f = band.convert("F")
        if f.size != (spec.width, spec.height):
            f = f.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        channels.append(np.asarray(f, dtype=np.float32))
    pixels = np.stack(channels).astype(np.float64) * spec.rescale
    mean = np.asarray(spec.mean, dtype=np.float64).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float64).reshape(3, 1, 1)
    return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)


def preprocess(data: bytes, spec: ImageSpec, pixel_budget: int = PIXEL_BUDGET) -> npt.NDArray[np.float32]:
    """decode + to_pixels."""
    return to_pixels(decode(data, pixel_budget), spec)


def split_prompt(prompt: str, image_ids: Sequence[int]) -> list[str | int]:
    """Split a prompt on its `[img-N]` markers: text pieces and image ids, in order (empty text dropped).

    Raises:
        ImageError: a marker names no image of the request (`invalid image index: N`, as the Go runner says).
    """
    known = set(image_ids)
    parts: list[str | int] = []
    pos = 0
    for m in MARKER.finditer(prompt):
        n = int(m.group(1))
        if n not in known:
            raise ImageError(f"invalid image index: {n}")
        if m.start() > pos:
            parts.append(prompt[pos:m.start()])
        parts.append(n)
        pos = m.end()
    if pos < len(prompt):
        parts.append(prompt[pos:])
    return parts
