"""Images in the llama-server mode: llama-server's `multimodal_data` (base64 strings, one `<__media__>` marker in the
prompt text per entry, substituted in order) and OpenAI `image_url` content parts (data URIs only: a runner that
may not reach the network fetches nothing). Both become the engine's own form, the P3 front end's: `[img-N]`
markers in the prompt and ImageData(N, file bytes), so images take the same engine path whichever front end sent
them. Everything here raises RequestError (a 400) with a message that names the problem.
"""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Final

from models.vision.image import MARKER as ENGINE_MARKER
from runner.errors import RequestError
from runner.protocol import ImageData

MEDIA_MARKER: Final = "<__media__>"  # llama.cpp's mtmd_default_marker()
# llama-server's wording when the model has no vision (there it means no --mmproj was given)
NO_VISION: Final = "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj"
_WHITESPACE = re.compile(r"\s+")


def decode_base64(text: object, where: str) -> bytes:
    """Strict base64 (line breaks allowed, as some clients wrap it)."""
    if not isinstance(text, str) or not text:
        raise RequestError(f"{where} must be a non-empty base64 string")
    try:
        return base64.b64decode(_WHITESPACE.sub("", text), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where} is not valid base64") from None


def multimodal_data(prompt: object, doc: dict[str, object]) -> tuple[bytes, ...]:
    """The decoded `multimodal_data` of a native /completion: in the prompt object (llama-server's documented
    place, `{"prompt_string": …, "multimodal_data": [...]}`) or beside the prompt; not both."""
    inner = prompt.get("multimodal_data") if isinstance(prompt, dict) else None
    outer = doc.get("multimodal_data")
    if inner is not None and outer is not None:
        raise RequestError("multimodal_data is given twice (in the prompt object and beside it)")
    value = inner if inner is not None else outer
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RequestError("'multimodal_data' must be an array of base64 strings")
    return tuple(decode_base64(v, f"multimodal_data[{i}]") for i, v in enumerate(value))


def image_url_bytes(part: dict[str, object], where: str) -> bytes:
    """The file bytes of an OpenAI `image_url` content part (`{"url": "data:image/…;base64,…"}` or the URL as a
    plain string)."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: 'image_url' needs a 'url'")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https", "file"):
        raise RequestError(f"{where}: image URLs are not fetched by this server; send the image inline as a "
                           "data:image/<type>;base64,<data> URI")
    header, comma, data = url.partition(",")
    if not comma or not header.lower().startswith("data:"):
        raise RequestError(f"{where}: the image url must be a data:image/<type>;base64,<data> URI")
    if not header.lower().startswith("data:image/"):
        raise RequestError(f"{where}: the data URI is not an image ({header[5:] or 'no media type'})")
    if not header.lower().endswith(";base64"):
        raise RequestError(f"{where}: the image data URI must be base64 encoded")
    return decode_base64(data, f"{where}: the image data")


def engine_prompt(prompt: str, media: Sequence[bytes]) -> tuple[str, tuple[ImageData, ...]]:
    """The prompt with its i-th `<__media__>` marker replaced by the engine's `[img-i]`, and the images.

    Raises RequestError when the markers and the images do not pair up, or when the text already holds an
    `[img-N]` marker of its own (the engine would read it as an image).
    """
    pieces = prompt.split(MEDIA_MARKER)
    if len(pieces) - 1 != len(media):
        raise RequestError(f"the prompt has {len(pieces) - 1} {MEDIA_MARKER} marker(s) for {len(media)} "
                           "image(s); each image needs one marker, in order")
    if any(ENGINE_MARKER.search(p) for p in pieces):
        raise RequestError("a prompt with images may not contain the text [img-<number>]")
    text = pieces[0] + "".join(f"[img-{i}]{piece}" for i, piece in enumerate(pieces[1:]))
    return text, tuple(ImageData(i, data) for i, data in enumerate(media))
