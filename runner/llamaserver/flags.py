"""Command line of the llama-server mode (`ollama-pyrunner serve …`, or the program run as `llama-server`).

Accepts the flags newer Ollama (v0.30+) passes to llama.cpp's `llama-server` (runner-protocol.md §3.2): `--model
--port --host --no-webui --offline -c -np --cache-type-k/v --flash-attn on|off|auto -ngl -t --mmproj --jinja
--chat-template --context-shift --keep`, the speculative-decoding flags (accepted and ignored: we have no draft
model), and a few more llama-server flags that only tune things this runner does its own way. A flag we do not
know is returned for the caller to log, never fatal, so a newer Ollama passing a new flag still starts us.
`--flag value` and `--flag=value` are both accepted. Nothing here reads the environment or globals.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

# canonical name -> its spellings; every one of these takes a value
_VALUE_FLAGS: Final[dict[str, tuple[str, ...]]] = {
    "model": ("-m", "--model"), "port": ("--port",), "host": ("--host",), "ctx_size": ("-c", "--ctx-size"),
    "parallel": ("-np", "--parallel"), "threads": ("-t", "--threads"),
    "n_gpu_layers": ("-ngl", "--gpu-layers", "--n-gpu-layers"), "cache_type_k": ("-ctk", "--cache-type-k"),
    "cache_type_v": ("-ctv", "--cache-type-v"), "mmproj": ("-mm", "--mmproj"), "keep": ("--keep",),
    "chat_template": ("--chat-template",), "chat_template_file": ("--chat-template-file",),
    "batch_size": ("-b", "--batch-size"), "alias": ("-a", "--alias"), "main_gpu": ("-mg", "--main-gpu"),
    "tensor_split": ("-ts", "--tensor-split"), "api_key": ("--api-key",),
    "n_predict": ("-n", "--predict", "--n-predict"),
    "chat_template_kwargs": ("--chat-template-kwargs",),
}
# flags that take no value (or, for --flash-attn, an optional one)
_BOOL_FLAGS: Final[dict[str, tuple[str, ...]]] = {
    "jinja": ("--jinja",), "no_jinja": ("--no-jinja",), "no_webui": ("--no-webui",), "offline": ("--offline",),
    "context_shift": ("--context-shift",), "no_context_shift": ("--no-context-shift",),
    "verbose": ("-v", "--verbose", "--log-verbose"), "embeddings": ("--embedding", "--embeddings"),
    "no_mmap": ("--no-mmap",), "mlock": ("--mlock",), "cont_batching": ("-cb", "--cont-batching"),
    "no_cont_batching": ("-nocb", "--no-cont-batching"), "metrics": ("--metrics",), "no_warmup": ("--no-warmup",),
}
_FLASH: Final = ("-fa", "--flash-attn")
_FLASH_VALUES: Final = ("on", "off", "auto")
# speculative decoding: accepted with their value and ignored (no draft model here)
_SPECULATIVE_VALUE: Final = frozenset({
    "-md", "--model-draft", "--draft", "--draft-n", "--draft-max", "--draft-min", "--draft-n-min", "--draft-p-min",
    "--draft-p-split", "-cd", "--ctx-size-draft", "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft", "-devd",
    "--device-draft", "-td", "--threads-draft", "-ctkd", "--cache-type-k-draft", "-ctvd", "--cache-type-v-draft",
    "--spec-replace", "--spec-type", "--spec-ngram-size-n", "--spec-ngram-size-m", "--spec-ngram-min-hits"})
_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][+-]?\d+)?")


_HELP_FLAGS: Final = ("-h", "--help")


def wants_help(argv: Sequence[str]) -> bool:
    """Whether the command line asks for the usage text (a -h/--help that is not some flag's value)."""
    return any(arg in _HELP_FLAGS and (i == 0 or not _takes_value(argv[i - 1])) for i, arg in enumerate(argv))


def _takes_value(flag: str) -> bool:
    return "=" not in flag and (_lookup(_VALUE_FLAGS, flag) is not None or flag in _SPECULATIVE_VALUE)


def usage(prog: str) -> str:
    """The usage text for -h/--help, from the same tables the parser reads."""
    lines = [f"usage: {prog} --model FILE [--port N] [--host ADDR] [options]", "",
             "A llama.cpp llama-server compatible server (ollama-pyrunner). Options taking a value:"]
    lines += [f"  {', '.join(spellings)} VALUE" for spellings in _VALUE_FLAGS.values()]
    lines += ["", "Switches:", f"  {', '.join(_FLASH)} [on|off|auto]"]
    lines += [f"  {', '.join(spellings)}" for spellings in _BOOL_FLAGS.values()]
    lines += ["", "Speculative-decoding flags are accepted and ignored; unknown flags are logged and ignored."]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """The llama-server mode's launch parameters. ctx_size is the total KV size shared by `parallel` slots, as
    llama-server's -c (Ollama passes ctx × parallel); 0 means the model's training context."""

    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    ctx_size: int = 0
    parallel: int = 1
    threads: int = 1
    n_gpu_layers: int = 0
    main_gpu: int = 0
    batch_size: int = 512
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    mmproj: str = ""
    keep: int = 0
    jinja: bool = True
    chat_template: str = ""  # a Jinja template given on the command line (overrides the GGUF's)
    chat_template_name: str = ""  # a built-in template name we do not have (logged, the GGUF's is used)
    context_shift: bool = False
    alias: str = ""
    api_key: str = ""  # when set, every route but /health and /v1/models needs `Authorization: Bearer <key>`
    n_predict: int = -1  # a request's default n_predict
    chat_template_kwargs: str = ""  # a JSON object of extra template variables (e.g. {"enable_thinking": false})
    verbose: bool = False
    ignored: tuple[str, ...] = field(default=())  # flags accepted without effect, for the log


def _int(flag: str, text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ValueError(f"invalid value {text!r} for {flag}: expected an integer") from None


def _lookup(table: dict[str, tuple[str, ...]], flag: str) -> str | None:
    return next((name for name, spellings in table.items() if flag in spellings), None)


def parse_serve_args(argv: Sequence[str], cpu_count: int | None = None) -> tuple[ServeConfig, tuple[str, ...]]:
    """Parse llama-server style arguments (without the program name; a leading `serve` is skipped).

    Returns the configuration and the unknown arguments (for the caller to log). Raises ValueError for a
    missing or malformed value of a known flag, or a missing --model.
    """
    args = list(argv[1:]) if argv and argv[0] == "serve" else list(argv)
    values: dict[str, str] = {}
    bools: set[str] = set()
    ignored: list[str] = []
    unknown: list[str] = []
    flash = "auto"
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        flag, eq, inline = arg.partition("=") if arg.startswith("-") else (arg, "", "")
        if flag in _FLASH:
            if eq:
                flash = inline
            elif i < len(args) and args[i] in _FLASH_VALUES + ("true", "false"):
                flash, i = args[i], i + 1
            else:
                flash = "on"  # the old bare -fa
            flash = {"true": "on", "false": "off"}.get(flash, flash)
            if flash not in _FLASH_VALUES:
                raise ValueError(f"invalid value {flash!r} for --flash-attn: expected on, off or auto")
            continue
        name = _lookup(_VALUE_FLAGS, flag)
        if name is not None or flag in _SPECULATIVE_VALUE:
            if not eq:
                if i >= len(args):
                    raise ValueError(f"flag needs an argument: {flag}")
                inline, i = args[i], i + 1
            if name is None:
                ignored.append(f"{flag} {inline}")
            else:
                values[name] = inline
            continue
        name = _lookup(_BOOL_FLAGS, flag)
        if name is not None:
            bools.add(name)
            continue
        unknown.append(arg)
        if not eq and i < len(args) and (not args[i].startswith("-") or _NUMBER.fullmatch(args[i])):
            unknown.append(args[i])  # an unknown flag's value travels with it
            i += 1
    if not values.get("model"):
        raise ValueError("--model is required")
    template, template_name = "", ""
    if "chat_template_file" in values:
        with open(values["chat_template_file"], encoding="utf-8") as f:
            template = f.read()
    elif "chat_template" in values:
        text = values["chat_template"]
        if "{{" in text or "{%" in text:
            template = text
        else:
            template_name = text
    threads = _int("-t", values["threads"]) if "threads" in values else 0
    if threads <= 0:  # llama.cpp: -1 (the default) means the hardware's thread count
        threads = cpu_count or os.cpu_count() or 1
    config = ServeConfig(
        model=values["model"], host=values.get("host", "127.0.0.1"),
        port=_int("--port", values.get("port", "8080")), ctx_size=_int("-c", values.get("ctx_size", "0")),
        parallel=_int("-np", values.get("parallel", "1")), threads=threads,
        n_gpu_layers=_gpu_layers(values.get("n_gpu_layers", "0")), main_gpu=_int("-mg", values.get("main_gpu", "0")),
        batch_size=_int("-b", values.get("batch_size", "512")),
        cache_type_k=values.get("cache_type_k", "f16").lower(), cache_type_v=values.get("cache_type_v", "f16").lower(),
        flash_attn=flash, mmproj=values.get("mmproj", ""), keep=_int("--keep", values.get("keep", "0")),
        jinja="no_jinja" not in bools, chat_template=template, chat_template_name=template_name,
        context_shift="context_shift" in bools and "no_context_shift" not in bools,
        alias=values.get("alias", ""), api_key=values.get("api_key", ""),
        n_predict=_int("-n", values.get("n_predict", "-1")),
        chat_template_kwargs=values.get("chat_template_kwargs", ""), verbose="verbose" in bools, ignored=tuple(ignored))
    _validate(config)
    return config, tuple(unknown)


def _gpu_layers(text: str) -> int:
    if text in ("auto", "all"):
        return 999 if text == "all" else 0
    return _int("-ngl", text)


def template_kwargs(text: str) -> dict[str, object]:
    """The --chat-template-kwargs object ({} when empty). Raises ValueError when it is not a JSON object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"invalid value {text!r} for --chat-template-kwargs: expected a JSON object")
    return value


def _validate(c: ServeConfig) -> None:
    template_kwargs(c.chat_template_kwargs)
    if c.parallel < 1:
        raise ValueError(f"invalid value {c.parallel} for -np: must be at least 1")
    if c.ctx_size < 0:
        raise ValueError(f"invalid value {c.ctx_size} for -c: must be 0 (the model's) or more")
    if c.batch_size < 1:
        raise ValueError(f"invalid value {c.batch_size} for -b: must be at least 1")
    if not 0 <= c.port <= 65535:
        raise ValueError(f"invalid value {c.port} for --port: must be 0..65535")
