"""The shared image pipeline (models.vision.image): every format, EXIF rotation, alpha, resize / normalise math
against a float64 reference written here (Pillow's bilinear = a triangle filter stretched by the shrink factor),
hostile files, and the `[img-N]` markers."""
from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from models.vision.image import ImageError, ImageSpec, decode, preprocess, split_prompt, to_pixels


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _pattern(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _resize_ref(a: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """float64 separable bilinear with antialiasing: output pixel i samples centre (i + 0.5) * scale with a
    triangle of half-width max(scale, 1) (in input pixels), weights normalised over the pixels inside."""
    def matrix(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        support = max(scale, 1.0)
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            centre = (i + 0.5) * scale
            j = np.arange(n_in)
            w = np.clip(1.0 - np.abs((j + 0.5 - centre) / support), 0.0, None)
            m[i] = w / w.sum()
        return m
    my, mx = matrix(a.shape[0], out_h), matrix(a.shape[1], out_w)
    return np.einsum("yh,hwc,xw->yxc", my, a.astype(np.float64), mx)


def _normalise_ref(a: np.ndarray, spec: ImageSpec) -> np.ndarray:
    x = a.astype(np.float64) / 255.0
    return ((x - np.asarray(spec.mean)) / np.asarray(spec.std)).transpose(2, 0, 1)


SPEC = ImageSpec(6, 4, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))


@pytest.mark.parametrize("fmt,kw,exact", [("PNG", {}, True), ("BMP", {}, True), ("TIFF", {}, True),
                                          ("WEBP", {"lossless": True}, True), ("JPEG", {"quality": 100}, False)])
def test_formats_decode_to_the_pixels(fmt: str, kw: dict[str, object], exact: bool) -> None:
    a = _pattern(6, 4) if exact else np.full((4, 6, 3), (200, 30, 90), np.uint8)
    got = preprocess(_encode(Image.fromarray(a), fmt, **kw), SPEC)  # same size: no resampling
    assert got.shape == (3, 4, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, _normalise_ref(a, SPEC), atol=1e-5 if exact else 4 / 255 / 0.26)


def test_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    img = decode(buf.getvalue())
    assert img.mode == "RGB" and img.size == (6, 4)
    assert np.asarray(img)[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("orientation,k", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation: int, k: int) -> None:
    a = _pattern(5, 3, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = decode(_encode(Image.fromarray(a), "PNG", exif=exif.tobytes()))
    np.testing.assert_array_equal(np.asarray(img), np.rot90(a, k=k))  # numpy: k=-1 is a clockwise turn


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[..., 3] = [[0, 128, 255], [64, 192, 255]]
    img = Image.fromarray(rgba, "RGBA").convert(mode)
    got = np.asarray(decode(_encode(img, "PNG")), dtype=np.float64)
    src = np.asarray(img.convert("RGBA"), dtype=np.float64)
    alpha = src[..., 3:] / 255.0
    want = src[..., :3] * alpha + 255.0 * (1 - alpha)
    np.testing.assert_allclose(got, want, atol=1.0)


def test_palette_transparency_is_white() -> None:
    img = Image.new("P", (2, 2), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    got = np.asarray(decode(_encode(img, "GIF", transparency=0)))
    assert got[0, 0].tolist() == [255, 255, 255] and got[1, 1].tolist() == [255, 0, 0]


@pytest.mark.parametrize("size,out", [((13, 7), (5, 4)), ((3, 2), (7, 5)), ((1, 1), (4, 4)), ((4000, 1), (8, 8)),
                                      ((9, 9), (3, 3))])
def test_resize_matches_the_float64_reference(size: tuple[int, int], out: tuple[int, int]) -> None:
    a = _pattern(*size, seed=size[0])
    spec = ImageSpec(out[0], out[1])
    got = to_pixels(Image.fromarray(a), spec)
    want = _normalise_ref(_resize_ref(a, *out), spec)
    assert got.shape == (3, out[1], out[0])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_spec_from_metadata() -> None:
    spec = ImageSpec.read({"gemma3.vision.image_size": 896}, "gemma3.vision.")
    assert spec == ImageSpec(896, 896, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    clip = ImageSpec.read({"clip.vision.image_size": 8, "clip.vision.image_mean": [0.1, 0.2, 0.3],
                           "clip.vision.image_std": [1.0, 2.0, 4.0]}, "clip.vision.")
    assert clip.mean == pytest.approx((0.1, 0.2, 0.3)) and clip.std == (1.0, 2.0, 4.0)
    with pytest.raises(ValueError):
        ImageSpec.read({"v.image_size": 8, "v.image_std": [1.0, 0.0, 1.0]}, "v.")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels but carries a few bytes of data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def _truncated(fmt: str) -> bytes:
    data = _encode(Image.fromarray(_pattern(64, 64)), fmt)
    return data[:len(data) // 2]


@pytest.mark.parametrize("data,message", [
    (b"", "unknown or unsupported format"),
    (b"hello, this is text", "unknown or unsupported format"),
    (bytes(range(256)) * 4, "unknown or unsupported format"),
    (_truncated("PNG"), "failed to decode image"),
    (_truncated("JPEG"), "failed to decode image"),
    (_truncated("BMP"), "failed to decode image"),
    (_png_header_only(10000, 10000), "too large: 10000x10000 pixels"),  # over our budget, under Pillow's
    (_png_header_only(100000, 100000), "too large"),  # over Pillow's own hard limit too
    (_png_header_only(64, 64), "failed to decode image"),  # plausible size, missing data
])
def test_broken_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode(data)


def test_bomb_is_refused_before_pixels_are_allocated() -> None:
    bomb = _png_header_only(20000, 20000)  # 400 M pixels: 1.2 GB if decoded
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(ImageError, match="too large"):
            decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20 and time.monotonic() - t0 < 5.0
    small = _encode(Image.fromarray(_pattern(100, 100)), "PNG")
    with pytest.raises(ImageError, match="100x100 pixels is over the limit of 5000"):
        decode(small, pixel_budget=5000)
    assert decode(small, pixel_budget=10000).size == (100, 100)


@pytest.mark.parametrize("prompt,ids,parts", [
    ("no images", [], ["no images"]),
    ("[img-0]describe", [0], [0, "describe"]),
    ("a [img-1] b [img-0]", [0, 1], ["a ", 1, " b ", 0]),
    ("[img-2][img-2]", [2], [2, 2]),
    ("[img-x] [img-] [IMG-1]", [], ["[img-x] [img-] [IMG-1]"]),
])
def test_split_prompt(prompt: str, ids: list[int], parts: list[str | int]) -> None:
    assert split_prompt(prompt, ids) == parts


@pytest.mark.parametrize("prompt,ids,n", [("[img-3]", [0, 1], 3), ("x [img-0] [img-10]", [0, 1], 10),
                                          ("[img-0]", [], 0)])
def test_unknown_marker_is_an_error(prompt: str, ids: list[int], n: int) -> None:
    with pytest.raises(ImageError, match=f"^invalid image index: {n}$"):
        split_prompt(prompt, ids)
