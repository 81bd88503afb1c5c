"""Hostile HTTP clients against a real runner subprocess (issue 10): over a thousand generated malformed or extreme
/completion and /embedding bodies, a body over the size limit, a 15 MB body of small objects while /health is
polled, uploads aborted half-way, clients that leave before the first byte. Afterwards the process is up,
/health says ready and a greedy request gives the same text as before any of it."""
from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from test_server_support import (HEALTH_DEADLINE_S, HealthWatch, RunnerProcess, complete, describe, p3_request,
                                 worst_latency)

F32_MAX = 3.4028234663852886e38
WRONG_TYPES: list[Any] = [None, True, False, 0, -1, 1.5, "", "x", [], {}, [1, "a"], {"a": 1}, 2**70, -2**70]
EXTREME_NUMBERS: list[Any] = [0, -1, 1, 2**31 - 1, -2**31, 2**63 - 1, -2**63, 1e-45, -1e-45, F32_MAX, -F32_MAX,
                              1e38, -1e38, 1e39, 0.5, 1e6]
OPTION_KEYS = ["num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n",
               "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty", "mirostat",
               "mirostat_tau", "mirostat_eta", "stop", "num_ctx", "penalize_newline"]
TOP_KEYS = ["Prompt", "Format", "Images", "Options", "Grammar", "prompt", "Unknown"]
MAX_CHUNKS = 6  # a request that decodes as valid may ask for unlimited tokens: read this many, then hang up
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def runner(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    logs = tmp_path_factory.mktemp("fuzz-logs")
    yield from RunnerProcess.serving(smollm2_path, ["--threads", "1", "--parallel", "2", "--ctx-size", "512"], logs,
                                     name="fuzz")


def base_body() -> dict[str, Any]:
    return p3_request("Hi", num_predict=1, temperature=0)


def generated_bodies(rng: random.Random) -> list[bytes]:
    """Every top-level field and every option with every wrong type and extreme number, plus broken JSON."""
    bodies: list[bytes] = []
    for key in TOP_KEYS:
        for value in WRONG_TYPES:
            b = base_body()
            b[key] = value
            bodies.append(json.dumps(b).encode())
    for key in OPTION_KEYS:
        for value in WRONG_TYPES + EXTREME_NUMBERS:
            b = base_body()
            b["Options"][key] = value
            bodies.append(json.dumps(b).encode())
    for _ in range(150):  # several extreme options at once
        b = base_body()
        for key in rng.sample(OPTION_KEYS, 4):
            b["Options"][key] = rng.choice(EXTREME_NUMBERS)
        bodies.append(json.dumps(b).encode())
    valid = json.dumps(base_body()).encode()
    for i in range(1, len(valid)):  # truncated at every byte
        bodies.append(valid[:i])
    for _ in range(200):  # random byte flips, invalid UTF-8 among them
        raw = bytearray(valid)
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        bodies.append(bytes(raw))
    for text in (b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\x00", "\u2028".encode()):
        bodies.append(b'{"Prompt":"' + text + b'","Options":{"num_predict":2}}')
    for depth in (100, 1000, 100000):  # deep nesting in a known and an unknown field
        bodies.append(b'{"Prompt":"x","Options":' + b"[" * depth + b"]" * depth + b"}")
        bodies.append(b'{"Prompt":"x","Deep":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}")
    bodies += [b"", b"null", b"[]", b'"x"', b"1", b"{", b"}", b"{}", b'{"Prompt":null}', b"\xef\xbb\xbf{}"]
    return bodies


def send(client: httpx.Client, path: str, body: bytes) -> int:
    with client.stream("POST", path, content=body, headers={"Content-Type": "application/json"}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= MAX_CHUNKS:
                break
        return r.status_code


def greedy(client: httpx.Client) -> str:
    s = complete(client, p3_request(PROMPT, num_predict=16, temperature=0))
    assert s.status == 200 and s.final["done"]
    return s.text


def assert_healthy(runner: RunnerProcess) -> None:
    assert runner.proc.poll() is None, runner.stderr()[-3000:]
    with runner.client(timeout=5) as c:
        assert c.get("/health").json() == {"status": 0, "progress": 1}


def test_a_thousand_malformed_bodies(runner: RunnerProcess) -> None:
    with runner.client() as c:
        before = greedy(c)
    bodies = generated_bodies(random.Random(7))
    assert len(bodies) >= 1000
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def one(body: bytes) -> None:
        with httpx.Client(base_url=runner.url, timeout=60) as client:
            code = send(client, "/completion", body)
            code_e = send(client, "/embedding", body)
        with lock:
            statuses[code] = statuses.get(code, 0) + 1
            statuses[code_e] = statuses.get(code_e, 0) + 1

    with ThreadPoolExecutor(2) as pool:  # two at a time, as many as the runner has slots
        list(pool.map(one, bodies))
    assert set(statuses) <= {200, 400, 500, 501}, statuses
    assert statuses.get(400, 0) > 500 and statuses.get(200, 0) > 100  # most are refused, many still generate
    assert_healthy(runner)
    with runner.client() as c:
        assert greedy(c) == before
    assert "Traceback" not in runner.stderr()


def test_body_over_the_limit_gets_413(runner: RunnerProcess) -> None:
    with runner.client() as c:
        r = c.post("/completion", content=b'{"Prompt":"' + b"a" * (65 << 20) + b'"}')
        assert r.status_code == 413 and r.text == "request body too large\n"
    assert_healthy(runner)


def test_health_answers_while_a_large_body_is_parsed(runner: RunnerProcess) -> None:
    big = json.dumps({"Prompt": PROMPT, "Extra": [{"a": i} for i in range(800_000)],
                      "Options": {"num_predict": 1}}).encode()

    def check(r: httpx.Response) -> None:
        assert r.status_code == 200

    with HealthWatch(runner.url, runner.t_start, check=check) as watch, runner.client() as c:
        t0 = time.monotonic()
        assert c.post("/completion", content=big).status_code == 200
        parse_s = time.monotonic() - t0
    assert parse_s > 0.5 and len(watch.polls) > 10  # the body did take a while, and /health was asked throughout
    worst = worst_latency(watch.polls)
    assert worst.runner_latency < HEALTH_DEADLINE_S, describe(worst)


def test_aborted_upload_and_early_hangup(runner: RunnerProcess) -> None:
    for _ in range(5):  # a declared body that never fully arrives
        with socket.create_connection(("127.0.0.1", runner.port)) as s:
            s.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{\"Prompt\":\"abc")
    for _ in range(5):  # a whole request, then gone before the first byte of the answer
        body = json.dumps(p3_request(PROMPT * 40, num_predict=50, temperature=0)).encode()
        with socket.create_connection(("127.0.0.1", runner.port)) as s:
            s.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body)
    time.sleep(1.0)
    assert_healthy(runner)
    assert "Traceback" not in runner.stderr()


def test_unknown_paths_are_404(runner: RunnerProcess) -> None:
    with runner.client() as c:
        for path in ("/completion/", "/embedding/", "/health/", "/nope"):
            r = c.post(path, content=b"{}") if path != "/health/" else c.get(path)
            assert r.status_code == 404, (path, r.status_code)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def test_decoder_helper_exits_when_the_runner_is_killed(runner: RunnerProcess) -> None:
    """The large-body test started the decoding helper; Ollama stops runners with SIGKILL, and the helper must
    not outlive it. (Runs last in this module: it kills the module's runner.)"""
    helpers = _children(runner.proc.pid)
    assert helpers, "the large-body test should have started a decoding helper"
    runner.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in helpers):
        time.sleep(0.1)
    alive = [p for p in helpers if Path(f"/proc/{p}/stat").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, alive
