"""Images in llama-server requests, turned into the engine's form (a prompt with `[img-N]` markers plus the images'
bytes): `/completion`'s prompt object {"prompt_string": ..., "multimodal_data": [base64, ...]} with one
`<__media__>` marker (llama.cpp's default media marker) per item, and OpenAI chat `image_url` content parts
(base64 `data:` URLs), each of which becomes a marker where it stands in the message."""
from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from runner.errors import RequestError
from runner.protocol import ImageData

MEDIA_MARKER = "<__media__>"


def media_bytes(item: object, where: str) -> bytes:
    """One image: base64 text, bare or as a `data:<type>;base64,` URL. Raises RequestError."""
    if not isinstance(item, str):
        raise RequestError(f"{where} must be a base64 string")
    data = item
    if item.startswith("data:"):
        header, sep, data = item.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(f"{where}: only base64 data: URLs are supported")
    elif item.startswith(("http://", "https://", "file:")):
        raise RequestError(f"{where}: images must be sent inline (base64 or a data: URL), not fetched from a URL")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where} is not valid base64") from None
    if not raw:
        raise RequestError(f"{where} is empty")
    return raw


def with_markers(text: str, n_images: int) -> str:
    """`text` with its media markers replaced, in order, by `[img-0]`, `[img-1]`, ... Raises RequestError when the
    counts differ (as llama-server's tokenizer of multimodal prompts does)."""
    parts = text.split(MEDIA_MARKER)
    if len(parts) - 1 != n_images:
        raise RequestError(f"the prompt has {len(parts) - 1} {MEDIA_MARKER} markers for {n_images} images")
    return parts[0] + "".join(f"[img-{i}]{p}" for i, p in enumerate(parts[1:]))


def images(data: Sequence[bytes]) -> tuple[ImageData, ...]:
    return tuple(ImageData(i, d) for i, d in enumerate(data))


def split_multimodal_prompt(value: object) -> tuple[str, tuple[ImageData, ...]] | None:
    """`/completion`'s prompt when it is a multimodal object: the prompt text with `[img-N]` markers and the images;
    None for any other prompt. Raises RequestError."""
    if not isinstance(value, dict) or "multimodal_data" not in value:
        return None
    items = value["multimodal_data"]
    if not isinstance(items, list):
        raise RequestError("'multimodal_data' must be an array of base64 strings")
    text = value.get("prompt_string")
    if not isinstance(text, str):
        raise RequestError("a multimodal prompt needs a string 'prompt_string'")
    data = [media_bytes(item, f"multimodal_data[{i}]") for i, item in enumerate(items)]
    return with_markers(text, len(data)), images(data)


def image_part(part: dict[str, object], where: str) -> bytes:
    """An OpenAI `{"type": "image_url", "image_url": {"url": ...}}` part's image. Raises RequestError."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    return media_bytes(url, f"{where}.image_url.url")
