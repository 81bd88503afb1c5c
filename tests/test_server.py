"""The runner over HTTP, end to end: a real `python -m runner.cli runner …` subprocess with SmolLM2, driven the way
Ollama's llm/server.go drives it (runner-protocol.md §1, §2, §5, §6).

One runner per configuration, shared by the module: P3 with 4 slots (the main one), P3 with 1 slot and a
64-token context (shift, disconnect, batch-size independence), a P2 runner chosen through OLLAMA_RUNNER_DIALECT
and a P1 runner chosen through --dialect. The greedy-text checks on the 4-slot runner come before the tests that
run several sequences on it at once, so a sequence's KV cells do not depend on earlier traffic (see
test_parallel_equals_serial for why). All use --threads 1 so the 2-core machine is not oversubscribed while /health
latency is measured.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
import httpx
import pytest
from test_server_support import (HEALTH_DEADLINE_S, PYTHON, REPO, HealthWatch, RunnerProcess, Stream, complete,
                                 describe, p3_request, worst_latency)

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
# greedy, first 20 tokens (`ollama-pyrunner generate --prompt "The capital of France is" -n 20`)
EXPECTED_20 = " Paris.\n\nThe United States has a population of approximately 311 million people.\n"
P3_KEYS = ["content", "done_reason", "done", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration"]
# what a real server sends besides temperature/seed (api.DefaultOptions); absent keys would mean 0 (top_p 0 = greedy)
SAMPLING = {"top_k": 40, "top_p": 0.9}
PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):",
           "The three primary colors are"]


def _start(model: Path, logdir: Path, name: str, args: list[str],
           env: dict[str, str] | None = None) -> Generator[RunnerProcess, None, None]:
    yield from RunnerProcess.serving(model, ["--threads", "1", *args], logdir, env=env, name=name)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runner-logs")


@pytest.fixture(scope="module")
def runner4(smollm2_path: Path, logdir: Path) -> Iterator[RunnerProcess]:
    """P3 (default dialect), 4 slots of 256 tokens. Its start-up /health polls are kept in `load_polls`."""
    yield from _start(smollm2_path, logdir, "p3x4", ["--parallel", "4", "--ctx-size", "1024"])


@pytest.fixture(scope="module")
def runner1(smollm2_path: Path, logdir: Path) -> Iterator[RunnerProcess]:
    """P3, one slot of 64 tokens: context shift after 64 inputs, a second request waits for the slot. --verbose:
    the engine's debug lines ("seq placed", "context shift") show what it did."""
    yield from _start(smollm2_path, logdir, "p3x1", ["--parallel", "1", "--ctx-size", "64", "--verbose"])


@pytest.fixture(scope="module")
def runner_p2(smollm2_path: Path, logdir: Path) -> Iterator[RunnerProcess]:
    yield from _start(smollm2_path, logdir, "p2", ["--parallel", "1", "--ctx-size", "256"],
                      env={"OLLAMA_RUNNER_DIALECT": "p2"})


@pytest.fixture(scope="module")
def runner_p1(smollm2_path: Path, logdir: Path) -> Iterator[RunnerProcess]:
    # the flag wins over the environment
    yield from _start(smollm2_path, logdir, "p1", ["--parallel", "1", "--ctx-size", "256", "--dialect", "p1"],
                      env={"OLLAMA_RUNNER_DIALECT": "p2"})


def _ok(s: Stream) -> Stream:
    assert s.status == 200, (s.status, s.body)
    return s


# ---- /health ---------------------------------------------------------------------------------------------------

def test_health_while_loading(runner4: RunnerProcess) -> None:
    polls = runner4.load_polls
    loading = [p for p in polls if p.body["status"] == 2]
    assert loading, f"never saw status 2 (loading); polls: {[p.body for p in polls]}"
    for p in polls:
        assert list(p.body) == ["status", "progress"], p.body
        assert isinstance(p.body["progress"], (int, float)) and 0.0 <= p.body["progress"] <= 1.0, p.body
    progress = [p.body["progress"] for p in loading]
    assert progress == sorted(progress), f"progress went backwards: {progress}"
    assert any(0.0 < x < 1.0 for x in progress), f"no intermediate progress reported: {progress}"
    assert progress[0] < 0.5, progress
    assert polls[-1].body == {"status": 0, "progress": 1}
    assert all(p.body["status"] in (0, 2) for p in polls)
    worst = worst_latency(polls)
    print(f"\n/health during load: {len(polls)} polls ({len(loading)} loading), worst {describe(worst)}")
    assert worst.runner_latency < HEALTH_DEADLINE_S, describe(worst)


# ---- P3 streaming ----------------------------------------------------------------------------------------------

def test_greedy_stream_equals_standalone(runner4: RunnerProcess, smollm2_path: Path) -> None:
    with runner4.client() as c:
        s = _ok(complete(c, p3_request(PROMPT, num_predict=20)))
    assert s.text == EXPECTED_20
    # the same text from the standalone tool (engine driven directly, no HTTP)
    out = subprocess.run([PYTHON, "-m", "runner.cli", "generate", "--model", str(smollm2_path), "--prompt", PROMPT,
                          "-n", "20", "--threads", "1"], cwd=REPO, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode() == EXPECTED_20 + "\n"  # the tool ends its output with a newline


def test_p3_stream_shape(runner4: RunnerProcess) -> None:
    with runner4.client() as c:
        s = _ok(complete(c, p3_request(PROMPT, num_predict=20)))
    assert s.headers["content-type"] == "application/json"
    assert len(s.objects) >= 2
    for line, obj in zip(s.lines, s.objects):
        assert list(obj) == P3_KEYS, line  # every field, always, in llm.CompletionResponse order
        assert isinstance(obj["content"], str) and isinstance(obj["done"], bool)
        assert type(obj["done_reason"]) is int
        assert all(type(obj[k]) is int for k in P3_KEYS[3:]), line
    *chunks, final = s.objects
    for obj in chunks:
        assert obj["done"] is False and obj["content"] != "", obj
        assert obj["done_reason"] == 0 and all(obj[k] == 0 for k in P3_KEYS[3:]), obj
    assert final["done"] is True and final["content"] == ""
    assert final["done_reason"] == 1  # length
    assert final["eval_count"] == 20
    assert final["prompt_eval_count"] > 0
    assert final["prompt_eval_duration"] > 0 and final["eval_duration"] > 0
    # nanoseconds, not milliseconds: 20 tokens take well over 1 ms and far less than 1000 s
    assert 1_000_000 < final["eval_duration"] < 1_000_000_000_000


def test_num_predict_gives_length(runner4: RunnerProcess) -> None:
    with runner4.client() as c:
        s = _ok(complete(c, p3_request(PROMPT, num_predict=3)))
    assert s.final["done_reason"] == 1 and s.final["eval_count"] == 3
    assert EXPECTED_20.startswith(s.text) and s.text.startswith(" Paris")


def test_stop_string_spanning_tokens(runner4: RunnerProcess) -> None:
    cut = EXPECTED_20[:EXPECTED_20.index("United States")]  # " Paris.\n\nThe "
    with runner4.client() as c:
        for _ in range(2):  # twice: the slot's cache must hold exactly what was returned, so a reuse agrees
            s = _ok(complete(c, p3_request(PROMPT, num_predict=30, stop=["United States"])))
            assert s.text == cut
            assert s.final["done"] is True and s.final["done_reason"] == 0
            assert "United" not in "".join(o["content"] for o in s.objects)
        # and the cached prefix does not change the next greedy continuation
        assert _ok(complete(c, p3_request(PROMPT, num_predict=20))).text == EXPECTED_20


def test_health_during_generation(runner4: RunnerProcess) -> None:
    """Ollama's scheduler pings /health while sequences run; it must answer in < 200 ms with 4 streams going."""
    with runner4.client() as c, ThreadPoolExecutor(4) as pool, HealthWatch(runner4.url, runner4.t_start) as watch:
        streams = list(pool.map(lambda p: complete(c, p3_request(p, num_predict=48)), PROMPTS))
    for s in streams:
        assert _ok(s).final["eval_count"] == 48
    polls = watch.polls
    assert len(polls) >= 20, len(polls)
    assert all(p.body == {"status": 0, "progress": 1} for p in polls)
    worst = worst_latency(polls)
    print(f"\n/health during 4-way generation: {len(polls)} polls, worst {describe(worst)}")
    assert worst.runner_latency < HEALTH_DEADLINE_S, describe(worst)


def _first_difference(a: list[str], b: list[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_parallel_equals_serial(runner4: RunnerProcess) -> None:
    """4 different prompts at once give exactly what each gives alone (greedy, 24 tokens), and they really run
    side by side. Holds because the CPU kernels are batch-invariant and each sequence's KV cells stay in position
    order (a token's logits do not depend on what shares its batch or its cache); earlier tests of this module
    leave the cache well used, so the cells here are not fresh ones."""
    n_tokens = 24
    with runner4.client() as c:
        serial = [[o["content"] for o in _ok(complete(c, p3_request(p, num_predict=n_tokens))).objects[:-1]]
                  for p in PROMPTS]
        barrier = threading.Barrier(len(PROMPTS))
        spans: dict[int, tuple[float, float]] = {}

        def run(i: int) -> list[str]:
            barrier.wait()
            lines = []
            with c.stream("POST", "/completion", json=p3_request(PROMPTS[i], num_predict=n_tokens)) as r:
                assert r.status_code == 200
                t_first = 0.0
                for ln in r.iter_lines():
                    if ln:
                        t_first = t_first or time.monotonic()
                        lines.append(json.loads(ln))
            spans[i] = (t_first, time.monotonic())
            assert lines[-1]["done"] and lines[-1]["eval_count"] == n_tokens
            return [o["content"] for o in lines[:-1]]

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            concurrent = list(pool.map(run, range(len(PROMPTS))))
    assert len({"".join(t) for t in serial}) == len(PROMPTS)
    # they really ran side by side: every stream had its first token before any stream ended
    assert max(f for f, _ in spans.values()) < min(e for _, e in spans.values()), spans
    diverged = [(p, _first_difference(a, b), "".join(a), "".join(b))
                for p, a, b in zip(PROMPTS, concurrent, serial) if a != b]
    assert not diverged, diverged


def _seeded(seed: int = 42) -> dict[str, Any]:
    return p3_request(PROMPT, num_predict=20, temperature=0.8, seed=seed, **SAMPLING)


def test_seed_reproducible(runner4: RunnerProcess, runner1: RunnerProcess) -> None:
    with runner4.client() as c4, runner1.client() as c1:
        first = _ok(complete(c4, _seeded())).text
        assert _ok(complete(c4, _seeded())).text == first
        # sampling is really random: other seeds give other texts
        others = {_ok(complete(c4, _seeded(s))).text for s in (1, 2, 3)}
        assert others - {first}, "the seed has no effect"
        one = _ok(complete(c1, _seeded())).text
        assert _ok(complete(c1, _seeded())).text == one


def test_seed_same_with_parallel_1_and_4(smollm2_path: Path, logdir: Path, runner1: RunnerProcess) -> None:
    """The same seeded request on a fresh --parallel 4 runner (256-token slots, 1024-cell cache), on the
    --parallel 1 runner (64 tokens), and on the --parallel 4 runner again with three other sequences in the same
    batches gives the same text."""
    gen = _start(smollm2_path, logdir, "p3x4-seed", ["--parallel", "4", "--ctx-size", "1024"])
    r4 = next(gen)
    try:
        with r4.client() as c4, runner1.client() as c1:
            alone = _ok(complete(c4, _seeded())).text
            assert _ok(complete(c1, _seeded())).text == alone
            with ThreadPoolExecutor(4) as pool:
                futs = [pool.submit(complete, c4, _seeded())] + [
                    pool.submit(complete, c4, p3_request(p, num_predict=20)) for p in PROMPTS[1:]]
                batched = _ok(futs[0].result()).text
                for f in futs[1:]:
                    assert _ok(f.result()).final["eval_count"] == 20
    finally:
        gen.close()
    assert batched == alone


def test_prompt_longer_than_slot_is_truncated(runner4: RunnerProcess) -> None:
    long_prompt = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(150))
    with runner4.client() as c:
        s = _ok(complete(c, p3_request(long_prompt, num_predict=5, num_keep=4)))
    assert s.final["done"] is True and s.final["done_reason"] == 1 and s.final["eval_count"] == 5
    assert s.final["prompt_eval_count"] == 1024 // 4  # cut to the per-slot context, not ctx-size
    assert s.text.strip()


def test_generation_past_context_shifts(runner1: RunnerProcess) -> None:
    n_shifts = runner1.stderr().count("context shift:")
    with runner1.client() as c:
        s = _ok(complete(c, p3_request(PROMPT, num_predict=100)))
        assert runner1.stderr().count("context shift:") > n_shifts
        assert s.final["done_reason"] == 1 and s.final["eval_count"] == 100  # 5 + 100 > 64: shifted at least once
        assert s.text.startswith(EXPECTED_20)  # the first 59 tokens fit without a shift
        rest = s.text[len(EXPECTED_20):]
        assert len(rest.split()) >= 20 and sum(ch.isalpha() for ch in rest) > len(rest) // 2, rest
        # the slot still works afterwards
        assert _ok(complete(c, p3_request(PROMPT, num_predict=20))).text == EXPECTED_20


def test_client_disconnect_frees_slot(runner1: RunnerProcess) -> None:
    """--parallel 1: an abandoned stream must give its slot back at once, or the next request waits forever."""
    with runner1.client() as c:
        # control: this prompt runs at least 200 tokens without an EOS, so an unlimited request holds the slot
        t0 = time.monotonic()
        control = _ok(complete(c, p3_request(PROMPT, num_predict=200)))
        t_control = time.monotonic() - t0
        assert control.final["done_reason"] == 1, "control ended early; pick a longer-running prompt"
    with httpx.Client(base_url=runner1.url, timeout=30) as c:
        with c.stream("POST", "/completion", json=p3_request(PROMPT, num_predict=0)) as r:  # 0: unlimited
            assert r.status_code == 200
            first = next(ln for ln in r.iter_lines() if ln)
            assert json.loads(first)["done"] is False
        # the connection is closed now
    t0 = time.monotonic()
    with httpx.Client(base_url=runner1.url, timeout=30) as c:
        s = _ok(complete(c, p3_request("Once upon a time", num_predict=8)))
    elapsed = time.monotonic() - t0
    assert s.final["eval_count"] == 8 and s.text
    wait = s.final["prompt_eval_duration"] / 1e9  # from request arrival (incl. waiting for the slot) to 1st token
    print(f"\nafter disconnect: answered in {elapsed:.2f}s (waited {wait:.2f}s); 200 tokens took {t_control:.2f}s")
    assert wait < t_control / 2, (wait, t_control)


def test_client_gone_while_queued_is_dropped(runner1: RunnerProcess) -> None:
    """--parallel 1: a request whose client gives up while it waits for the slot is never run (Go: empty 200)."""
    placed = runner1.stderr().count("seq placed")
    with httpx.Client(base_url=runner1.url, timeout=30) as c:
        with c.stream("POST", "/completion", json=p3_request(PROMPT, num_predict=0)) as r:  # holds the slot
            assert r.status_code == 200
            lines = r.iter_lines()  # keep the iterator: closing it would close the connection
            assert json.loads(next(lines))["done"] is False
            with pytest.raises(httpx.ReadTimeout):  # waits for the slot, then its client gives up
                httpx.post(runner1.url + "/completion", json=p3_request("Once upon a time", num_predict=4),
                           timeout=0.5)
            time.sleep(0.5)  # let the runner notice the closed connection
    with runner1.client() as c:
        s = _ok(complete(c, p3_request("The three primary colors are", num_predict=4)))
    assert s.final["eval_count"] == 4
    assert runner1.stderr().count("seq placed") - placed == 2, "the abandoned request was run"


# ---- errors ----------------------------------------------------------------------------------------------------

def _assert_go_error(r: httpx.Response, status: int, body: bytes) -> None:
    assert r.status_code == status, (r.status_code, r.content)
    assert r.content == body
    assert r.headers["content-type"].startswith("text/plain")


def test_errors(runner4: RunnerProcess) -> None:
    with runner4.client() as c:
        _assert_go_error(c.post("/completion", content=b'{"Prompt": "x", ', headers={"Content-Type":
                                                                                     "application/json"}),
                         400, b"Bad request\n")
        _assert_go_error(c.post("/completion", content=b"not json"), 400, b"Bad request\n")
        _assert_go_error(c.post("/completion", json={"Prompt": 5}), 400, b"Bad request\n")  # wrong type
        _assert_go_error(c.post("/embedding", content=b"{"), 400, b"Bad request\n")
        assert c.get("/completion").status_code == 405
        assert c.post("/health").status_code == 405
        assert c.get("/embedding").status_code == 405
        assert c.get("/nope").status_code == 404
        assert c.post("/tokenize", json={"content": "x"}).status_code == 404
        _assert_go_error(c.post("/embedding", json={"content": "x"}), 501,
                         b"this model does not support embeddings\n")
        # the runner is still fine
        assert c.get("/health").json() == {"status": 0, "progress": 1}


def test_bad_model_path(logdir: Path, tmp_path: Path) -> None:
    r = RunnerProcess.start(tmp_path / "missing.gguf", ["--threads", "1"], logdir, name="bad")
    try:
        rc = r.proc.wait(timeout=60)
    finally:
        r.stop()
    err = r.stderr()
    assert rc != 0
    assert any(ln.startswith("error loading model:") for ln in err.splitlines()), err[-2000:]


# ---- older dialects --------------------------------------------------------------------------------------------

def test_p2_dialect(runner_p2: RunnerProcess) -> None:
    with runner_p2.client() as c:
        assert c.get("/health").json() == {"status": 0, "progress": 1}
        s = _ok(complete(c, p3_request(PROMPT, num_predict=20)))
        assert s.text == EXPECTED_20
        for obj in s.objects:
            assert list(obj) == P3_KEYS
            assert type(obj["done_reason"]) is str
        assert all(o["done_reason"] == "" for o in s.objects[:-1])
        assert s.final["done"] is True and s.final["done_reason"] == "length" and s.final["eval_count"] == 20
        s = _ok(complete(c, p3_request(PROMPT, num_predict=30, stop=["United States"])))
        assert s.final["done_reason"] == "stop" and s.text == " Paris.\n\nThe "


def test_p1_dialect(runner_p1: RunnerProcess) -> None:
    with runner_p1.client() as c:
        assert c.get("/health").json() == {"status": "ok", "progress": 1}
        # llama.cpp-style snake_case keys; unspecified keys take Ollama's defaults (so turn the penalty off)
        body = {"prompt": PROMPT, "n_predict": 20, "temperature": 0, "repeat_penalty": 1.0, "stream": True,
                "cache_prompt": True, "image_data": None, "stop": None}
        s = _ok(complete(c, body))
        assert s.text == EXPECTED_20
        *chunks, final = s.objects
        zero = {"predicted_n": 0, "predicted_ms": 0, "prompt_n": 0, "prompt_ms": 0}
        for obj in chunks:
            assert list(obj) == ["content", "stop", "timings"] and obj["stop"] is False
            assert obj["timings"] == zero
        assert list(final) == ["content", "stop", "stopped_limit", "timings"]
        assert final["content"] == "" and final["stop"] is True and final["stopped_limit"] is True
        t = final["timings"]
        assert list(t) == ["predicted_n", "predicted_ms", "prompt_n", "prompt_ms"]
        assert t["predicted_n"] == 20 and t["prompt_n"] > 0
        assert isinstance(t["predicted_ms"], (int, float)) and 0 < t["predicted_ms"] < 1_000_000  # milliseconds
        # a stop string: no stopped_limit key at all (omitempty)
        s = _ok(complete(c, {**body, "stop": ["United States"]}))
        assert s.text == " Paris.\n\nThe "
        assert list(s.final) == ["content", "stop", "timings"] and s.final["stop"] is True
