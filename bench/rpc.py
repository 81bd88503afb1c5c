"""What ggml's RPC backend costs per token: decode (and prefill) with the model in this process vs split local /
remote / remote over two `ollama-pyrunner rpc-server` processes on loopback.

    .venv/bin/python bench/rpc.py [--model PATH] [--threads N] [--repeats 3]

Each rpc-server gets the same --threads as the local process. Best of `--repeats` runs each: prefill of a
128-token prompt, then 64 greedy decode steps. Prints a markdown table with the ratio to in-process and the
added milliseconds per decoded token (two network hops and two remote graph launches per token).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.generate import DEFAULT_MODEL, Bench, N_DECODE, N_PROMPT  # noqa: E402
from ggml import rpc  # noqa: E402
from ggml.backend import load_backend  # noqa: E402
from ggml.runtime import RuntimeOptions  # noqa: E402
from models import load_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "rpc-server", "--port", str(port), "--threads",
                             str(threads)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            rpc.probe(endpoint, timeout_s=2)
            return proc, endpoint
        except rpc.RpcError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class SplitBench(Bench):
    def __init__(self, path: Path, threads: int, endpoints: tuple[str, ...]) -> None:
        self.fused = True
        opts = RuntimeOptions(threads=threads, rpc=endpoints, tensor_split=(1.0,) * (1 + len(endpoints)))
        self.backend = load_backend(path, opts)
        self.model = load_model(self.backend)
        self.n_vocab = int(self.model.params.n_vocab)


def measure(b: Bench, repeats: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s), best of `repeats`."""
    best_p = best_d = 0.0
    for _ in range(repeats):
        cache = b.new_cache()
        t0 = time.perf_counter()
        first = b.prefill(cache, 1)
        prefill_s = time.perf_counter() - t0
        decode_s = b.decode(cache, first, N_DECODE)
        cache.close()
        best_p, best_d = max(best_p, N_PROMPT / prefill_s), max(best_d, N_DECODE / decode_s)
    return best_p, best_d


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    local = Bench(args.model, args.threads)
    rows = [("in-process", *measure(local, args.repeats))]
    local.backend.close()
    servers = [start_server(args.threads) for _ in range(2)]
    try:
        split = SplitBench(args.model, args.threads, tuple(e for _, e in servers))
        rows.append(("local / rpc / rpc (1,1,1)", *measure(split, args.repeats)))
        split.backend.close()
    finally:
        for proc, _ in servers:
            proc.kill()
            proc.wait()
    base_p, base_d = rows[0][1], rows[0][2]
    print(f"model {args.model.name}, {args.threads} thread(s) per process, prompt {N_PROMPT}, decode {N_DECODE}\n")
    print("| placement | prefill tok/s | decode tok/s | decode vs in-process | added ms/token |")
    print("|---|---:|---:|---:|---:|")
    for name, pf, dec in rows:
        added = 1000 / dec - 1000 / base_d
        print(f"| {name} | {pf:.1f} | {dec:.1f} | {dec / base_d:.2f}x | {added:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
