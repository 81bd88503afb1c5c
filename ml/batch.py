"""One forward pass's inputs, shared by models, caches and the runner."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class MultimodalInput:
    """An input a model encodes itself during the forward (mllama: a tiled image whose cross-attention keys and
    values go to the encoder cache), carried by the batch row `index`."""

    index: int
    data: Any


@dataclass(frozen=True, slots=True)
class Batch:
    """Tokens of one forward pass, possibly from several sequences.

    tokens, positions, seqs: int32[n_tokens], one entry per token.
    outputs: int32[n_outputs], indices into the batch of the rows whose logits are wanted (in that order).
    embeds: float32[n_tokens, n_embd] input embeddings for the rows where `is_embed` is set (an image's soft
    tokens; their `tokens` entry is ignored), or None when every row is a token.
    spans: int32[n_tokens, 2], the first and last position a row sees regardless of the causal and window rules
    (an image's tokens see the whole image); None, or a row's own position twice, for none.
    multimodal: inputs the model encodes in this forward, in batch order (the encoder cache records the position
    of the last one's row).
    """

    tokens: npt.NDArray[np.int32]
    positions: npt.NDArray[np.int32]
    seqs: npt.NDArray[np.int32]
    outputs: npt.NDArray[np.int32]
    embeds: npt.NDArray[np.float32] | None = None
    is_embed: npt.NDArray[np.bool_] | None = None
    spans: npt.NDArray[np.int32] | None = None
    multimodal: tuple[MultimodalInput, ...] = ()

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    @staticmethod
    def single(tokens: list[int] | npt.NDArray[np.int32], start: int = 0, seq: int = 0,
               all_logits: bool = False) -> Batch:
        """A batch of one sequence's consecutive tokens from position `start`; logits for the last token only
        (or every token with all_logits)."""
        toks = np.asarray(tokens, dtype=np.int32)
        n = toks.size
        outs = np.arange(n, dtype=np.int32) if all_logits else np.array([n - 1], dtype=np.int32)
        return Batch(toks, np.arange(start, start + n, dtype=np.int32), np.full(n, seq, dtype=np.int32), outs)
