"""A multimodal prompt as engine inputs: the prompt is split on its `[img-N]` markers (only for a model that can
see), each image is decoded (models.vision.image) and prepared by the model, and the inputs become one list of
ints: token ids, and for an image's rows negative ids derived from a hash of the image's bytes and the row's index
(so the slot's prefix matching reuses the cache for the same image and not for another). The rows travel with the
sequence; `batch` turns a forward pass's inputs into a Batch with them.

Two kinds of model: one whose image is a run of soft tokens in the sequence (gemma3: encoded when the request is
placed, the rows' embeddings replace token embeddings), and one whose image is a single input the model encodes
in the forward that reaches it (mllama, `cross_attention_images`: an `<|image|>` token carrying the tiled image,
which goes to the batch's `multimodal`; its cross-attention keys and values then live in the encoder cache).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ml.backend import Backend
from ml.batch import Batch, MultimodalInput
from models.vision.image import ImageError, decode, preprocess, split_prompt
from runner.protocol import CompletionRequest


@dataclass(frozen=True)
class ImageRow:
    """One row of an image: its soft token's embedding (None for an image the model encodes in the forward: then
    the row is the token `token` carrying `encoder_input`), its index in the image and the image's length."""

    embedding: npt.NDArray[np.float32] | None
    index: int
    length: int
    token: int = 0
    encoder_input: Any = None


def can_see(model: Any) -> bool:
    return getattr(model, "vision", None) is not None


def row_id(digest: bytes, index: int) -> int:
    """A negative input id (token ids are >= 0) for row `index` of the image with this digest."""
    h = hashlib.blake2b(digest + index.to_bytes(4, "little"), digest_size=7).digest()
    return -1 - int.from_bytes(h, "little")


def prompt_inputs(model: Any, backend: Backend, tokenizer: Any,
                  req: CompletionRequest) -> tuple[list[int], dict[int, ImageRow]]:
    """The inputs of a vision model's prompt (BOS, text, and per image "\\n\\n<start_of_image>", its soft tokens,
    "<end_of_image>\\n\\n", as Gemma 3's processor lays it out), and the image rows by id.

    Raises:
        ValueError: "failed to process inputs: ..." (an unknown marker, an image that does not decode or encode),
            the Go runner's wording.
    """
    if getattr(model, "cross_attention_images", False):
        return _carried_inputs(model, tokenizer, *_split(req))
    tokens: list[int] = []
    rows: dict[int, ImageRow] = {}
    for part in _layout(tokenizer, req):
        if isinstance(part, list):
            tokens += part
            continue
        try:
            embeddings = _encode(model, backend, part)
        except ImageError as e:
            raise ValueError(f"failed to process inputs: {e}") from None
        digest = hashlib.blake2b(part, digest_size=16).digest()
        ids = [row_id(digest, i) for i in range(len(embeddings))]
        for i, (rid, emb) in enumerate(zip(ids, embeddings)):
            rows[rid] = ImageRow(emb, i, len(ids))
        tokens += ids
    return tokens, rows


def prompt_length(model: Any, tokenizer: Any, req: CompletionRequest) -> int:
    """len(prompt_inputs(…)[0]) without running the vision tower: the same layout, each image counted as the
    model's tokens per image. Decodes every image, so a file that is no image fails here, before any queue.

    Raises:
        ValueError: as prompt_inputs.
    """
    if getattr(model, "cross_attention_images", False):
        return len(_carried_inputs(model, tokenizer, *_split(req), prepare=False)[0])
    n = 0
    for part in _layout(tokenizer, req):
        if isinstance(part, list):
            n += len(part)
            continue
        try:
            decode(part)
        except ImageError as e:
            raise ValueError(f"failed to process inputs: {e}") from None
        n += int(model.vision.tokens_per_image)
    return n


def _split(req: CompletionRequest) -> tuple[dict[int, bytes], list[str | int]]:
    """The request's images by id, and its prompt as text and image ids in order."""
    images = {im.id: im.data for im in req.images}
    try:
        return images, list(split_prompt(req.prompt, list(images)))
    except ImageError as e:
        raise ValueError(f"failed to process inputs: {e}") from None


def _layout(tokenizer: Any, req: CompletionRequest) -> list[list[int] | bytes]:
    """The prompt as runs of token ids and image files, in order."""
    images, parts = _split(req)
    first = parts[0] if parts and isinstance(parts[0], str) else ""
    out: list[list[int] | bytes] = [tokenizer.encode(first, add_special=True, parse_special=True)]
    for part in parts[1:] if first else parts:
        if isinstance(part, str):
            out.append(tokenizer.encode(part, add_special=False, parse_special=True))
            continue
        out.append(tokenizer.encode("\n\n<start_of_image>", add_special=False, parse_special=True))
        out.append(images[part])
        out.append(tokenizer.encode("<end_of_image>\n\n", add_special=False, parse_special=True))
    return out


def _carried_inputs(model: Any, tokenizer: Any, images: Mapping[int, bytes], parts: Sequence[str | int],
                    prepare: bool = True) -> tuple[list[int], dict[int, ImageRow]]:
    """mllama's layout: the image is one input, an `<|image|>` token that carries the tiled image (Hugging Face's
    processor puts that token where the image goes). Ollama's server writes `[img-N]<|image|>`: that token is the
    carrier; after a bare marker one is put in. The encoder cache holds one image, so a prompt may have one.
    Without `prepare` each image is only decoded (its rows carry nothing): enough to count the inputs."""
    n_images = sum(1 for part in parts if isinstance(part, int))
    if n_images > 1:
        raise ValueError(f"failed to process inputs: this model takes one image per request, not {n_images}")
    image_token = int(model.image_token)
    tokens: list[int] = []
    rows: dict[int, ImageRow] = {}
    after_image = False
    for i, part in enumerate(parts):
        if isinstance(part, int):
            data = images[part]
            try:
                tiled = model.prepare_image(data) if prepare else decode(data)
            except ImageError as e:
                raise ValueError(f"failed to process inputs: {e}") from None
            if i == 0:
                tokens += tokenizer.encode("", add_special=True, parse_special=True)  # BOS
            rid = row_id(hashlib.blake2b(data, digest_size=16).digest(), 0)
            rows[rid] = ImageRow(None, 0, 1, token=image_token, encoder_input=tiled if prepare else None)
            tokens.append(rid)
            after_image = True
            continue
        ids = tokenizer.encode(part, add_special=i == 0, parse_special=True)
        if after_image and ids and ids[0] == image_token:  # the server's <|image|>: the carrier stands for it
            ids = ids[1:]
        tokens += ids
        after_image = False
    return tokens, rows


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
    if not rows and (not inputs or min(inputs) >= 0):  # only token ids (every decode step without images)
        return Batch(np.asarray(inputs, dtype=np.int32), positions, seqs, outputs)
    ids = np.asarray(inputs, dtype=np.int64)
    is_row = ids < 0
    if not is_row.any():
        return Batch(ids.astype(np.int32), positions, seqs, outputs)
    tokens = np.where(is_row, 0, ids).astype(np.int32)
    carried: list[MultimodalInput] = []
    is_embed = np.zeros(len(inputs), dtype=np.bool_)
    for i in np.flatnonzero(is_row):
        row = rows[int(ids[i])]
        if row.embedding is None:
            tokens[i] = row.token
            carried.append(MultimodalInput(int(i), row.encoder_input))
        else:
            is_embed[i] = True
    if not is_embed.any():
        return Batch(tokens, positions, seqs, outputs, multimodal=tuple(carried))
    width = next(r.embedding.shape[0] for r in rows.values() if r.embedding is not None)
    embeds = np.zeros((len(inputs), width), dtype=np.float32)
    spans = np.stack([positions, positions], axis=1).astype(np.int32)
    for i in np.flatnonzero(is_embed):
        row = rows[int(ids[i])]
        assert row.embedding is not None
        embeds[i] = row.embedding
        start = int(positions[i]) - row.index
        spans[i] = (start, start + row.length - 1)
    return Batch(tokens, positions, seqs, outputs, embeds, is_embed, spans, tuple(carried))
