"""The vision encoder's speed: a SigLIP tower with Gemma 3's projector, random weights, timed through the model's
`encode_image` as the runner calls it (graph build + compute + copying the soft tokens out), and the op count.

    python bench/vision.py [--threads N] [--side 32] [--layers 1] [--f16] [--fast-kernels] [--repeat 3]

Width, MLP and heads are SigLIP-So400m's (Gemma 3 4B..27B: d 1152, ff 4304, 16 heads, patch 14); `--side` is the
patch grid's side (Gemma 3 uses 64: 896 px, 4096 patches) and `--layers` how many of the 27 blocks to build; the
time of the whole tower is projected from the measured blocks (27 x per-block time, plus the rest). `--f16`
stores the matrices in F16, as llama.cpp's mmproj files and Ollama's gemma3 files do. Also times the same
layer's matmuls as bare ggml GEMMs, so the encoder's GFLOP/s can be set against what ggml's GEMM reaches.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-GGUF writer the model tests use

import gguf  # noqa: E402

from ggml import RuntimeOptions, load_backend  # noqa: E402
from ggml.context import GgmlContext  # noqa: E402
from ml.dtype import DType  # noqa: E402
from models import load_model  # noqa: E402
from tiny_gguf import VisionSpec, gemma3_spec, make_vision_weights, write_gguf  # noqa: E402

D, FF, HEADS, PATCH, FULL_LAYERS = 1152, 4304, 16, 14, 27


def block_flops(n: int, d: int = D, ff: int = FF) -> float:
    """Multiply-adds x 2 of one pre-norm block over n patches: q, k, v, o projections, the two MLP matrices,
    and attention's two n x n products (norms, softmax, GELU and adds are ignored: under 1%)."""
    return 2.0 * n * (4 * d * d + 2 * d * ff) + 2.0 * 2 * n * n * d


def rest_flops(n: int, tokens: int, n_text: int, d: int = D) -> float:
    """Patch embedding (conv as im2col GEMM) and the projection of the pooled tokens."""
    return 2.0 * n * 3 * PATCH * PATCH * d + 2.0 * tokens * d * n_text


def best(fn: object, repeat: int) -> float:
    assert callable(fn)
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--side", type=int, default=32, help="patches per side (Gemma 3: 64)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--f16", action="store_true", help="matrices stored in F16 (as real files have them)")
    p.add_argument("--fast-kernels", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--n-text", type=int, default=2560, help="text width the projector maps to (4B: 2560)")
    args = p.parse_args()
    n = args.side * args.side
    tokens = (args.side // 4) ** 2 if args.side % 4 == 0 else 1
    vs = VisionSpec(n_embd=D, n_head=HEADS, n_layer=args.layers, n_ff=FF, image_size=args.side * PATCH,
                    patch_size=PATCH, tokens_per_image=tokens)
    text = gemma3_spec(n_embd=args.n_text, n_layer=1, head_dim=64, n_head=4, n_head_kv=1, n_ff=64)
    vision = make_vision_weights(vs, text.n_embd, seed=0)
    types = {k: gguf.GGMLQuantizationType.F16 for k, v in vision.items() if v.ndim >= 2 and args.f16
             and "position" not in k}
    opts = RuntimeOptions(threads=args.threads, fast_kernels=args.fast_kernels, adaptive_threads=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "siglip.gguf"
        write_gguf(path, text.with_(extra_kv=vs.kv()), add=vision, types=types)
        backend = load_backend(path, opts)
    try:
        model = load_model(backend)
        pixels = np.random.default_rng(0).uniform(-1, 1, (3, vs.image_size, vs.image_size)).astype(np.float32)

        def encode() -> None:
            ctx = backend.new_context()
            try:
                out = model.encode_image(ctx, pixels)
                ctx.forward(out).compute(out)
                out.numpy()
            finally:
                ctx.close()

        seconds = best(encode, args.repeat)
        gemm = _gemm_seconds(backend.runtime, n, DType.F16 if args.f16 else DType.F32, args.repeat)
    finally:
        backend.close()
    flops = args.layers * block_flops(n) + rest_flops(n, tokens, text.n_embd)
    full = FULL_LAYERS * block_flops(n) + rest_flops(n, tokens, text.n_embd)
    gemm_flops = 2.0 * n * (4 * D * D + 2 * D * FF)
    print(f"| threads | patches | layers | weights | encode s | GFLOP | GFLOP/s | layer GEMMs GFLOP/s | "
          f"27 layers: TFLOP | projected s |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.threads} | {n} | {args.layers} | {'F16' if args.f16 else 'F32'} | {seconds:.3f} | "
          f"{flops / 1e9:.1f} | {flops / seconds / 1e9:.1f} | {gemm_flops / gemm / 1e9:.1f} | {full / 1e12:.2f} | "
          f"{seconds * full / flops:.0f} |")


def _gemm_seconds(runtime: object, n: int, wtype: DType, repeat: int) -> float:
    """One block's six weight GEMMs ([D, D] x 4, [D, FF], [FF, D] against n patch columns) as one bare graph."""
    rng = np.random.default_rng(1)
    ctx = GgmlContext(runtime)  # type: ignore[arg-type]
    try:
        x = ctx.from_numpy(rng.standard_normal((n, D)).astype(np.float32))
        h = ctx.from_numpy(rng.standard_normal((n, FF)).astype(np.float32))
        outs = []
        for n_in, n_out, act in [(D, D, x)] * 4 + [(D, FF, x), (FF, D, h)]:
            w = ctx.from_numpy(rng.standard_normal((n_out, n_in)).astype(np.float32), wtype)
            outs.append(w.matmul(ctx, act))
        g = ctx.forward(*outs)
        return best(lambda: g.compute(*outs), repeat)
    finally:
        ctx.close()


if __name__ == "__main__":
    main()
