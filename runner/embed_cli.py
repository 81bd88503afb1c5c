"""`ollama-pyrunner embed --model PATH TEXT…`: one JSON array (pooled, un-normalized) per input, one per line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence


def run_embed(argv: Sequence[str]) -> int:
    from runner.cli import Loaded
    from runner.engine import Engine

    p = argparse.ArgumentParser(prog="ollama-pyrunner embed")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("texts", nargs="+")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        loaded = Loaded(args.model, args.threads)
    except Exception as e:
        print(f"error loading model: {e}", file=sys.stderr)
        return 1
    engine = Engine(loaded.backend, loaded.model, loaded.tokenizer, n_ctx=2048, n_batch=512, parallel=1)
    if not engine.can_embed:
        print("error: this model does not support embeddings", file=sys.stderr)
        return 1
    try:
        engine.start()  # warms up first
    except Exception as e:
        print(f"error loading model: {e}", file=sys.stderr)
        return 1
    status = 0
    for text in args.texts:
        done = threading.Event()
        result: list[list[float] | str] = []

        def reply(r: list[float] | str) -> None:
            result.append(r)
            done.set()

        engine.submit_embedding(text, reply)
        done.wait()
        if isinstance(result[0], str):
            print(f"error: {result[0]}", file=sys.stderr)
            status = 1
        else:
            print(json.dumps(result[0]), flush=True)
    engine.close()
    return status
