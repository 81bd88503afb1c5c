"""Pooling of per-token hidden states into one vector per sequence, shared by encoders (bert) and decoders whose
GGUF carries `<arch>.pooling_type` (embedding models such as Qwen3-Embedding, gte-Qwen2)."""
from __future__ import annotations

import enum
import logging

import numpy as np

from ml.backend import Backend, Context, Tensor

log = logging.getLogger(__name__)


class Pooling(enum.IntEnum):
    """GGUF `<arch>.pooling_type` values (llama.cpp's enum; RANK, 4, needs a classifier head we do not load)."""

    NONE = 0
    MEAN = 1
    CLS = 2
    LAST = 3

    @staticmethod
    def read(b: Backend) -> Pooling:
        """The model's pooling; an unknown or unsupported value means none (the model then cannot embed)."""
        value = b.uint("pooling_type", 0)
        try:
            return Pooling(value)
        except ValueError:
            log.warning("pooling_type %d is not supported: the model will not embed", value)
            return Pooling.NONE


def sequence_order(seqs: np.ndarray) -> np.ndarray:
    """The batch's sequence ids in order of first appearance (the order of the pooled vectors)."""
    ids, first = np.unique(seqs, return_index=True)
    return np.asarray(ids[np.argsort(first)])


def pool(ctx: Context, x: Tensor, seqs: np.ndarray, how: Pooling) -> Tensor:
    """x [n_embd, n_tokens] -> [n_embd, n_seqs]: mean over each sequence's tokens, its first, or its last."""
    order = sequence_order(seqs)
    if how == Pooling.MEAN:
        member = (seqs[None, :] == order[:, None]).astype(np.float32)  # [n_seqs, n_tokens]
        weights = member / member.sum(axis=1, keepdims=True)
        xt = x.transpose(ctx).contiguous(ctx)  # [n_tokens, n_embd]
        return xt.matmul(ctx, ctx.from_numpy(weights))  # weights is ggml [n_tokens, n_seqs]
    if how == Pooling.NONE:
        raise ValueError("this model has no pooling: it does not embed")
    idx = np.array([np.flatnonzero(seqs == s)[0 if how == Pooling.CLS else -1] for s in order], dtype=np.int32)
    return x.get_rows(ctx, ctx.from_numpy(idx))
