"""The interfaces (Backend / Context / Tensor), the shared layers (`ml.nn`), dtypes, errors and the GGUF reader.

Shapes are in ggml order everywhere in this project: `shape[0]` is the fastest-varying (innermost) dimension, so
a ggml tensor [n0, n1, n2, n3] is a numpy array of shape (n3, n2, n1, n0). `a.matmul(ctx, b)` with a [k, m] and
b [k, n] gives [m, n] (numpy: `b @ a.T`).

Glossary (llama.cpp's vocabulary, used in every package): n_embd (hidden size), n_head / n_head_kv (query and
key/value heads), head_dim, n_layer, n_ff (feed-forward size), n_vocab, n_ctx (context length in tokens),
n_batch (tokens per forward). *sequence*: one request's token stream; *batch*: one forward pass; *slot*: cache
capacity reserved for a sequence; *step*: one schedule -> forward -> sample; `il`: a layer index.
"""
from __future__ import annotations

from ml.backend import Backend, Context, ProgressFn, Tensor
from ml.dtype import DType
from ml.errors import GgmlError, ModelLoadError, RunnerError

__all__ = ["Backend", "Context", "DType", "GgmlError", "ModelLoadError", "ProgressFn", "RunnerError", "Tensor"]
