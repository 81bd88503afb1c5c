"""Generation throughput with a real model: prefill and decode tokens/s, batched decode over several sequences,
and the per-step cost of the KV cache's bookkeeping (start_forward, mask building).

    .venv/bin/python bench/generate.py [--model PATH] [--threads N] [--repeats 3]

Measures, best of `--repeats` runs each:
  * prefill: one forward of a 128-token prompt (fresh cache);
  * decode: 64 greedy steps after that prompt, one token per step;
  * batched decode: 1, 2 and 4 sequences (each with its own 128-token prompt, prefilled together), 64 steps of
    one token per sequence per forward; tokens/s counts every sequence's tokens;
  * cache overhead per decode step: the median time of cache.start_forward (placement, mask, input tensors) and,
    inside it, of building the mask, in microseconds.
Prints a markdown table. When the `llama_cpp` package is importable, llama.cpp's prefill and decode are measured
side by side on the same model and thread count.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ggml.backend import load_backend  # noqa: E402
from ggml.runtime import RuntimeOptions  # noqa: E402
from ml.batch import Batch  # noqa: E402
from ml.dtype import DType  # noqa: E402
from models import load_model  # noqa: E402

CACHE_DIR = Path(os.environ.get("OLLAMA_PYRUNNER_CACHE", Path.home() / ".cache" / "ollama-pyrunner"))
MODELS_DIR = Path(os.environ.get("MODELS_DIR", CACHE_DIR / "models"))
DEFAULT_MODEL = MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"

N_PROMPT = 128
N_DECODE = 64
SEQS = (1, 2, 4)
N_CTX_SEQ = 256  # cache cells per sequence: a prompt plus the decode fits
N_BATCH = 512


def prompt_tokens(n_vocab: int, n: int, seed: int) -> list[int]:
    """Deterministic ordinary-looking token ids (away from the special ones at both ends of the vocabulary)."""
    g = np.random.default_rng(seed)
    return [int(t) for t in g.integers(min(300, n_vocab // 4), max(n_vocab - 300, n_vocab // 2), size=n)]


class Bench:
    def __init__(self, path: Path, threads: int, unfused: bool = False, fast_kernels: bool = False) -> None:
        self.fused = not unfused  # the runner uses ggml's fused attention kernel by default
        opts = RuntimeOptions(threads=threads, fast_kernels=fast_kernels)
        self.backend = load_backend(path, opts)
        self.model = load_model(self.backend)
        self.n_vocab = int(self.model.params.n_vocab)

    def new_cache(self) -> Any:
        cache = self.model.new_cache(flash=self.fused)
        cache.init(self.backend, DType.F16, max(SEQS), N_CTX_SEQ * max(SEQS), N_BATCH)
        return cache

    def forward(self, cache: Any, batch: Batch) -> np.ndarray:
        ctx = self.backend.new_context()
        try:
            out = self.model.forward(ctx, batch, cache)
            ctx.forward(out).compute(out)
            return np.asarray(out.numpy()).reshape(-1, self.n_vocab)
        finally:
            ctx.close()

    def prefill(self, cache: Any, n_seq: int) -> list[int]:
        """Every sequence's prompt in one batch; returns each sequence's first generated token."""
        toks, pos, seqs, outs = [], [], [], []
        for s in range(n_seq):
            toks += prompt_tokens(self.n_vocab, N_PROMPT, seed=s)
            pos += list(range(N_PROMPT))
            seqs += [s] * N_PROMPT
            outs.append(len(toks) - 1)
        batch = Batch(np.asarray(toks, np.int32), np.asarray(pos, np.int32), np.asarray(seqs, np.int32),
                      np.asarray(outs, np.int32))
        return [int(t) for t in np.argmax(self.forward(cache, batch), axis=1)]

    def decode(self, cache: Any, first: list[int], n_steps: int) -> float:
        """n_steps forwards of one greedy token per sequence; returns the elapsed seconds."""
        n_seq = len(first)
        last = list(first)
        seqs = np.arange(n_seq, dtype=np.int32)
        t0 = time.perf_counter()
        for step in range(n_steps):
            pos = np.full(n_seq, N_PROMPT + step, dtype=np.int32)
            batch = Batch(np.asarray(last, np.int32), pos, seqs, np.arange(n_seq, dtype=np.int32))
            last = [int(t) for t in np.argmax(self.forward(cache, batch), axis=1)]
        return time.perf_counter() - t0

    def run(self, repeats: int) -> dict[str, Any]:
        res: dict[str, Any] = {}
        best_prefill = float("inf")
        for _ in range(repeats):
            cache = self.new_cache()
            batch = Batch.single(prompt_tokens(self.n_vocab, N_PROMPT, seed=0))
            t0 = time.perf_counter()
            self.forward(cache, batch)
            best_prefill = min(best_prefill, time.perf_counter() - t0)
            cache.close()
        res["prefill"] = N_PROMPT / best_prefill
        for n_seq in SEQS:
            best, sf_us, mask_us = float("inf"), [], []
            for _ in range(repeats):
                cache = self.new_cache()
                first = self.prefill(cache, n_seq)
                sf, mk = _instrument(cache)
                elapsed = self.decode(cache, first, N_DECODE)
                if elapsed < best:
                    best = elapsed
                    sf_us = [t * 1e6 for t in sf]
                    mask_us = [t * 1e6 for t in mk]
                cache.close()
            res[f"decode{n_seq}"] = N_DECODE * n_seq / best
            res[f"start_forward{n_seq}"] = statistics.median(sf_us)
            res[f"mask{n_seq}"] = statistics.median(mask_us) if mask_us else float("nan")
        return res

    def close(self) -> None:
        self.backend.close()


def _instrument(cache: Any) -> tuple[list[float], list[float]]:
    """Record, per call of cache.start_forward, its duration and the time spent building masks inside it (every
    causal member of a wrapper cache summed). Returns the two lists (seconds), filled as the cache is used."""
    sf_times: list[float] = []
    mask_times: list[float] = []
    step_mask: list[float] = []

    def timed_mask(inner: Callable[..., Any]) -> Callable[..., Any]:
        def mask(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                step_mask.append(time.perf_counter() - t)
        return mask

    for c in getattr(cache, "caches", [cache]):
        if getattr(c, "cells", None) is not None:
            c.cells.mask = timed_mask(c.cells.mask)
    inner_sf = cache.start_forward

    def start_forward(*a: Any, **kw: Any) -> Any:
        step_mask.clear()
        t = time.perf_counter()
        try:
            return inner_sf(*a, **kw)
        finally:
            sf_times.append(time.perf_counter() - t)
            mask_times.append(sum(step_mask))
    cache.start_forward = start_forward
    return sf_times, mask_times


def llama_cpp_bench(path: Path, threads: int, repeats: int, n_vocab: int) -> dict[str, Any] | None:
    """llama.cpp's prefill and single-sequence decode through llama-cpp-python, when installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX_SEQ * max(SEQS), n_batch=N_BATCH, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    prompt = prompt_tokens(n_vocab, N_PROMPT, seed=0)
    best_p, best_d = float("inf"), float("inf")
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        best_p = min(best_p, time.perf_counter() - t0)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t0 = time.perf_counter()
        for _ in range(N_DECODE):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        best_d = min(best_d, time.perf_counter() - t0)
    return {"prefill": N_PROMPT / best_p, "decode1": N_DECODE / best_d}


def table(ours: dict[str, Any], theirs: dict[str, Any] | None) -> str:
    def cell(d: dict[str, Any] | None, key: str, fmt: str) -> str:
        if d is None or key not in d:
            return "n/a"
        return format(d[key], fmt)

    rows = [(f"prefill, {N_PROMPT}-token prompt (tok/s)", "prefill", ".1f")]
    for n in SEQS:
        rows.append((f"decode, {n} seq{'s' if n > 1 else ''} x {N_DECODE} tokens (tok/s)", f"decode{n}", ".1f"))
    for n in SEQS:
        rows.append((f"cache.start_forward per step, {n} seq{'s' if n > 1 else ''} (µs)", f"start_forward{n}",
                     ".0f"))
    for n in SEQS:
        rows.append((f"  of which mask building, {n} seq{'s' if n > 1 else ''} (µs)", f"mask{n}", ".0f"))
    out = ["| measure | ollama-pyrunner | llama.cpp |", "|---|---:|---:|"]
    for label, key, fmt in rows:
        out.append(f"| {label} | {cell(ours, key, fmt)} | {cell(theirs, key, fmt)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per measure; the best is reported")
    ap.add_argument("--unfused", action="store_true", help="unfused softmax attention instead of flash_attn_ext")
    ap.add_argument("--fast-kernels", action="store_true",
                    help="ggml's batch-shape-dependent kernels (tiled/split attention, repacked weights)")
    args = ap.parse_args(argv)
    if not args.model.exists():
        print(f"model not found: {args.model} (run `make models`)", file=sys.stderr)
        return 2
    bench = Bench(args.model, args.threads, args.unfused, args.fast_kernels)
    try:
        ours = bench.run(args.repeats)
        n_vocab = bench.n_vocab
    finally:
        bench.close()
    theirs = llama_cpp_bench(args.model, args.threads, args.repeats, n_vocab)
    print(f"model: {args.model.name}, threads: {args.threads}, KV cache f16, best of {args.repeats}"
          + ("" if theirs is not None else "; llama_cpp not importable: its column is n/a"))
    print()
    print(table(ours, theirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
