"""llama.cpp as the benches' reference, through llama-cpp-python's low-level API (when it is installed; `make bench`
builds it from the same pinned sdist the ggml build uses).

`LlamaCpp.forward(batch)` takes the same `Batch` as our runner and returns the logits of its output rows, so one
measuring loop drives both. The context mirrors ours: a 256-cell KV stream per sequence (llama.cpp's default,
non-unified layout for several sequences), F16 K/V, its default flash-attention choice, `threads` for both prompt
and generation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ml.batch import Batch


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCpp:
    def __init__(self, path: Path, threads: int, n_ctx: int, n_batch: int, n_seq_max: int) -> None:
        import llama_cpp as lc
        self._lc = lc
        lc.llama_backend_init()
        lc.llama_log_set(_QUIET, None)
        mparams = lc.llama_model_default_params()
        self._model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model)))
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._n_batch = n_batch

    def set_threads(self, threads: int) -> None:
        self._lc.llama_set_n_threads(self._ctx, threads, threads)

    def reset(self) -> None:
        """Forget every sequence."""
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self._ctx), True)

    def forward(self, batch: Batch) -> npt.NDArray[np.float32]:
        n = batch.n_tokens
        if n > self._n_batch:
            raise ValueError(f"{n} tokens do not fit a batch of {self._n_batch}")
        b = self._batch
        b.n_tokens = n
        wanted = set(int(i) for i in batch.outputs)
        for i in range(n):
            b.token[i] = int(batch.tokens[i])
            b.pos[i] = int(batch.positions[i])
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = int(batch.seqs[i])
            b.logits[i] = i in wanted
        rc = self._lc.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = np.empty((batch.outputs.size, self.n_vocab), dtype=np.float32)
        for row, i in enumerate(batch.outputs):
            ptr = self._lc.llama_get_logits_ith(self._ctx, int(i))
            out[row] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def close(self) -> None:
        lc = self._lc
        if self._ctx:
            lc.llama_batch_free(self._batch)
            lc.llama_free(self._ctx)
            lc.llama_model_free(self._model)
            self._ctx = None


def _quiet(level: int, text: Any, user_data: Any) -> None:
    pass


def _log_callback() -> Any:
    import llama_cpp as lc
    return lc.llama_log_callback(_quiet)


_QUIET: Any = None
if available():
    _QUIET = _log_callback()  # kept alive for as long as llama.cpp may call it
