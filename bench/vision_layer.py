"""What a vision tower costs on this machine: one encoder layer of a real tower's size (random F32 weights) over one
image's tokens, timed, with its GFLOP/s and the whole tower's time projected from it.

    python bench/vision_layer.py [--threads N] [--tower mllama|mllama-1tile|siglip] [--repeat 2]

mllama (Llama 3.2 Vision 11B): d 1280, ff 5120, 16 heads, 40 layers (32 local + 8 global), always over 4 tiles of
1601 tokens padded to 1608 = 6432 tokens (Ollama and Hugging Face run the padded tiles too); `mllama-1tile` times
the same layer over one tile (1608 tokens; far less memory: attention scores are n^2 * heads floats).
siglip (Gemma 3's So400m): d 1152, ff 4304, 16 heads, 27 layers, 4096 patches.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ggml import Runtime, RuntimeOptions  # noqa: E402
from ggml.context import GgmlContext  # noqa: E402
from ml.nn import LayerNorm, Linear  # noqa: E402
from models.vision.mllama_vision import MllamaVisionParams, VisionLayer  # noqa: E402

TOWERS = {  # d, ff, heads, layers, tokens
    "mllama": (1280, 5120, 16, 40, 4 * 1608),
    "mllama-1tile": (1280, 5120, 16, 40, 1608),
    "siglip": (1152, 4304, 16, 27, 4096),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tower", choices=sorted(TOWERS), default="mllama-1tile")
    p.add_argument("--repeat", type=int, default=2, help="timed runs; the best is reported")
    args = p.parse_args()
    d, ff, heads, layers, n = TOWERS[args.tower]
    rt = Runtime(RuntimeOptions(threads=args.threads))
    rng = np.random.default_rng(0)
    ctx = GgmlContext(rt, 256)

    def lin(n_in: int, n_out: int) -> Linear:
        w = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        return Linear(weight=ctx.from_numpy(w), bias=ctx.from_numpy(np.zeros(n_out, np.float32)))

    def norm() -> LayerNorm:
        return LayerNorm(weight=ctx.from_numpy(np.ones(d, np.float32)), bias=ctx.from_numpy(np.zeros(d, np.float32)))

    layer = VisionLayer(attn_norm=norm(), attn_q=lin(d, d), attn_k=lin(d, d), attn_v=lin(d, d),
                        attn_output=lin(d, d), ffn_norm=norm(), ffn_up=lin(d, ff), ffn_down=lin(ff, d))
    params = MllamaVisionParams(d, heads, 1, 1, ff, 560, 14, 4, 1e-5, (), d)
    out = layer.forward(ctx, ctx.from_numpy(rng.standard_normal((n, d)).astype(np.float32)), params)
    graph = ctx.forward(out)
    best = float("inf")
    for _ in range(max(1, args.repeat)):
        t = time.perf_counter()
        graph.compute(out)
        best = min(best, time.perf_counter() - t)
    ctx.close()
    flop = 2 * n * (4 * d * d + 2 * d * ff) + 4 * n * n * d  # projections and MLP, then scores and weighted sum
    print(f"{args.tower}: one layer over {n} tokens, F32, {args.threads} threads: {best:.2f} s, {flop / 1e9:.0f} GFLOP, "
          f"{flop / best / 1e9:.1f} GFLOP/s; {layers} layers ~ {best * layers:.0f} s per image")


if __name__ == "__main__":
    main()
