"""`ollama-pyrunner rpc-server`: ggml's RPC server (from the same pinned ggml as the runner) on this host's CPU.

A runner started with `--rpc host:port` places layers here. The server executes whatever graphs a client sends:
it must only be reachable from trusted hosts, so it binds 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from runner.flags import FAST_KERNELS_ENV


def run_rpc_server(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ollama-pyrunner rpc-server",
        description="Serve this host's CPU to runners started with --rpc. It runs any graph a client sends: "
                    "expose it to trusted hosts only.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--mem", type=int, default=0, metavar="MiB",
                   help="memory to report to clients (default: the host's free memory)")
    p.add_argument("--fast-kernels", action="store_true", default=os.environ.get(FAST_KERNELS_ENV, "") in
                   ("1", "t", "T", "TRUE", "true", "True"),
                   help="ggml's batch-shape-dependent CPU kernels; must match the runner's choice, or the remote "
                        f"layers compute other bits than local ones would (default: ${FAST_KERNELS_ENV})")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port}: must be 1..65535")
    if args.threads < 1 or args.mem < 0:
        p.error("--threads must be at least 1 and --mem at least 0")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: rpc-server on {args.host} runs any graph a client sends: keep it reachable from trusted "
              "hosts only", file=sys.stderr, flush=True)
    from ggml import rpc
    # ggml's accept loop never returns to Python: let Ctrl-C end the process as a C program's would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        rc = rpc.serve(args.host, args.port, args.threads, use_ref=not args.fast_kernels, mem_bytes=args.mem << 20)
    except rpc.RpcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"error: rpc-server could not serve on {args.host}:{args.port} (code {rc}; see above)", file=sys.stderr)
    return 1
