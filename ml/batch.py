"""One forward pass's inputs, shared by models, caches and the runner."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Batch:
    """Tokens of one forward pass, possibly from several sequences.

    tokens, positions, seqs: int32[n_tokens], one entry per token.
    outputs: int32[n_outputs], indices into the batch of the rows whose logits are wanted (in that order).
    """

    tokens: npt.NDArray[np.int32]
    positions: npt.NDArray[np.int32]
    seqs: npt.NDArray[np.int32]
    outputs: npt.NDArray[np.int32]

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
