"""Generation throughput with real models, side by side with llama.cpp in the same run: prefill and decode tokens/s,
batched decode over 1/2/4 sequences, decode with a competing busy process, and the Python work per decode step.

    .venv/bin/python bench/generate.py [--model PATH ...] [--threads N] [--repeats 3] [--no-reuse] [--ggml-matmul]
                                        [--row-attention]

Per model (default: SmolLM2 and Gemma 3 where fetched), best of `--repeats` runs each, ours and llama.cpp's runs
interleaved so that both see the same load:
  * prefill: one forward of a 128-token prompt (fresh cache);
  * decode: 1, 2 and 4 sequences (each with its own 128-token prompt, prefilled together), 64 greedy steps of one
    token per sequence per forward; tokens/s counts every sequence's tokens;
  * contended: single-sequence decode while one busy process spins on a core, next to our quiet 1-thread decode
    (the figure it should not fall below);
  * Python per decode step: the step's wall time minus the time inside ggml's graph compute (cache placement,
    input refresh or graph building, reading logits, the argmax): the mean over the 64 steps, which includes the
    first step's graph build, and the median, a step that reruns the kept graph; the cache's share (`prepare`);
    and the first step alone.
llama.cpp is llama-cpp-python's low-level API (bench/llamacpp.py) when importable, else its column is n/a. Timings
are wall-clock on whatever else the machine runs: compare the ratios of one run, not figures across runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import llamacpp  # noqa: E402
from ggml.backend import load_backend  # noqa: E402
from ggml.runtime import RuntimeOptions  # noqa: E402
from ml.batch import Batch  # noqa: E402
from ml.dtype import DType  # noqa: E402
from models import load_model  # noqa: E402
from runner.forward import ForwardRunner  # noqa: E402

CACHE_DIR = Path(os.environ.get("OLLAMA_PYRUNNER_CACHE", Path.home() / ".cache" / "ollama-pyrunner"))
MODELS_DIR = Path(os.environ.get("MODELS_DIR", CACHE_DIR / "models"))
DEFAULT_MODELS = (MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf", MODELS_DIR / "gemma-3-270m-q4_k_m.gguf")

N_PROMPT = 128
N_DECODE = 64
SEQS = (1, 2, 4)
N_CTX_SEQ = 256  # cache cells per sequence: a prompt plus the decode fits
N_BATCH = 512


class Engine(Protocol):
    n_vocab: int

    def reset(self) -> None: ...
    def forward(self, batch: Batch) -> npt.NDArray[np.float32]: ...


def prompt_tokens(n_vocab: int, n: int, seed: int) -> list[int]:
    """Deterministic ordinary-looking token ids (away from the special ones at both ends of the vocabulary)."""
    g = np.random.default_rng(seed)
    return [int(t) for t in g.integers(min(300, n_vocab // 4), max(n_vocab - 300, n_vocab // 2), size=n)]


class Ours:
    """The runner's path: a KV cache and a ForwardRunner (graph reuse unless `reuse` is off)."""

    def __init__(self, path: Path, threads: int, *, unfused: bool = False, fast_kernels: bool = False,
                 reuse: bool = True, row_matmul: bool = True, row_attention: bool = False) -> None:
        self.fused, self.reuse = not unfused, reuse
        self.backend = load_backend(path, RuntimeOptions(threads=threads, fast_kernels=fast_kernels,
                                                         row_matmul=row_matmul, row_attention=row_attention))
        self.model = load_model(self.backend)
        self.n_vocab = int(self.model.params.n_vocab)
        self.cache: Any = None
        self.runner: ForwardRunner | None = None
        self.prepare_seconds: list[float] = []  # per cache.prepare call since the last reset

    def reset(self) -> None:
        self._drop()
        self.cache = self.model.new_cache(flash=self.fused)
        self.cache.init(self.backend, DType.F16, max(SEQS), N_CTX_SEQ * max(SEQS), N_BATCH)
        self.runner = ForwardRunner(self.backend, self.model, self.cache, reuse=self.reuse)
        self.prepare_seconds = []
        inner = self.cache.prepare

        def timed(batch: Batch) -> Any:
            t = time.perf_counter()
            try:
                return inner(batch)
            finally:
                self.prepare_seconds.append(time.perf_counter() - t)
        self.cache.prepare = timed

    def forward(self, batch: Batch) -> npt.NDArray[np.float32]:
        assert self.runner is not None
        return self.runner.logits(batch, copy=False)  # as the batch loop reads them: used before the next forward

    @property
    def compute_seconds(self) -> tuple[float, float]:
        """Wall and calling-thread CPU seconds spent in ggml's graph compute so far."""
        rt = self.backend.runtime
        return rt.compute_seconds, rt.compute_thread_seconds

    def _drop(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.cache.close()
            self.runner = self.cache = None

    def close(self) -> None:
        self._drop()
        self.backend.close()


def prefill(engine: Engine, n_seq: int) -> tuple[list[int], float]:
    """Every sequence's prompt in one batch; each sequence's first generated token, and the seconds taken."""
    toks, pos, seqs, outs = [], [], [], []
    for s in range(n_seq):
        toks += prompt_tokens(engine.n_vocab, N_PROMPT, seed=s)
        pos += list(range(N_PROMPT))
        seqs += [s] * N_PROMPT
        outs.append(len(toks) - 1)
    batch = Batch(np.asarray(toks, np.int32), np.asarray(pos, np.int32), np.asarray(seqs, np.int32),
                  np.asarray(outs, np.int32))
    t0 = time.perf_counter()
    first = [int(t) for t in np.argmax(engine.forward(batch), axis=1)]
    return first, time.perf_counter() - t0


def decode(engine: Engine, first: list[int], n_steps: int, python: list[float] | None = None) -> float:
    """n_steps forwards of one greedy token per sequence; returns the elapsed seconds. With `python` (our engine
    only), each step's wall time outside ggml's graph compute is appended to it."""
    n_seq = len(first)
    last = list(first)
    seqs = np.arange(n_seq, dtype=np.int32)
    outs = np.arange(n_seq, dtype=np.int32)
    rt = engine.backend.runtime if python is not None and isinstance(engine, Ours) else None
    t0 = time.perf_counter()
    for step in range(n_steps):
        t_step, c_step = time.perf_counter(), rt.compute_seconds if rt is not None else 0.0
        pos = np.full(n_seq, N_PROMPT + step, dtype=np.int32)
        logits = engine.forward(Batch(np.asarray(last, np.int32), pos, seqs, outs))
        last = [int(t) for t in np.argmax(logits, axis=1)]
        if rt is not None and python is not None:
            python.append(time.perf_counter() - t_step - (rt.compute_seconds - c_step))
    return time.perf_counter() - t0


class Best:
    """The best (lowest) seconds seen per measure, and what came with that run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.extra: dict[str, dict[str, float]] = {}

    def add(self, key: str, seconds: float, tokens: int, **extra: float) -> None:
        if seconds < self.seconds.get(key, float("inf")):
            self.seconds[key] = seconds
            self.tokens[key] = tokens
            self.extra[key] = extra

    def rates(self) -> dict[str, float]:
        """tokens/s per measure."""
        return {key: self.tokens[key] / s for key, s in self.seconds.items()}


def run_decode(engine: Engine, n_seq: int, best: Best, key: str) -> None:
    engine.reset()
    first, _ = prefill(engine, n_seq)
    if isinstance(engine, Ours):
        (wall0, cpu0), n_prep = engine.compute_seconds, len(engine.prepare_seconds)
        built0 = engine.runner.n_built if engine.runner else 0
        thread0 = time.thread_time()
    steps: list[float] = []
    elapsed = decode(engine, first, N_DECODE, steps)
    if isinstance(engine, Ours):
        assert engine.runner is not None
        thread_cpu = time.thread_time() - thread0
        wall1, cpu1 = engine.compute_seconds
        best.add(key, elapsed, N_DECODE * n_seq, python=(elapsed - (wall1 - wall0)) / N_DECODE,
                 python_median=statistics.median(steps), python_first=steps[0],
                 python_cpu=(thread_cpu - (cpu1 - cpu0)) / N_DECODE,
                 prepare=statistics.median(engine.prepare_seconds[n_prep:]),
                 built=engine.runner.n_built - built0, threads=engine.backend.runtime.threads_now)
    else:
        best.add(key, elapsed, N_DECODE * n_seq)


@contextmanager
def busy_process() -> Iterator[None]:
    """One competing process that spins on a core for the duration (started and ended here, by its handle)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it get going
        yield
    finally:
        proc.kill()
        proc.wait()


def bench_model(path: Path, threads: int, repeats: int, *, unfused: bool, fast_kernels: bool,
                reuse: bool, row_matmul: bool, row_attention: bool) -> tuple[Best, Best | None]:
    kw: dict[str, Any] = dict(unfused=unfused, fast_kernels=fast_kernels, reuse=reuse, row_matmul=row_matmul,
                              row_attention=row_attention)
    ours, ours1 = Ours(path, threads, **kw), Ours(path, 1, **kw)
    theirs = (llamacpp.LlamaCpp(path, threads, N_CTX_SEQ * max(SEQS), N_BATCH, max(SEQS))
              if llamacpp.available() else None)
    engines: list[tuple[Engine, Best]] = [(ours, Best())]
    if theirs is not None:
        engines.append((theirs, Best()))
    try:
        ours.reset()
        prefill(ours, 1)  # warm-up (page cache, first allocations)
        for _ in range(repeats):
            for engine, best in engines:
                engine.reset()
                best.add("prefill", prefill(engine, 1)[1], N_PROMPT)
                for n_seq in SEQS:
                    run_decode(engine, n_seq, best, f"decode{n_seq}")
        # The quiet 1-thread figure right before each contended round: the host's speed drifts by tens of percent
        # over minutes, and the ratio of the two should not measure that drift.
        for _ in range(repeats):
            run_decode(ours1, 1, engines[0][1], "decode1_1thread")
            if theirs is not None:
                theirs.set_threads(1)
                run_decode(theirs, 1, engines[1][1], "decode1_1thread")
                theirs.set_threads(threads)
            with busy_process():
                for engine, best in engines:
                    run_decode(engine, 1, best, "decode1_contended")
    finally:
        ours.close()
        ours1.close()
        if theirs is not None:
            theirs.close()
    return engines[0][1], engines[1][1] if theirs is not None else None


def table(ours: Best, theirs: Best | None, threads: int) -> str:
    a, b = ours.rates(), theirs.rates() if theirs is not None else {}
    rows: list[tuple[str, float | None, float | None]] = [
        (f"prefill, {N_PROMPT}-token prompt (tok/s)", a.get("prefill"), b.get("prefill"))]
    for n in SEQS:
        rows.append((f"decode, {n} seq{'s' if n > 1 else ''} x {N_DECODE} tokens (tok/s)", a.get(f"decode{n}"),
                     b.get(f"decode{n}")))
    def scale(r: dict[str, float]) -> float | None:
        return r["decode4"] / r["decode1"] if "decode4" in r and "decode1" in r else None
    rows.append(("4 seqs / 1 seq decode (x)", scale(a), scale(b)))
    rows.append((f"decode, 1 seq, {threads} threads, one busy process (tok/s)", a.get("decode1_contended"),
                 b.get("decode1_contended")))
    out = ["| measure | ollama-pyrunner | llama.cpp | ours / llama.cpp |", "|---|---:|---:|---:|"]
    for label, x, y in rows:
        ratio = f"{x / y:.2f}" if x is not None and y else "n/a"
        out.append(f"| {label} | {_fmt(x)} | {_fmt(y)} | {ratio} |")
    quiet1, quiet1_b = a.get("decode1_1thread"), b.get("decode1_1thread")
    contended = a.get("decode1_contended")
    ratio1 = f"{quiet1 / quiet1_b:.2f}" if quiet1 and quiet1_b else "n/a"
    out.append(f"| decode, 1 seq, 1 thread (tok/s) | {_fmt(quiet1)} | {_fmt(quiet1_b)} | {ratio1} |")
    if quiet1 and contended:
        out.append(f"| contended {threads}-thread / 1-thread decode (x) | {contended / quiet1:.2f} | | |")
    for n in SEQS:
        extra = ours.extra.get(f"decode{n}", {})
        if extra:
            out.append(f"| Python per decode step, {n} seq{'s' if n > 1 else ''} (µs): mean wall / median wall / "
                       f"mean CPU / cache prepare | {extra['python'] * 1e6:.0f} / {extra['python_median'] * 1e6:.0f} / "
                       f"{extra['python_cpu'] * 1e6:.0f} / {extra['prepare'] * 1e6:.0f} | | |")
    extra = ours.extra.get("decode1", {})
    if extra:
        out.append(f"| Python of the first decode step (builds its graph), 1 seq (µs) | "
                   f"{extra['python_first'] * 1e6:.0f} | | |")
    extra = ours.extra.get("decode1", {})
    if extra:
        out.append(f"| graphs built in {N_DECODE} decode steps, 1 seq | {extra['built']:.0f} | | |")
        out.append(f"| threads the governor ran the last 1-seq decode step with | {extra['threads']:.0f} | | |")
    return "\n".join(out)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", help="GGUF file (repeatable; default: SmolLM2, Gemma 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per measure; the best is reported")
    ap.add_argument("--unfused", action="store_true", help="unfused softmax attention instead of flash_attn_ext")
    ap.add_argument("--fast-kernels", action="store_true",
                    help="ggml's batch-shape-dependent kernels (tiled/split attention, repacked weights)")
    ap.add_argument("--no-reuse", action="store_true", help="build every step's graph (no graph reuse)")
    ap.add_argument("--row-attention", action="store_true",
                    help="the row attention kernel (ggml/row_attention.c) for F16 KV caches instead of ggml's")
    ap.add_argument("--ggml-matmul", action="store_true",
                    help="ggml's reference mat-mul for Q4_1/Q8_0/Q4_K/Q6_K weights instead of the row kernels")
    args = ap.parse_args(argv)
    models = args.model or [m for m in DEFAULT_MODELS if m.exists()]
    missing = [m for m in models if not m.exists()]
    if missing or not models:
        print(f"model not found: {missing or DEFAULT_MODELS[0]} (run `make models`)", file=sys.stderr)
        return 2
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, threads {args.threads}, "
          f"KV cache f16, best of {args.repeats}, Q4_1/Q8_0/Q4_K/Q6_K mat-mul: "
          f"{'ggml reference' if args.ggml_matmul else 'row kernels'}, attention: "
          f"{'row kernel' if args.row_attention else 'ggml flash_attn_ext'}" + ("" if llamacpp.available() else
                                                      "; llama_cpp not importable: its column is n/a"))
    for path in models:
        ours, theirs = bench_model(path, args.threads, args.repeats, unfused=args.unfused,
                                   fast_kernels=args.fast_kernels, reuse=not args.no_reuse,
                                   row_matmul=not args.ggml_matmul, row_attention=args.row_attention)
        print(f"\n{path.name}\n")
        print(table(ours, theirs, args.threads))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
