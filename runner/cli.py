"""`ollama-pyrunner`: the runner Ollama launches (`[runner] [--ollama-engine] --model … --port P`), the
llama-server compatible server (`serve …`, or any invocation under the name `llama-server`), plus the
`generate`, `embed` and `convert` tools, and `rpc-server` (ggml's RPC server, for `--rpc`). Reads the environment
once, here, and passes everything down."""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import threading
from pathlib import Path
from collections.abc import Sequence
from typing import Any

SUBCOMMANDS = ("generate", "embed", "convert", "serve", "rpc-server")


def _setup_logging(verbose: bool) -> None:
    # Ollama's key=value style: time=… level=… source=… msg=…
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="time=%(asctime)s level=%(levelname)s source=%(name)s msg=\"%(message)s\"")


class Loaded:
    """A model ready to run: backend, model, tokenizer."""

    def __init__(self, path: str, threads: int, progress: Any = None, n_gpu_layers: int = 0, main_gpu: int = 0,
                 tensor_split: tuple[float, ...] = (), flash: bool = False, fast_kernels: bool = False,
                 rpc: tuple[str, ...] = (), mmproj: str = "", row_attention: bool = False) -> None:
        from ggml import RuntimeOptions, load_backend
        from ml.errors import ModelLoadError
        from models import load_model, takes_projector, widened_types
        from models.tokenizer import tokenizer_from_metadata
        opts = RuntimeOptions(threads=threads, n_gpu_layers=n_gpu_layers, main_gpu=main_gpu,
                              tensor_split=tensor_split, flash_attention=flash, fast_kernels=fast_kernels, rpc=rpc,
                              row_attention=row_attention)
        if mmproj and not takes_projector(architecture_of(path)):
            # Ollama v0.5.12 passed its llama engine's --mmproj to the new engine too: a model that cannot use
            # one serves text, as the Go runner's flag parser would have let it.
            logging.getLogger("runner").warning("ignoring --mmproj %s: %s models take no projector", mmproj,
                                                architecture_of(path))
            mmproj = ""
        self.backend = load_backend(path, opts, progress, widen=widened_types, projector=mmproj or None)
        try:
            self.model = load_model(self.backend)
            try:
                self.tokenizer = tokenizer_from_metadata(self.backend.metadata)
            except (ValueError, TypeError, KeyError, IndexError, ArithmeticError) as e:
                # Everything the tokenizer is built from is file metadata: a bad value is a bad file.
                raise ModelLoadError(f"invalid tokenizer metadata: {type(e).__name__}: {e}") from e
        except BaseException:
            self.backend.close()
            raise


def settle_heap() -> None:
    """After loading: collect once, then freeze what survived (vocabulary, weights' Python objects, compiled
    templates), so the collector's full passes while serving do not walk it again. A full pass over a loaded model's
    heap takes 20-30 ms, long enough to matter on a busy machine, where /health must answer within 200 ms."""
    gc.collect()
    gc.freeze()


def share_the_interpreter() -> None:
    """A server process's threads hand the GIL over after 1 ms instead of Python's default 5 ms: the event loop
    waits less behind the loader's or the engine's Python work (a busy machine stretches every such wait)."""
    sys.setswitchinterval(0.001)


def architecture_of(path: str) -> str:
    """A GGUF's `general.architecture` (metadata only); raises ModelLoadError for a file that is not one."""
    from ml.gguffile import GGUFFile
    with GGUFFile(path) as f:
        return str(f.metadata.get("general.architecture", ""))


def _kv_type(name: str) -> Any:
    from ml.dtype import DType
    return {"": DType.F16, "f16": DType.F16, "q8_0": DType.Q8_0, "q4_0": DType.Q4_0}.get(name.lower(), DType.F16)


def run_runner(argv: Sequence[str]) -> int:
    """The runner process: HTTP up at once, model loaded on a thread, /health reports progress."""
    import uvicorn

    from runner.engine import Engine
    from runner.flags import parse_args
    from runner.responses import ServerStatus
    from runner.server import RunnerState, build_app

    try:
        cfg, unknown = parse_args(list(argv), os.environ)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _setup_logging(cfg.verbose)
    share_the_interpreter()
    log = logging.getLogger("runner")
    if unknown:
        log.warning("ignoring unknown flags: %s", " ".join(unknown))
    if cfg.lora:
        log.warning("LoRA adapters are not supported; ignoring %s", ", ".join(cfg.lora))
    state = RunnerState()
    if cfg.rpc:
        _exit_if_rpc_fails_during_load(state.ready)

    def load() -> None:
        try:
            def progress(p: float) -> None:
                state.progress = p
            loaded = Loaded(cfg.model, cfg.threads, progress, cfg.n_gpu_layers, cfg.main_gpu, cfg.tensor_split,
                            cfg.flash_attn, cfg.fast_kernels, cfg.rpc, cfg.mmproj, cfg.row_attention)
            engine = Engine(loaded.backend, loaded.model, loaded.tokenizer, n_ctx=cfg.ctx_size,
                            n_batch=cfg.batch_size, parallel=cfg.parallel, multiuser=cfg.multiuser_cache,
                            flash=cfg.flash_attn, kv_type=_kv_type(cfg.kv_cache_type if cfg.flash_attn else ""))
            engine.start()  # warms up first: a broken file fails here, before /health says ready
            settle_heap()
            state.engine, state.progress, state.status = engine, 1.0, ServerStatus.READY
            log.info("model loaded; serving on 127.0.0.1:%d", cfg.port)
            print(f"ready: curl -sN 127.0.0.1:{cfg.port}/completion -d "
                  "'{\"Prompt\":\"The capital of France is\",\"Options\":{\"num_predict\":20,\"temperature\":0}}'",
                  file=sys.stderr, flush=True)
        except Exception as e:
            state.status, state.error = ServerStatus.ERROR, str(e)
            print(f"error loading model: {e}", file=sys.stderr, flush=True)
            os._exit(1)  # as the Go runner: a load failure ends the process; stderr carries the reason
        finally:
            state.ready.set()

    threading.Thread(target=load, name="model-load", daemon=True).start()
    app = build_app(state, cfg.dialect)
    uvicorn.run(app, host="127.0.0.1", port=cfg.port, log_level="warning", access_log=False)
    return 0


def _exit_if_rpc_fails_during_load(loaded: threading.Event) -> None:
    """An RPC host that dies while the weights upload parks the loading thread inside ggml (ggml/rpc.py); the
    load then ends here, as any load failure does: the reason on stderr and exit status 1."""
    def watch() -> None:
        from ggml import rpc
        while not loaded.wait(0.25):
            reason = rpc.failure()
            if reason is not None:
                print(f"error loading model: an RPC device failed: {reason}", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="rpc-load-watch", daemon=True).start()


def _read_arg(value: str) -> str:
    """`@path` -> the file's text; anything else as given."""
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    return value


def _format_arg(value: str) -> str | None:
    """--format as the request's `format` field carries it (compact JSON text): "json", or a schema object."""
    if not value:
        return None
    if value == "json":
        return '"json"'
    text = _read_arg(value)
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--format: not JSON: {e}") from e
    if not isinstance(schema, dict):
        raise ValueError('--format: expected "json" or a JSON schema object')
    return json.dumps(schema, separators=(",", ":"))


def prompt_with_images(prompt: str, paths: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
    """The prompt and ImageData for `generate --image`: image i is `[img-i]`; those the prompt does not mention are
    put in front of it, one marker each, as Ollama's server prefixes a message's images. Raises OSError."""
    from runner.protocol import ImageData
    images = tuple(ImageData(i, Path(path).read_bytes()) for i, path in enumerate(paths))
    missing = "".join(f"[img-{img.id}] " for img in images if f"[img-{img.id}]" not in prompt)
    return missing + prompt, images


def run_generate(argv: Sequence[str]) -> int:
    """Stream a completion of --prompt to stdout; counts and speed to stderr."""
    from runner.engine import Engine, Event
    from runner.protocol import CompletionRequest
    from runner.sampling import SamplerParams

    p = argparse.ArgumentParser(prog="ollama-pyrunner generate")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", "--num-predict", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--ctx-size", type=int, default=2048)
    p.add_argument("--fast-kernels", action="store_true",
                   help="ggml's batch-shape-dependent CPU kernels: faster prefill, results depend on batching")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--tensor-split", default="", help="shares of the layers per device, e.g. 1,1,1")
    p.add_argument("--rpc", default=os.environ.get("OLLAMA_PYRUNNER_RPC", ""),
                   help="ggml rpc-server endpoints host:port[,host:port...] (default: $OLLAMA_PYRUNNER_RPC)")
    p.add_argument("--format", default="",
                   help='structured output: "json" (any JSON object), @schema.json or an inline JSON schema')
    p.add_argument("--grammar", default="", help="structured output: a llama.cpp GBNF grammar, or @file.gbnf")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file for a vision model (repeatable); the prompt refers to the i-th as [img-i], "
                        "and images it does not mention go in front of it, as Ollama's server puts them")
    p.add_argument("--mmproj", default="", metavar="PATH",
                   help="a llama.cpp projector file (clip.*) for a text-only GGUF of a vision model")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    try:
        fmt, grammar = _format_arg(args.format), _read_arg(args.grammar)
        prompt, images = prompt_with_images(args.prompt, args.image)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)
    from runner.flags import parse_tensor_split, parse_rpc_endpoints
    try:
        rpc, split = parse_rpc_endpoints(args.rpc), parse_tensor_split(args.tensor_split)
    except ValueError as e:
        p.error(str(e))
    loaded_flag = threading.Event()
    if rpc:
        _exit_if_rpc_fails_during_load(loaded_flag)

    shown = [-1]

    def bar(frac: float) -> None:
        n = int(frac * 30)
        if n == shown[0]:
            return
        shown[0] = n
        print(f"\rloading [{'#' * n}{'.' * (30 - n)}] {frac * 100:5.1f}%", end="", file=sys.stderr, flush=True)

    try:
        loaded = Loaded(args.model, args.threads, bar, n_gpu_layers=args.n_gpu_layers, tensor_split=split,
                        fast_kernels=args.fast_kernels, rpc=rpc, mmproj=args.mmproj)
    except Exception as e:
        print(f"\nerror loading model: {e}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    engine = Engine(loaded.backend, loaded.model, loaded.tokenizer, n_ctx=args.ctx_size, n_batch=512, parallel=1)
    try:
        engine.start()  # warms up first
    except Exception as e:
        print(f"error loading model: {e}", file=sys.stderr)
        return 1
    loaded_flag.set()
    done = threading.Event()
    final: list[Event] = []

    def sink(ev: Event) -> None:
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        if ev.done is not None:
            final.append(ev)
            done.set()

    req = CompletionRequest(prompt=prompt, images=images, num_predict=args.num_predict, num_keep=0, stop=(),
                            grammar=grammar, format=fmt,
                            sampling=SamplerParams(temperature=args.temperature,
                                                   seed=None if args.seed < 0 else args.seed))
    engine.submit(req, sink)
    done.wait()
    engine.close()
    ev = final[0]
    print(file=sys.stdout, flush=True)
    if ev.error:
        print(f"error: {ev.error}", file=sys.stderr)
        return 1
    m = ev.metrics
    assert m is not None
    pe, ee = m.prompt_eval_duration_ns / 1e9, m.eval_duration_ns / 1e9
    print(f"prompt eval: {m.prompt_eval_count} tokens in {pe:.3f}s ({m.prompt_eval_count / max(pe, 1e-9):.1f} "
          f"tok/s); eval: {m.eval_count} tokens in {ee:.3f}s ({max(m.eval_count - 1, 0) / max(ee, 1e-9):.1f} "
          f"tok/s)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from runner.llamaserver.main import invoked_as_llama_server, run_serve
    args = list(sys.argv[1:] if argv is None else argv)
    if (argv is None and invoked_as_llama_server(sys.argv[0])) or (args and args[0] == "serve"):
        return run_serve(args[1:] if args and args[0] == "serve" else args)
    if args and args[0] == "generate":
        return run_generate(args[1:])
    if args and args[0] == "convert":
        from models.convert import main as convert_main
        return convert_main(args[1:])
    if args and args[0] == "rpc-server":
        from runner.rpc_server import run_rpc_server
        return run_rpc_server(args[1:])
    if args and args[0] == "embed":
        from runner.embed_cli import run_embed
        return run_embed(args[1:])
    return run_runner(args)


if __name__ == "__main__":
    sys.exit(main())
