"""runner.flags: Go `flag`-style parsing of the runner command line (runner-protocol.md §1.1, §1.3, §3.3)."""
from __future__ import annotations

import pytest

from runner.flags import RunnerConfig, parse_args
from runner.protocol import Dialect

TYPICAL = ["runner", "--ollama-engine", "--model", "/b/sha256-x", "--ctx-size", "8192", "--batch-size", "512",
           "--n-gpu-layers", "49", "--threads", "8", "--parallel", "2", "--port", "41233"]  # §1.3 typical argv


@pytest.mark.parametrize(("argv", "env", "expected", "unknown"), [
    pytest.param([], {}, {"ctx_size": 2048, "batch_size": 512, "parallel": 1, "port": 8080, "threads": 7,
                          "n_gpu_layers": 0, "main_gpu": 0, "model": "", "dialect": Dialect.P3,
                          "flash_attn": False, "ollama_engine": False, "lora": (), "tensor_split": ()}, (),
                 id="defaults-§1.3"),
    pytest.param(TYPICAL, {}, {"ollama_engine": True, "model": "/b/sha256-x", "ctx_size": 8192, "batch_size": 512,
                               "n_gpu_layers": 49, "threads": 8, "parallel": 2, "port": 41233}, (),
                 id="typical-argv-§1.3"),
    pytest.param(["-ctx-size=4096", "-port=1", "--model=/m"], {}, {"ctx_size": 4096, "port": 1, "model": "/m"}, (),
                 id="single-dash-and-equals"),
    pytest.param(["--flash-attn", "--mlock=T", "--no-mmap=false", "--verbose=1", "--multiuser-cache"], {},
                 {"flash_attn": True, "mlock": True, "no_mmap": False, "verbose": True, "multiuser_cache": True}, (),
                 id="booleans"),
    pytest.param(["--port", "1", "--port", "2"], {}, {"port": 2}, (), id="last-wins"),
    pytest.param(["--lora", "a", "-lora=b", "--lora", "c"], {}, {"lora": ("a", "b", "c")}, (), id="lora-repeatable"),
    pytest.param(["--foo", "bar", "--baz", "--qux=1", "--threads", "3"], {}, {"threads": 3},
                 ("--foo", "bar", "--baz", "--qux=1"), id="unknown-flags-take-a-value"),
    pytest.param(["--foo", "-1", "--bar", "--port", "5"], {}, {"port": 5}, ("--foo", "-1", "--bar"),
                 id="unknown-flag-negative-value"),
    pytest.param(["runner", "extra", "--port", "5"], {}, {"port": 5}, ("extra",), id="positional-collected"),
    pytest.param(["--port", "5", "--", "--port", "6"], {}, {"port": 5}, ("--port", "6"), id="double-dash-ends"),
    pytest.param(["---x", "-=y", "-"], {}, {}, ("---x", "-=y", "-"), id="bad-syntax-collected"),
    pytest.param(["--model", "--port"], {}, {"model": "--port", "port": 8080}, (), id="value-taken-verbatim"),
    pytest.param(["--ctx-size", "0x1000"], {}, {"ctx_size": 4096}, (), id="int-hex"),
    pytest.param(["--ctx-size", "010"], {}, {"ctx_size": 8}, (), id="int-leading-zero-octal"),
    pytest.param(["--ctx-size", "1_024", "--n-gpu-layers", "-1"], {}, {"ctx_size": 1024, "n_gpu_layers": -1}, (),
                 id="int-underscore-negative"),
    pytest.param(["--dialect", "p1"], {"OLLAMA_RUNNER_DIALECT": "p2"}, {"dialect": Dialect.P1}, (),
                 id="dialect-flag-wins-§3.3"),
    pytest.param([], {"OLLAMA_RUNNER_DIALECT": " P2 "}, {"dialect": Dialect.P2}, (), id="dialect-env"),
    pytest.param([], {"OLLAMA_RUNNER_DIALECT": ""}, {"dialect": Dialect.P3}, (), id="dialect-env-empty"),
    pytest.param([], {}, {"fast_kernels": False}, (), id="fast-kernels-default"),
    pytest.param([], {"OLLAMA_PYRUNNER_FAST_KERNELS": "1"}, {"fast_kernels": True}, (), id="fast-kernels-env"),
    pytest.param([], {"OLLAMA_PYRUNNER_FAST_KERNELS": "false"}, {"fast_kernels": False}, (), id="fast-kernels-off"),
    pytest.param([], {"OLLAMA_PYRUNNER_ROW_ATTENTION": "1"}, {"row_attention": True}, (), id="row-attention-env"),
    pytest.param([], {}, {"row_attention": False}, (), id="row-attention-default-off"),
    pytest.param(["--tensor-split", "20,13", "--kv-cache-type", "q8_0", "--mmproj", "/p", "--main-gpu", "1"], {},
                 {"tensor_split": (20.0, 13.0), "kv_cache_type": "q8_0", "mmproj": "/p", "main_gpu": 1}, (),
                 id="strings"),
])
def test_parse(argv: list[str], env: dict[str, str], expected: dict[str, object], unknown: tuple[str, ...]) -> None:
    config, rest = parse_args(argv, env, cpu_count=7)
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    assert rest == unknown


@pytest.mark.parametrize(("argv", "env", "match"), [
    pytest.param(["--ctx-size", "abc"], {}, "ctx-size", id="non-integer"),
    pytest.param(["--ctx-size", "1.5"], {}, "ctx-size", id="float"),
    pytest.param(["--ctx-size", " 5"], {}, "ctx-size", id="space"),
    pytest.param(["--ctx-size", "09"], {}, "ctx-size", id="bad-octal"),
    pytest.param(["--port"], {}, "needs an argument", id="missing-value"),
    pytest.param(["--flash-attn=yes"], {}, "boolean", id="bad-bool"),
    pytest.param(["--flash-attn="], {}, "boolean", id="empty-bool"),
    pytest.param(["--dialect", "p4"], {}, "--dialect.*unknown dialect", id="bad-dialect-flag"),
    pytest.param([], {"OLLAMA_RUNNER_DIALECT": "p9"}, "OLLAMA_RUNNER_DIALECT.*unknown dialect", id="bad-dialect-env"),
    pytest.param([], {"OLLAMA_PYRUNNER_FAST_KERNELS": "yes"}, "invalid boolean value 'yes' for OLLAMA_PYRUNNER_FAST_KERNELS", id="bad-fast-env"),
    pytest.param(["--ctx-size", "0"], {}, "ctx-size", id="zero-ctx"),
    pytest.param(["--parallel", "0"], {}, "parallel", id="zero-parallel"),
    pytest.param(["--threads", "-2"], {}, "threads", id="negative-threads"),
    pytest.param(["--port", "70000"], {}, "port", id="port-range"),
    pytest.param(["--ctx-size", "1", "--parallel", "2"], {}, "smaller than --parallel", id="ctx-below-parallel"),
    pytest.param(["--tensor-split", "1,x"], {}, "tensor-split", id="bad-split"),
    pytest.param(["--ctx-size", "99999999999999999999"], {}, "out of range", id="int64-overflow"),
])
def test_errors(argv: list[str], env: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_args(argv, env, cpu_count=4)


def test_threads_default_is_cpu_count() -> None:
    config, _ = parse_args([], {}, cpu_count=None)
    assert config.threads >= 1


def test_per_sequence_context() -> None:
    # §1.3: ctx-size is num_ctx × parallel; each sequence gets ctx-size / parallel
    config, _ = parse_args(["--ctx-size", "8192", "--parallel", "2"], {})
    assert config.n_ctx_per_seq == 4096
    assert RunnerConfig().n_ctx_per_seq == 2048


def test_config_is_frozen() -> None:
    config, _ = parse_args([], {}, cpu_count=1)
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]
