"""Cost of grammar-constrained sampling: decode tokens/s with Ollama's `format: "json"` grammar in force against
unconstrained decode, per model, plus the constraint's own cost per token and the one-time compile costs.

    .venv/bin/python bench/grammar.py [--models smollm2,gemma3] [--threads 2] [--repeats 5] [-n 64]

For each model (one sequence, greedy, the engine's batch loop driven directly so nothing else is timed):
  * decode tok/s unconstrained and with the JSON grammar: best of `--repeats` runs each, the two interleaved so
    that a busy machine slows both alike; the ratio is the figure to watch (goal: >= 0.90);
  * constraint cost per token in microseconds: CPU time inside Constraint.sample minus the sampler's own in it
    (token check, mask and resample on rejection, advancing the grammar), median over the constrained runs;
    the share of steps that needed the mask;
  * compile cost: building the llguidance view of the vocabulary (once per model) and compiling the JSON grammar
    and each schema fixture's GBNF (per request), in milliseconds.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.cli import Loaded  # noqa: E402
from runner.engine import Engine, Event  # noqa: E402
from runner.grammar import OLLAMA_JSON_GRAMMAR, Constraint, GrammarCompiler  # noqa: E402
from runner.protocol import CompletionRequest  # noqa: E402
from runner.sampling import Sampler, SamplerParams  # noqa: E402

CACHE_DIR = Path(os.environ.get("OLLAMA_PYRUNNER_CACHE", Path.home() / ".cache" / "ollama-pyrunner"))
MODELS_DIR = Path(os.environ.get("MODELS_DIR", CACHE_DIR / "models"))
MODELS = {"smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf",
                      "<|im_start|>user\nList three cities with their countries and populations as JSON."
                      "<|im_end|>\n<|im_start|>assistant\n"),
          "gemma3": ("gemma-3-270m-q4_k_m.gguf",
                     "<start_of_turn>user\nList three cities with their countries and populations as JSON."
                     "<end_of_turn>\n<start_of_turn>model\n")}
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "data" / "grammar"


class Timer:
    """Accumulates the CPU time of the calling thread spent in a wrapped method (bench-only instrumentation; CPU
    time, so that a busy machine's preemptions do not count)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.thread_time() - t0
                self.calls += 1
        return timed


def decode(engine: Engine, prompt: str, n: int, grammar: str) -> tuple[float, int]:
    """One greedy generation driven step by step; (seconds from the first sampled token to the last, tokens)."""
    events: list[Event] = []
    engine.submit(CompletionRequest(prompt=prompt, images=(), num_predict=n, num_keep=0, stop=(), grammar=grammar,
                                    sampling=SamplerParams(temperature=0.0)), events.append)
    while not events or events[-1].done is None:
        engine._admit()
        engine._step()
    final = events[-1]
    assert final.error is None and final.metrics is not None, final.error
    m = final.metrics
    for s in engine.slots:  # the next run starts from an empty cache (no prefix reuse)
        s.inputs = []
    engine._kv().remove(0, 0, None)
    return m.eval_duration_ns / 1e9, m.eval_count - 1


def bench_model(name: str, threads: int, repeats: int, n: int) -> dict[str, float]:
    path, prompt = MODELS[name]
    loaded = Loaded(str(MODELS_DIR / path), threads)
    engine = Engine(loaded.backend, loaded.model, loaded.tokenizer, n_ctx=1024, n_batch=512, parallel=1)
    out: dict[str, float] = {}

    # compile costs (the engine's compiler is fresh: the first compile builds the vocabulary view)
    req = CompletionRequest(prompt="", images=(), num_predict=0, num_keep=0, stop=(), sampling=SamplerParams())
    t0 = time.perf_counter()
    engine.grammars._vocabulary()
    out["vocab_ms"] = (time.perf_counter() - t0) * 1e3
    compiles = []
    schemas = [FIXTURES / (p.name.removesuffix(".schema.json") + ".gbnf") for p in FIXTURES.glob("*.schema.json")]
    for text in [OLLAMA_JSON_GRAMMAR] + [p.read_text() for p in sorted(schemas)]:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            engine.grammars.compile(dataclasses.replace(req, grammar=text))
            best = min(best, time.perf_counter() - t0)
        compiles.append(best * 1e3)
    out["compile_json_ms"] = compiles[0]
    out["compile_schema_ms"] = max(compiles[1:])

    # decode, interleaved; constraint cost from timers around Constraint.sample and Sampler.sample
    in_constraint, in_sampler, masked = Timer(), Timer(), Timer()
    orig_sample, orig_csample, orig_allowed = Sampler.sample, Constraint.sample, Constraint.allowed
    free_rates, json_rates, costs, mask_share = [], [], [], []
    decode(engine, prompt, 8, "")  # warm-up
    for _ in range(repeats):
        dt, k = decode(engine, prompt, n, "")
        free_rates.append(k / dt)
        for t in (in_constraint, in_sampler, masked):
            t.total, t.calls = 0.0, 0
        Constraint.sample = in_constraint.wrap(orig_csample)  # type: ignore[method-assign]
        Sampler.sample = in_sampler.wrap(orig_sample)  # type: ignore[method-assign]
        Constraint.allowed = masked.wrap(orig_allowed)  # type: ignore[method-assign]
        try:
            dt, k = decode(engine, prompt, n, OLLAMA_JSON_GRAMMAR)
        finally:
            Sampler.sample, Constraint.sample, Constraint.allowed = (  # type: ignore[method-assign]
                orig_sample, orig_csample, orig_allowed)
        json_rates.append(k / dt)
        costs.append((in_constraint.total - in_sampler.total) / max(in_constraint.calls, 1) * 1e6)
        mask_share.append(masked.calls / max(in_constraint.calls, 1))
    if engine.cache is not None:  # the loop thread never ran (the bench drives the steps itself)
        engine.cache.close()
    out["free_tps"], out["json_tps"] = max(free_rates), max(json_rates)
    out["ratio"] = out["json_tps"] / out["free_tps"]
    out["cost_us"] = statistics.median(costs)
    out["mask_share"] = statistics.median(mask_share)
    out["vocab"] = float(engine.n_vocab)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("-n", type=int, default=64, help="tokens per decode run")
    args = p.parse_args()
    print(f"threads={args.threads}, best of {args.repeats}, {args.n} greedy tokens per run\n")
    print("| model | vocab | unconstrained tok/s | JSON grammar tok/s | ratio | constraint µs/token | masked steps "
          "| vocab view ms (once) | compile JSON ms | compile schema ms (max) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = bench_model(name, args.threads, args.repeats, args.n)
        print(f"| {name} | {int(r['vocab'])} | {r['free_tps']:.1f} | {r['json_tps']:.1f} | {r['ratio']:.2f} "
              f"| {r['cost_us']:.0f} | {r['mask_share'] * 100:.0f}% | {r['vocab_ms']:.0f} | "
              f"{r['compile_json_ms']:.1f} | {r['compile_schema_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
