"""`ollama-pyrunner serve …` / `llama-server …`: parse the flags, serve HTTP at once (503 while loading), load the
model on a thread into the same Engine the Ollama-runner mode uses."""
from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from runner.llamaserver.flags import ServeConfig, parse_serve_args, template_kwargs, usage, wants_help

log = logging.getLogger("llama-server")


def _kv_type(name: str) -> Any:
    from ml.dtype import DType
    return {"f16": DType.F16, "q8_0": DType.Q8_0, "q4_0": DType.Q4_0}.get(name)


def _log_flags(cfg: ServeConfig, unknown: Sequence[str]) -> None:
    if unknown:
        log.warning("ignoring unknown flags: %s", " ".join(unknown))
    if cfg.ignored:
        log.info("speculative decoding is not supported; ignoring %s", ", ".join(cfg.ignored))
    if cfg.chat_template_name:
        log.warning("--chat-template %s: built-in templates are not bundled; using the model's own",
                    cfg.chat_template_name)
    if not cfg.jinja:
        log.info("--no-jinja: templates are always rendered with Jinja here")


def _load(cfg: ServeConfig, state: Any) -> None:
    from models.tokenizer.metadata import get_str
    from runner.cli import Loaded, settle_heap
    from runner.engine import Engine
    from runner.llamaserver.template import CHATML_TEMPLATE, ChatTemplate

    try:
        kv = _kv_type(cfg.cache_type_k)
        if kv is None or cfg.cache_type_v != cfg.cache_type_k:
            log.warning("KV cache types k=%s v=%s: using f16 (supported: matching f16, q8_0 or q4_0)",
                        cfg.cache_type_k, cfg.cache_type_v)
            kv = _kv_type("f16")
        quantized_kv = cfg.cache_type_k != "f16" and kv is not _kv_type("f16")
        flash = cfg.flash_attn == "on" or (cfg.flash_attn == "auto" and quantized_kv)
        loaded = Loaded(cfg.model, cfg.threads, None, cfg.n_gpu_layers, cfg.main_gpu, (), flash, mmproj=cfg.mmproj)
        params = loaded.model.params
        n_ctx_train = int(getattr(params, "n_ctx_train", 0) or 0)
        n_ctx = cfg.ctx_size or n_ctx_train or 4096
        engine = Engine(loaded.backend, loaded.model, loaded.tokenizer, n_ctx=n_ctx, n_batch=cfg.batch_size,
                        parallel=cfg.parallel, flash=flash, kv_type=kv if flash else _kv_type("f16"))
        engine.start()
        tok = loaded.tokenizer
        source = cfg.chat_template or get_str(loaded.backend.metadata, "tokenizer.chat_template") or ""
        if not source:
            log.warning("the model has no chat template; using ChatML")
        bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.token_text(tok.eos_id) if tok.eos_id is not None else ""
        state.template = ChatTemplate(source or CHATML_TEMPLATE, bos_token=bos, eos_token=eos)
        state.meta = {"n_vocab": int(tok.n_vocab), "n_ctx_train": n_ctx_train,
                      "n_embd": int(getattr(params, "n_embd", 0) or 0)}
        settle_heap()
        state.engine = engine
        log.info("model loaded: %d slot(s) of %d tokens; listening on http://%s:%d", engine.parallel,
                 engine.n_ctx_slot, cfg.host, cfg.port)
    except Exception as e:
        state.error = str(e)
        print(f"error loading model: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # llama-server exits when the model does not load; stderr carries the reason


def run_serve(argv: Sequence[str]) -> int:
    import uvicorn

    from runner.llamaserver.app import ServeState, build_app

    if wants_help(argv):
        print(usage("llama-server"), end="")
        return 0
    try:
        cfg, unknown = parse_serve_args(argv)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.INFO, stream=sys.stderr,
                        format="time=%(asctime)s level=%(levelname)s source=%(name)s msg=\"%(message)s\"")
    _log_flags(cfg, unknown)
    from runner.cli import share_the_interpreter
    share_the_interpreter()
    name = cfg.alias or os.path.basename(cfg.model)
    state = ServeState(model_path=cfg.model, model_name=name, n_ctx_slot_cap=not cfg.context_shift, keep=cfg.keep,
                       n_predict=cfg.n_predict, api_key=cfg.api_key,
                       template_kwargs=template_kwargs(cfg.chat_template_kwargs))
    threading.Thread(target=_load, args=(cfg, state), name="model-load", daemon=True).start()
    uvicorn.run(build_app(state), host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
    return 0


def invoked_as_llama_server(argv0: str) -> bool:
    """Whether the program was started under the name llama-server (a link or launcher in Ollama's lib/ollama)."""
    base = os.path.basename(argv0).lower()
    return base in ("llama-server", "llama-server.exe")


def main() -> int:
    """The `llama-server` console script."""
    return run_serve(sys.argv[1:])
