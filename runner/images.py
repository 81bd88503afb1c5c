"""A multimodal prompt as engine inputs: the prompt is split on its `[img-N]` markers (only for a model that can
see), each image is decoded (models.vision.image) and encoded by the model into soft tokens, and the inputs become
one list of ints: token ids, and for an image's rows negative ids derived from a hash of the image's bytes and the
row's index (so the slot's prefix matching reuses the cache for the same image and not for another). The rows'
embeddings travel with the sequence; `batch` turns a forward pass's inputs into a Batch with them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ml.backend import Backend
from ml.batch import Batch
from models.vision.image import ImageError, preprocess, split_prompt
from runner.protocol import CompletionRequest


@dataclass(frozen=True)
class ImageRow:
    """One soft token of an image: its embedding, its index in the image and the image's length."""

    embedding: npt.NDArray[np.float32]
    index: int
    length: int


def can_see(model: Any) -> bool:
    return getattr(model, "vision", None) is not None


def row_id(digest: bytes, index: int) -> int:
    """A negative input id (token ids are >= 0) for row `index` of the image with this digest."""
    h = hashlib.blake2b(digest + index.to_bytes(4, "little"), digest_size=7).digest()
    return -1 - int.from_bytes(h, "little")


# Gemma 3's processor puts each image's soft tokens between these (Ollama's PostTokenize writes the same tokens).
IMAGE_OPEN, IMAGE_CLOSE = "\n\n<start_of_image>", "<end_of_image>\n\n"


def prompt_inputs(model: Any, backend: Backend, tokenizer: Any,
                  req: CompletionRequest) -> tuple[list[int], dict[int, ImageRow]]:
    """The inputs of a vision model's prompt (BOS, text, and per image "\\n\\n<start_of_image>", its soft tokens,
    "<end_of_image>\\n\\n", as Gemma 3's processor lays it out), and the image rows by id.

    Raises:
        ValueError: "failed to process inputs: ..." (an unknown marker, an image that does not decode or encode),
            the Go runner's wording.
    """
    images = {im.id: im.data for im in req.images}
    tokens: list[int] = []
    rows: dict[int, ImageRow] = {}
    for piece in _layout(tokenizer, req.prompt, list(images)):
        if isinstance(piece, list):
            tokens += piece
            continue
        data = images[piece]
        try:
            embeddings = _encode(model, backend, data)
        except ImageError as e:
            raise ValueError(f"failed to process inputs: {e}") from None
        digest = hashlib.blake2b(data, digest_size=16).digest()
        ids = [row_id(digest, i) for i in range(len(embeddings))]
        for i, (rid, emb) in enumerate(zip(ids, embeddings)):
            rows[rid] = ImageRow(emb, i, len(ids))
        tokens += ids
    return tokens, rows


def count_inputs(model: Any, tokenizer: Any, prompt: str, image_ids: Sequence[int]) -> int:
    """How many inputs prompt_inputs makes of this prompt, without decoding or encoding an image (for a context
    check before the request queues). Raises ValueError as prompt_inputs does for an unknown marker."""
    n_image = model.vision.tokens_per_image
    return sum(len(p) if isinstance(p, list) else n_image for p in _layout(tokenizer, prompt, image_ids))


def _layout(tokenizer: Any, prompt: str, image_ids: Sequence[int]) -> list[list[int] | int]:
    """The prompt as token lists and image ids in order: BOS with the first text, IMAGE_OPEN's tokens before and
    IMAGE_CLOSE's after each image."""
    try:
        parts = split_prompt(prompt, image_ids)
    except ImageError as e:
        raise ValueError(f"failed to process inputs: {e}") from None
    first = parts[0] if parts and isinstance(parts[0], str) else ""
    out: list[list[int] | int] = [tokenizer.encode(first, add_special=True, parse_special=True)]
    for part in parts[1:] if first else parts:
        if isinstance(part, str):
            out.append(tokenizer.encode(part, add_special=False, parse_special=True))
            continue
        out += [tokenizer.encode(IMAGE_OPEN, add_special=False, parse_special=True), part,
                tokenizer.encode(IMAGE_CLOSE, add_special=False, parse_special=True)]
    return out


def _encode(model: Any, backend: Backend, data: bytes) -> npt.NDArray[np.float32]:
    pixels = preprocess(data, model.image_spec())
    ctx = backend.new_context()
    try:
        out = model.encode_image(ctx, pixels)
        ctx.forward(out).compute(out)
        return np.array(out.numpy(), dtype=np.float32)  # (tokens, n_embd)
    finally:
        ctx.close()


def same_batch(inputs: Sequence[int], rows: Mapping[int, ImageRow]) -> tuple[tuple[int, int], ...]:
    """(offset, n) for every image that starts in `inputs`: its row and the n after it share one forward pass."""
    if not rows:
        return ()
    return tuple((i, rows[t].length - 1) for i, t in enumerate(inputs) if t < 0 and rows[t].index == 0)


def batch(inputs: Sequence[int], positions: npt.NDArray[np.int32], seqs: npt.NDArray[np.int32],
          outputs: npt.NDArray[np.int32], rows: Mapping[int, ImageRow]) -> Batch:
    """A forward pass's Batch; image rows get their embeddings and see their whole image (spans)."""
    ids = np.asarray(inputs, dtype=np.int64)
    is_embed = ids < 0
    if not is_embed.any():
        return Batch(ids.astype(np.int32), positions, seqs, outputs)
    n = len(inputs)
    first = next(iter(rows.values()))
    embeds = np.zeros((n, first.embedding.shape[0]), dtype=np.float32)
    spans = np.stack([positions, positions], axis=1).astype(np.int32)
    for i in np.flatnonzero(is_embed):
        row = rows[int(ids[i])]
        embeds[i] = row.embedding
        start = int(positions[i]) - row.index
        spans[i] = (start, start + row.length - 1)
    return Batch(np.where(is_embed, 0, ids).astype(np.int32), positions, seqs, outputs, embeds, is_embed, spans)
