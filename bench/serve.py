"""Serving benchmark: a real runner subprocess (as `ollama serve` launches it) under 1, 2 and 4 concurrent clients.

    python bench/serve.py [--model PATH] [--threads 2] [--parallel 4] [--clients 1,2,4] [--tokens 64] [--rounds 3]

Each client sends one P3 /completion (greedy, num_predict --tokens) and reads the NDJSON stream. Every request of
every round gets a prompt of its own (a distinct first sentence), so no prompt is served from the KV cache.
Reported per concurrency level, over all rounds:

* TTFT: request sent -> first streamed line (client side; includes prompt evaluation and the HTTP hop);
* per-stream tok/s: (eval_count - 1) / (last line - first line), i.e. the decode rate one client sees;
  a request can end early on EOS (the mean tokens per request is printed too);
* aggregate tok/s: all generated tokens of a round / the round's wall time (first request sent -> last stream
  done), averaged over rounds.

Prints a markdown table. Timings depend on whatever else runs on the machine; the load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path(os.environ.get("MODELS_DIR", Path(os.environ.get(
    "OLLAMA_PYRUNNER_CACHE", Path.home() / ".cache" / "ollama-pyrunner")) / "models")) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ["the history of Paris", "how bridges are built", "the life of honey bees", "why the sky is blue",
          "the rules of chess", "how bread is baked", "the planets of the solar system", "how rivers form",
          "the invention of the printing press", "how volcanoes erupt", "the migration of birds",
          "how computers store numbers"]


@dataclass
class Result:
    ttft: float  # s
    decode_rate: float  # tok/s after the first token
    tokens: int
    t_sent: float
    t_done: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prompt(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return f"Notes {i}: a long, detailed, numbered list of facts about {topic}.\n\n1."


def _one(client: httpx.Client, prompt: str, n: int) -> Result:
    body = {"Prompt": prompt, "Format": None, "Images": None, "Grammar": "", "Options": {"num_predict": n}}
    t_sent = time.monotonic()
    t_first = t_last = 0.0
    final: dict[str, object] = {}
    with client.stream("POST", "/completion", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()!r}")
        for line in r.iter_lines():
            if not line:
                continue
            now = time.monotonic()
            t_first = t_first or now
            t_last = now
            obj = json.loads(line)
            if obj.get("done"):
                final = obj
    tokens = int(final.get("eval_count", 0))  # type: ignore[call-overload]
    span = t_last - t_first
    return Result(t_first - t_sent, (tokens - 1) / span if span > 0 and tokens > 1 else 0.0, tokens, t_sent, t_last)


def _round(url: str, n_clients: int, n_tokens: int, first_id: int) -> list[Result]:
    results: list[Result | None] = [None] * n_clients
    barrier = threading.Barrier(n_clients)
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=600) as c:
                barrier.wait()
                results[k] = _one(c, _prompt(first_id + k), n_tokens)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"runner exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).json().get("status") == 0:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("runner not ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--ctx-size", type=int, default=4096, help="total KV cells (per slot: ctx-size / parallel)")
    p.add_argument("--clients", default="1,2,4", help="comma-separated concurrency levels")
    p.add_argument("--tokens", type=int, default=64, help="num_predict of every request")
    p.add_argument("--rounds", type=int, default=3, help="rounds per concurrency level")
    args = p.parse_args()
    levels = [int(x) for x in args.clients.split(",")]

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(prefix="bench-serve-", suffix=".stderr")[1])
    cmd = [sys.executable, "-m", "runner.cli", "runner", "--ollama-engine", "--model", str(args.model),
           "--threads", str(args.threads), "--parallel", str(args.parallel), "--ctx-size", str(args.ctx_size),
           "--port", str(port)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        t0 = time.monotonic()
        _wait_ready(proc, url, log)
        t_load = time.monotonic() - t0
        _round(url, 1, 8, 10_000)  # warm-up
        rows = []
        request_id = 0
        for n in levels:
            ttft: list[float] = []
            rate: list[float] = []
            agg: list[float] = []
            tokens = 0
            for _ in range(args.rounds):
                res = _round(url, n, args.tokens, request_id)
                request_id += n
                ttft += [r.ttft for r in res]
                rate += [r.decode_rate for r in res if r.tokens > 1]  # an immediate EOS has no decode rate
                tokens += sum(r.tokens for r in res)
                wall = max(r.t_done for r in res) - min(r.t_sent for r in res)
                agg.append(sum(r.tokens for r in res) / wall)
            rows.append((n, statistics.mean(ttft), max(ttft), statistics.mean(rate), min(rate),
                         statistics.mean(agg), tokens / (args.rounds * n)))
    finally:
        proc.kill()
        proc.wait()

    load = os.getloadavg()
    print(f"runner: {args.model.name}, --threads {args.threads} --parallel {args.parallel} --ctx-size "
          f"{args.ctx_size}; {args.tokens} tokens per request, greedy, {args.rounds} rounds per level; "
          f"ready after {t_load:.1f}s; cpus {os.cpu_count()}, load average {load[0]:.2f} {load[1]:.2f}\n")
    print("| clients | TTFT mean (ms) | TTFT max (ms) | per-stream tok/s (mean) | per-stream tok/s (min) "
          "| aggregate tok/s | tokens/request |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, t_mean, t_max, r_mean, r_min, a, toks in rows:
        print(f"| {n} | {t_mean * 1000:.0f} | {t_max * 1000:.0f} | {r_mean:.1f} | {r_min:.1f} | {a:.1f} | "
              f"{toks:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
