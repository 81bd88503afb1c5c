"""Micro-benchmarks of the ggml binding: GEMM and mat-vec GFLOP/s (f32 and Q4_K, plain and CPU_REPACK weights) next
to numpy on the same shapes, and the Python cost of building graphs.

    python bench/ops.py [--threads N] [--no-large] [--repeat 3]

numpy multiplies f32 (for Q4_K: the dequantized weights in f32), using as many BLAS threads as --threads. Every
figure is the best of --repeat timed runs after one warm-up (mat-vec: of --repeat x 20 single calls). ggml timings
go through `ctx.compute(out)` as the runner calls it (scheduler allocation + compute + copying the output out).
Prints markdown tables.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast-kernels", action="store_true",
                   help="ggml's batch-shape-dependent kernels, with the CPU_REPACK weight layout")
    p.add_argument("--threads", type=int, default=2, help="ggml threads and numpy BLAS threads (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is reported")
    p.add_argument("--no-large", action="store_true", help="skip the 4096^3 GEMM")
    p.add_argument("--graph-ops", type=int, default=2000, help="ops per graph in the graph-building benchmark")
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:  # BLAS reads these when numpy is first imported
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(ARGS.threads))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from gguf.constants import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from ggml import Runtime, RuntimeOptions  # noqa: E402
from ggml.context import GgmlContext  # noqa: E402
from ml.backend import Tensor  # noqa: E402
from ml.dtype import DType  # noqa: E402


def best(fn: Callable[[], object], repeat: int, inner: int = 1) -> float:
    """Seconds per call of `fn`: the fastest of `repeat` runs of `inner` timed calls each (every call timed on its
    own, so a time slice lost to another process spoils one sample, not the figure), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat * inner):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class Row:
    def __init__(self, name: str, shape: str, ggml_s: float, numpy_s: float | None, flops: float,
                 note: str = "") -> None:
        self.name, self.shape, self.note = name, shape, note
        self.ggml_s, self.numpy_s, self.flops = ggml_s, numpy_s, flops

    def cells(self) -> list[str]:
        g = self.flops / self.ggml_s / 1e9
        n = "" if self.numpy_s is None else f"{self.flops / self.numpy_s / 1e9:.1f}"
        nms = "" if self.numpy_s is None else f"{self.numpy_s * 1e3:.2f}"
        ratio = "" if self.numpy_s is None else f"{self.numpy_s / self.ggml_s:.2f}x"
        return [self.name, self.shape, f"{g:.1f}", n, ratio, f"{self.ggml_s * 1e3:.2f}", nms, self.note]


def matmul_rows(rt: Runtime, m: int, k: int, n: int, repeat: int, inner: int) -> list[Row]:
    """ggml: weight [k, m] x activations [k, n] -> [m, n]; numpy: x (n, k) @ W.T (k, m)."""
    g = np.random.default_rng(0)
    w = (g.standard_normal((m, k)) * 0.05).astype(np.float32)
    x = g.standard_normal((n, k)).astype(np.float32)
    flops = 2.0 * m * n * k
    shape = f"{m}x{k} * {k}x{n}"
    kind = "GEMM" if n > 1 else "mat-vec"
    rows: list[Row] = []

    wt = np.ascontiguousarray(w.T)
    numpy_f32 = best(lambda: x @ wt, repeat, inner)

    variants: list[tuple[str, DType, object]] = [("f32", DType.F32, None), ("Q4_K", DType.Q4_K, None)]
    if rt.repack_buft is not None:
        variants.append(("Q4_K repack", DType.Q4_K, rt.repack_buft))
    deq_t: np.ndarray | None = None
    numpy_q: float | None = None
    for label, dtype, buft in variants:
        wctx = GgmlContext(rt, 4, buft=buft) if buft is not None else GgmlContext(rt, 4)
        ctx = GgmlContext(rt, 16)
        try:
            wq = wctx.from_numpy(w, dtype)
            out = wq.matmul(ctx, ctx.from_numpy(x))
            ctx.forward(out)
            secs = best(lambda: ctx.compute(out), repeat, inner)
            ref_s: float | None
            if dtype == DType.F32:
                ref_s, note = numpy_f32, ""
            else:
                if deq_t is None:
                    # the comparison multiplies the very values ggml holds (dequantized by gguf)
                    raw = GgmlContext(rt, 4)
                    try:
                        deq = dequantize(raw.from_numpy(w, dtype).numpy(), GGMLQuantizationType.Q4_K)
                    finally:
                        raw.close()
                    deq_t = np.ascontiguousarray(deq.astype(np.float32).T)
                    numpy_q = best(lambda: x @ deq_t, repeat, inner)
                ref_s, note = numpy_q, "numpy: f32 dequantized"
            rows.append(Row(f"{kind} {label}", shape, secs, ref_s, flops, note))
        finally:
            ctx.close()
            wctx.close()
    return rows


def graph_build_rows(rt: Runtime, n_ops: int, repeat: int) -> list[tuple[str, float, float]]:
    """(graph, build µs/op, compute µs/op) for a chain of `n_ops` small ops."""
    out: list[tuple[str, float, float]] = []
    g = np.random.default_rng(1)
    xa = g.standard_normal((4, 64)).astype(np.float32)
    wa = g.standard_normal((64, 64)).astype(np.float32)

    def chain_add(ctx: GgmlContext) -> Tensor:
        x: Tensor = ctx.from_numpy(xa)
        b = ctx.from_numpy(xa)
        for _ in range(n_ops):
            x = x.add(ctx, b)
        return x

    def chain_mixed(ctx: GgmlContext) -> Tensor:
        # a transformer-block-like mix: norm, matmul, rope-free attention pieces, activations (7 ops a round)
        x: Tensor = ctx.from_numpy(xa)
        w = ctx.from_numpy(wa)
        for _ in range(n_ops // 7):
            h = x.rms_norm(ctx, 1e-5).mul(ctx, x)
            h = w.matmul(ctx, h).softmax(ctx, None, 0.125)
            x = h.silu(ctx).scale(ctx, 0.5).add(ctx, x)
        return x

    for name, build, n in (("add chain", chain_add, n_ops), ("mixed chain", chain_mixed, n_ops // 7 * 7)):
        builds, computes = [], []
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            ctx = GgmlContext(rt, n_ops + 64)
            y = build(ctx)
            ctx.forward(y)
            t1 = time.perf_counter()
            ctx.compute(y)
            t2 = time.perf_counter()
            ctx.close()
            builds.append(t1 - t0)
            computes.append(t2 - t1)
        out.append((f"{name} ({n} ops)", min(builds[1:]) / n * 1e6, min(computes[1:]) / n * 1e6))
    return out


def main(args: argparse.Namespace) -> int:
    rt = Runtime(RuntimeOptions(threads=args.threads, fast_kernels=args.fast_kernels))
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        # the short, contention-sensitive figures first; the 4096^3 GEMM last
        rows += matmul_rows(rt, 2048, 2048, 1, args.repeat, 20)
        rows += matmul_rows(rt, 4096, 4096, 1, args.repeat, 20)
        graph = graph_build_rows(rt, args.graph_ops, args.repeat)
        rows += matmul_rows(rt, 2048, 2048, 512, args.repeat, 1)
        if not args.no_large:
            rows += matmul_rows(rt, 4096, 4096, 4096, args.repeat, 1)
    finally:
        rt.close()
    head = ["op", "shape (W * x)", "ggml GFLOP/s", "numpy GFLOP/s", "ggml speedup", "ggml ms", "numpy ms", "note"]
    repack = "yes" if any("repack" in r.name for r in rows) else (
        "no (needs AVX2)" if args.fast_kernels else "no (needs --fast-kernels)")
    kernels = "fast (batch-shape-dependent)" if args.fast_kernels else "batch-invariant (the runner's default)"
    print(f"threads={args.threads}, best of {args.repeat}, kernels: {kernels}, CPU_REPACK={repack}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(r.cells()) + " |")
    print("\n| graph | build µs/op (Python) | compute µs/op |")
    print("|---|---|---|")
    for name, b, c in graph:
        print(f"| {name} | {b:.2f} | {c:.2f} |")
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    assert ARGS is not None
    sys.exit(main(ARGS))
