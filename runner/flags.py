"""Command line of `ollama-pyrunner runner …`, parsed like Go's `flag` package (runner-protocol.md §1.1, §1.3).

`-x` and `--x` are the same flag, `--x v` and `--x=v` both set a value, booleans are bare or `--x=true|false`.
Unlike Go we do not exit on an unknown flag: it is returned for the caller to log (an unknown flag followed by a
non-flag value takes that value along). The dialect comes from `--dialect`, else OLLAMA_RUNNER_DIALECT, else p3.
OLLAMA_PYRUNNER_FAST_KERNELS=1 trades batch invariance for prefill speed (see ggml.runtime.RuntimeOptions); the Go
server passes its environment to the runner, so it can be set where `ollama serve` starts; so can
OLLAMA_PYRUNNER_RPC (the `--rpc` endpoints, when the flag is not given) and OLLAMA_PYRUNNER_ROW_ATTENTION=1 (the
project's attention kernel for F16 KV caches, see ggml.runtime.RuntimeOptions.row_attention).
The environment is passed in; nothing here reads globals.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from runner.protocol import Dialect

DIALECT_ENV: Final = "OLLAMA_RUNNER_DIALECT"
FAST_KERNELS_ENV: Final = "OLLAMA_PYRUNNER_FAST_KERNELS"
RPC_ENV: Final = "OLLAMA_PYRUNNER_RPC"
ROW_ATTENTION_ENV: Final = "OLLAMA_PYRUNNER_ROW_ATTENTION"

_BOOL_FLAGS: Final = frozenset({"ollama-engine", "flash-attn", "multiuser-cache", "verbose", "no-mmap", "mlock"})
_INT_FLAGS: Final = frozenset({"ctx-size", "batch-size", "n-gpu-layers", "main-gpu", "threads", "parallel", "port"})
_STR_FLAGS: Final = frozenset({"model", "kv-cache-type", "tensor-split", "mmproj", "dialect", "lora", "rpc"})
_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # strconv.ParseBool's spellings
_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_GO_OCTAL = re.compile(r"[+-]?0[0-7_]+")
_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][+-]?\d+)?")


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """The runner's launch parameters. ctx_size is the total KV size: each of the `parallel` sequences gets
    ctx_size // parallel (see n_ctx_per_seq). kv_cache_type is passed through as given ("" = f16)."""

    model: str = ""
    ctx_size: int = 2048
    batch_size: int = 512
    n_gpu_layers: int = 0
    main_gpu: int = 0
    threads: int = 1
    flash_attn: bool = False
    kv_cache_type: str = ""
    parallel: int = 1
    tensor_split: tuple[float, ...] = ()
    multiuser_cache: bool = False
    verbose: bool = False
    no_mmap: bool = False
    mlock: bool = False
    lora: tuple[str, ...] = ()
    mmproj: str = ""
    port: int = 8080
    dialect: Dialect = Dialect.P3
    ollama_engine: bool = False
    fast_kernels: bool = False
    rpc: tuple[str, ...] = ()  # ggml rpc-server endpoints, host:port
    row_attention: bool = False

    @property
    def n_ctx_per_seq(self) -> int:
        """Context length of one sequence (slot)."""
        return self.ctx_size // self.parallel


def _parse_bool(text: str, source: str) -> bool:
    """strconv.ParseBool; `source` names where the text came from, for the error."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid boolean value {text!r} for {source}")


def _parse_int(name: str, text: str) -> int:
    """strconv.ParseInt(text, 0, 64): decimal, 0x/0o/0b prefixes, a leading 0 means octal, underscores."""
    try:
        if text != text.strip() or not text:
            raise ValueError(text)
        if _GO_OCTAL.fullmatch(text):
            sign = "-" if text.startswith("-") else ""
            value = int(sign + "0o" + text.lstrip("+-")[1:].lstrip("_"), 0)
        else:
            value = int(text, 0)
    except ValueError:
        raise ValueError(f"invalid value {text!r} for flag --{name}: expected an integer") from None
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"invalid value {text!r} for flag --{name}: out of range")
    return value


def parse_tensor_split(text: str) -> tuple[float, ...]:
    if not text:
        return ()
    out = []
    for part in text.split(","):
        try:
            value = float(part) if part == part.strip() else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid value {text!r} for flag --tensor-split: expected comma-separated "
                             f"non-negative numbers, got {part!r}")
        out.append(value)
    return tuple(out)


def parse_rpc_endpoints(text: str) -> tuple[str, ...]:
    """`host:port[,host:port...]` (spaces around commas allowed; empty text = none). Raises ValueError."""
    if not text.strip():
        return ()
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ValueError(f"invalid RPC endpoint {part!r}: expected host:port with a port in 1..65535")
        if ":" in host:  # ggml splits an endpoint at its first colon
            raise ValueError(f"invalid RPC endpoint {part!r}: IPv6 addresses are not supported by ggml's RPC")
        out.append(f"{host}:{int(port)}")
    return tuple(dict.fromkeys(out))  # one device per endpoint, even if named twice


def _is_value(arg: str) -> bool:
    # an argument after an unknown flag is its value unless it looks like another flag (negative numbers are values)
    return not arg.startswith("-") or arg == "-" or bool(_NUMBER.fullmatch(arg))


def _scan(args: Sequence[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Split argv into known flag values (last wins), --lora values (in order) and unknown arguments."""
    values: dict[str, str] = {}
    loras: list[str] = []
    unknown: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            unknown.extend(args[i:])  # Go: everything after "--" is positional
            break
        body = arg[2:] if arg.startswith("--") else arg[1:] if arg.startswith("-") else ""
        if not body or body[0] in "-=":
            unknown.append(arg)  # positional argument or bad flag syntax
            continue
        name, eq, value = body.partition("=")
        if name in _BOOL_FLAGS:
            values[name] = value if eq else "true"
        elif name in _INT_FLAGS or name in _STR_FLAGS:
            if not eq:
                if i >= len(args):
                    raise ValueError(f"flag needs an argument: --{name}")
                value = args[i]  # Go takes the next argument whatever it looks like
                i += 1
            if name == "lora":
                loras.append(value)
            else:
                values[name] = value
        else:
            unknown.append(arg)
            if not eq and i < len(args) and _is_value(args[i]):
                unknown.append(args[i])
                i += 1
    return values, loras, unknown


def parse_args(argv: Sequence[str], env: Mapping[str, str],
               cpu_count: int | None = None) -> tuple[RunnerConfig, tuple[str, ...]]:
    """Parse the runner's arguments (without the program name; a leading `runner` is skipped).

    Args:
        argv: the arguments, e.g. ["runner", "--ollama-engine", "--model", path, "--port", "41233"].
        env: the environment, read for OLLAMA_RUNNER_DIALECT, OLLAMA_PYRUNNER_FAST_KERNELS and
            OLLAMA_PYRUNNER_RPC only.
        cpu_count: default for --threads (os.cpu_count() when None).

    Returns:
        The configuration and the unknown arguments, in order, for the caller to log and ignore.

    Raises:
        ValueError: a malformed or out-of-range value, a missing value, or an unknown dialect.
    """
    args = list(argv[1:]) if argv and argv[0] == "runner" else list(argv)
    values, loras, unknown = _scan(args)
    bools = {name: _parse_bool(values[name], f"flag --{name}") for name in _BOOL_FLAGS if name in values}
    ints = {name: _parse_int(name, values[name]) for name in _INT_FLAGS if name in values}
    dialect_text = values.get("dialect") or env.get(DIALECT_ENV, "").strip() or Dialect.P3.value
    try:
        dialect = Dialect.parse(dialect_text)
    except ValueError as exc:
        source = "--dialect" if "dialect" in values else DIALECT_ENV
        raise ValueError(f"{source}: {exc}") from None
    fast_kernels = _parse_bool(env.get(FAST_KERNELS_ENV, "").strip() or "false", FAST_KERNELS_ENV)
    row_attention = _parse_bool(env.get(ROW_ATTENTION_ENV, "").strip() or "false", ROW_ATTENTION_ENV)
    rpc_text, rpc_source = (values["rpc"], "--rpc") if "rpc" in values else (env.get(RPC_ENV, ""), RPC_ENV)
    try:
        rpc = parse_rpc_endpoints(rpc_text)
    except ValueError as exc:
        raise ValueError(f"{rpc_source}: {exc}") from None
    config = RunnerConfig(
        model=values.get("model", ""), ctx_size=ints.get("ctx-size", 2048), batch_size=ints.get("batch-size", 512),
        n_gpu_layers=ints.get("n-gpu-layers", 0), main_gpu=ints.get("main-gpu", 0),
        threads=ints.get("threads", cpu_count or os.cpu_count() or 1), flash_attn=bools.get("flash-attn", False),
        kv_cache_type=values.get("kv-cache-type", ""), parallel=ints.get("parallel", 1),
        tensor_split=parse_tensor_split(values.get("tensor-split", "")),
        multiuser_cache=bools.get("multiuser-cache", False), verbose=bools.get("verbose", False),
        no_mmap=bools.get("no-mmap", False), mlock=bools.get("mlock", False), lora=tuple(loras),
        mmproj=values.get("mmproj", ""), port=ints.get("port", 8080), dialect=dialect,
        ollama_engine=bools.get("ollama-engine", False), fast_kernels=fast_kernels, rpc=rpc,
        row_attention=row_attention)
    _validate(config)
    return config, tuple(unknown)


def _validate(c: RunnerConfig) -> None:
    for name, value in (("ctx-size", c.ctx_size), ("batch-size", c.batch_size), ("parallel", c.parallel),
                        ("threads", c.threads)):
        if value < 1:
            raise ValueError(f"invalid value {value} for flag --{name}: must be at least 1")
    if c.ctx_size < c.parallel:
        raise ValueError(f"--ctx-size {c.ctx_size} is smaller than --parallel {c.parallel}: "
                         f"each sequence needs at least one context slot")
    if not 0 <= c.port <= 65535:
        raise ValueError(f"invalid value {c.port} for flag --port: must be 0..65535")
