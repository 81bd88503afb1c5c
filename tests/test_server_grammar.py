"""Structured outputs over HTTP: a real runner subprocess (SmolLM2, P3, 3 slots) given `Grammar` as Ollama's server
sends it. The runner always answers /completion as an NDJSON stream; the server either forwards it chunk by chunk
(`stream: true`) or collects it (`stream: false`), so both ways of reading are checked."""
from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_server_support import PYTHON, REPO, RunnerProcess, Stream, complete, p3_request

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent / "data" / "grammar"
PROMPT = ("<|im_start|>user\nDescribe a person (name, age, height in metres, active) as JSON.<|im_end|>\n"
          "<|im_start|>assistant\n")
SAMPLING = {"top_k": 40, "top_p": 0.9}  # what a real server sends besides temperature/seed


def gbnf(name: str) -> str:
    return (FIXTURES / f"{name}.gbnf").read_text()


def schema(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / f"{name}.schema.json").read_text()))


def body(grammar: str = "", fmt: Any = None, **options: Any) -> dict[str, Any]:
    b = p3_request(PROMPT, **{**SAMPLING, **options})
    b["Grammar"], b["Format"] = grammar, fmt
    return b


@pytest.fixture(scope="module")
def runner(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    yield from RunnerProcess.serving(smollm2_path, ["--threads", "1", "--parallel", "3", "--ctx-size", "1536"],
                                     tmp_path_factory.mktemp("grammar-logs"), name="grammar")


def _done(s: Stream) -> dict[str, Any]:
    assert s.status == 200, s.body
    final = s.final
    assert final["done"] is True and final["done_reason"] == 0 and final["content"] == "", final
    return final


def test_json_grammar_streamed(runner: RunnerProcess) -> None:
    """Read as the server forwards a stream: line by line as they arrive; several chunks, together one object."""
    chunks: list[dict[str, Any]] = []
    with runner.client() as c, c.stream("POST", "/completion",
                                        content=json.dumps(body(gbnf("ollama_json"), temperature=0,
                                                                num_predict=300)).encode()) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                chunks.append(json.loads(line))
    final = chunks[-1]
    assert final["done"] is True and final["done_reason"] == 0
    assert len(chunks) > 3
    assert isinstance(json.loads("".join(ch["content"] for ch in chunks)), dict)


def test_schema_grammar_collected(runner: RunnerProcess) -> None:
    """Read whole, as the server collects a non-streamed answer; seeded at temperature 1."""
    with runner.client() as c:
        s = complete(c, body(gbnf("person"), temperature=1.0, seed=11, num_predict=200))
    _done(s)
    jsonschema.validate(json.loads(s.text), schema("person"))


def test_format_without_grammar(runner: RunnerProcess) -> None:
    """A client talking to the runner itself may send only `Format`: "json" or a schema object."""
    with runner.client() as c:
        by_schema = complete(c, body(fmt=schema("enum"), temperature=1.0, seed=3))
        by_json = complete(c, body(fmt="json", temperature=0, num_predict=300))
        bad = complete(c, body(fmt="yaml"))
    _done(by_schema)
    jsonschema.validate(json.loads(by_schema.text), schema("enum"))
    _done(by_json)
    assert isinstance(json.loads(by_json.text), dict)
    assert bad.status == 500 and b"invalid format" in bad.body


def test_concurrent_requests_with_different_schemas(runner: RunnerProcess) -> None:
    names = ["nested", "array_of_objects", "pattern"]

    def one(name: str) -> Stream:
        with runner.client() as c:
            return complete(c, body(gbnf(name), temperature=1.0, seed=5, num_predict=200))

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(one, names))
    for name, s in zip(names, results):
        _done(s)
        jsonschema.validate(json.loads(s.text), schema(name))


def test_malformed_grammar_is_500_while_another_request_completes(runner: RunnerProcess) -> None:
    normal: list[Stream] = []
    started = threading.Event()

    def run_normal() -> None:
        with runner.client() as c:
            started.set()
            normal.append(complete(c, p3_request("Once upon a time, there was a", num_predict=40, temperature=0)))

    t = threading.Thread(target=run_normal)
    t.start()
    started.wait()
    with runner.client() as c:
        bad = complete(c, body('root ::= "{" value\nvalue ::= [a-'))
        missing = complete(c, body('root ::= "{" value "}"'))
    t.join(timeout=300)
    assert bad.status == 500 and bad.body.startswith(b"invalid grammar: ") and b"line 2" in bad.body, bad.body
    assert bad.headers["content-type"].startswith("text/plain")
    assert missing.status == 500 and b"'value'" in missing.body, missing.body
    assert normal and normal[0].status == 200 and normal[0].final["done"] is True
    assert normal[0].final["eval_count"] == 40
    with runner.client() as c:  # and the runner goes on serving grammars
        _done(complete(c, body(gbnf("enum"), temperature=1.0, seed=1)))


def test_generate_command_format(smollm2_path: Path) -> None:
    """`generate --format @schema.json` (and a bad --format) from the standalone tool."""
    cmd = [PYTHON, "-m", "runner.cli", "generate", "--model", str(smollm2_path), "--prompt", PROMPT, "-n", "200",
           "--threads", "1", "--temperature", "1", "--seed", "4"]
    out = subprocess.run([*cmd, "--format", f"@{FIXTURES / 'person.schema.json'}"], cwd=REPO, capture_output=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    jsonschema.validate(json.loads(out.stdout.decode()), schema("person"))
    bad = subprocess.run([*cmd, "--format", "[1, 2]"], cwd=REPO, capture_output=True, timeout=300)
    assert bad.returncode == 2 and b"JSON schema object" in bad.stderr
