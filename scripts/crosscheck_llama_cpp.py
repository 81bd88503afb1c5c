"""Cross-check the tiny random-weight models against llama.cpp itself (outside CI: needs llama-cpp-python built
from the pinned sdist). For each case: the prompt's logits from our runner and from llama.cpp (F32 weights and KV
cache on both sides), and the largest absolute difference relative to the largest logit.

    PYTHONPATH=$PWD .venv/bin/python scripts/crosscheck_llama_cpp.py
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import llama_cpp  # noqa: E402

import test_models_arch as arch  # noqa: E402
import test_models_tiny as tiny  # noqa: E402
from ggml import RuntimeOptions, load_backend  # noqa: E402
from ml.batch import Batch  # noqa: E402
from ml.dtype import DType  # noqa: E402
from models import load_model  # noqa: E402
from tiny_gguf import write_gguf  # noqa: E402

PROMPT = tiny.PROMPT


KV = DType.F32  # both sides: an F16 cache rounds q differently where llama.cpp pre-scales it (phi3)


def ours(path: Path, n_ctx_seq: int) -> np.ndarray:
    backend = load_backend(path, RuntimeOptions(threads=1))
    try:
        model = load_model(backend)
        cache = model.new_cache(flash=False, n_ctx_seq=n_ctx_seq)
        cache.init(backend, KV, 1, 256, 64)
        ctx = backend.new_context()
        try:
            out = model.forward(ctx, Batch.single(PROMPT, all_logits=True), cache)
            ctx.forward(out).compute(out)
            return np.array(out.numpy(), dtype=np.float64).reshape(len(PROMPT), -1)
        finally:
            ctx.close()
            cache.close()
    finally:
        backend.close()


def theirs(path: Path, n_ctx: int) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=64, n_threads=1, logits_all=True, verbose=False,
                          flash_attn=False, type_k=int(KV), type_v=int(KV))
    llm.eval(PROMPT)
    return np.array(llm.scores[:len(PROMPT)], dtype=np.float64)


def cases() -> dict[str, tuple[Any, dict[str, np.ndarray] | None, int]]:
    out: dict[str, tuple[Any, dict[str, np.ndarray] | None, int]] = {}
    for name, spec in tiny.CASES.items():
        out[name] = (spec, None, 0)
    for name, case in arch.CASES.items():
        spec = case.spec
        if name == "mistral3":  # llama.cpp reads the temperature under its own key
            spec = spec.with_(extra_kv={"mistral3.rope.scaling.original_context_length": 4,
                                        "mistral3.attention.temperature_scale": 0.5})
        if name == "llama4":  # llama.cpp fixes chunk and temperature length at 8192 (no effect on 10 tokens)
            spec = spec.with_(extra_kv={k: v for k, v in spec.extra_kv.items()
                                        if "chunk" not in k and "temperature" not in k})
        if name == "phi3-sliding-window":
            continue  # llama.cpp disables Phi-3's window
        if name.startswith("phi3"):  # llama.cpp's context is at least 256: move the original context above it
            spec = spec.with_(extra_kv=dict(spec.extra_kv, **{"phi3.rope.scaling.original_context_length": 512}))
            case = replace(case, n_ctx_seq=256 if name == "phi3-short" else 1024)
        seed = sum(map(ord, name))
        w = case.edit(arch.make_weights(spec, seed), np.random.default_rng(seed + 1))
        out[name] = (spec, w, case.n_ctx_seq)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        for name, (spec, w, n_ctx_seq) in cases().items():
            path = Path(d) / f"{name}.gguf"
            write_gguf(path, spec, w, seed=sum(map(ord, name)))
            n_ctx = n_ctx_seq or 256
            try:
                a, b = ours(path, n_ctx), theirs(path, n_ctx)
            except Exception as e:  # report and go on
                print(f"{name:24s} error: {type(e).__name__}: {e}")
                continue
            diff = float(np.max(np.abs(a - b)))
            rel = diff / float(np.max(np.abs(b)))
            same = bool(np.all(a.argmax(1) == b.argmax(1)))
            print(f"{name:24s} max |diff| {diff:.2e}  relative {rel:.2e}  argmax equal: {same}")


if __name__ == "__main__":
    main()
