"""Layers on other hosts through ggml's RPC backend: two `ollama-pyrunner rpc-server` processes on loopback, the
model split local / remote / remote. The split run must give the single-process logits bit for bit (the servers
run the same reference kernels), and the runner must survive an endpoint that is down or dies."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ggml import rpc
from ggml._lib import ffi, lib
from ggml.backend import load_backend
from ggml.runtime import RuntimeOptions
from ml.batch import Batch
from ml.dtype import DType
from ml.errors import ModelLoadError
from models import load_model
from tests.test_server_support import PYTHON, REPO, RunnerProcess, free_port, p3_request

SPLIT = (1.0, 1.0, 1.0)  # local, remote 1, remote 2
N_DECODE = 6
N_PROMPT = 72


class RpcServer:
    def __init__(self, log_dir: Path, threads: int = 1, env: dict[str, str] | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = log_dir / f"rpc-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([PYTHON, "-m", "runner.cli", "rpc-server", "--port", str(self.port),
                                          "--threads", str(threads), *extra], cwd=REPO, stdout=out, stderr=out,
                                         env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        deadline = time.monotonic() + 30
        while True:
            try:
                rpc.probe(self.endpoint, timeout_s=2)
                return
            except rpc.RpcError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"rpc-server did not start:\n{self.log.read_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RpcServer]]:
    log_dir = tmp_path_factory.mktemp("rpc")
    # The servers must run the reference kernels, as the runner does (with "1" here the logits differ at once).
    env = {"OLLAMA_PYRUNNER_FAST_KERNELS": "0"}
    started = [RpcServer(log_dir, env=env), RpcServer(log_dir, env=env)]
    yield started
    for s in started:
        s.stop()


def _buft_name(tensor: Any) -> str:
    return ffi.string(lib.ggml_backend_buft_name(lib.ggml_backend_buffer_get_type(tensor._ptr.buffer))).decode()


def greedy_logits(path: Path, rpc_endpoints: tuple[str, ...] = ()) -> tuple[list[int], list[np.ndarray], Any]:
    """Prompt logits, then N_DECODE greedy steps: (chosen ids, logits of every step, where layer 0/15/29 live)."""
    opts = RuntimeOptions(threads=1, rpc=rpc_endpoints, tensor_split=SPLIT if rpc_endpoints else ())
    backend = load_backend(path, opts)
    try:
        model = load_model(backend)
        n_vocab = int(model.params.n_vocab)
        cache = model.new_cache(flash=True)
        cache.init(backend, DType.F16, 1, 256, 128)
        # 72 prompt rows: with ggml's fast kernels on either side (tiled attention from 64 rows) the bits differ
        tokens = [int(t) for t in np.random.default_rng(5).integers(300, 30000, N_PROMPT)]
        ids: list[int] = []
        steps: list[np.ndarray] = []
        pos = 0
        while len(steps) <= N_DECODE:
            batch = Batch(np.array(tokens, np.int32), np.arange(pos, pos + len(tokens), dtype=np.int32),
                          np.zeros(len(tokens), np.int32), np.array([len(tokens) - 1], np.int32))
            ctx = backend.new_context()
            try:
                out = model.forward(ctx, batch, cache)
                ctx.forward(out).compute(out)
                logits = np.array(out.numpy()).reshape(-1, n_vocab)[-1]
            finally:
                ctx.close()
            steps.append(logits)
            pos += len(tokens)
            tokens = [int(np.argmax(logits))]
            ids.append(tokens[0])
        n_layer = backend.n_layer  # the KV cache tensors exist once a forward pass has run
        keys: dict[int, Any] = {}
        for part in getattr(cache, "caches", [cache]):  # Gemma 3: sliding-window and global layers apart
            keys.update(part.keys)
        places = {il: (backend.runtime.device_of_layer(il, n_layer),
                       _buft_name(backend.get(f"blk.{il}.attn_q.weight")), _buft_name(keys[il]))
                  for il in (0, n_layer // 2, n_layer - 1)}
        cache.close()
        return ids, steps, places
    finally:
        backend.close()


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_split_over_two_rpc_servers_matches_one_process_bit_for_bit(
        model: str, servers: list[RpcServer], request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(f"{model}_path")
    ids, steps, _ = greedy_logits(path)
    r_ids, r_steps, places = greedy_logits(path, tuple(s.endpoint for s in servers))
    # the split really happened: first layer local, middle on the first server, last on the second, each
    # layer's weights and KV cache in that device's buffers
    first, middle, last = sorted(places)
    assert places[first] == (-1, "CPU", "CPU")
    assert places[middle][0] == 0 and places[middle][1:] == (f"RPC0[{servers[0].endpoint}]",) * 2
    assert places[last][0] == 1 and places[last][1:] == (f"RPC0[{servers[1].endpoint}]",) * 2
    assert r_ids == ids
    for step, (a, b) in enumerate(zip(steps, r_steps)):
        assert np.array_equal(a, b), f"step {step}: max |diff| {np.abs(a - b).max()}"


def test_endpoint_down_at_start_is_a_load_error_naming_it(smollm2_path: Path, servers: list[RpcServer]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match=f"RPC endpoint {dead} is not reachable"):
        load_backend(smollm2_path, RuntimeOptions(threads=1, rpc=(servers[0].endpoint, dead)))
    assert time.monotonic() - t0 < 10


def test_something_else_on_the_port_is_a_load_error(smollm2_path: Path) -> None:
    """A listener that is not an rpc-server (closes at once) must not reach ggml's connect, which would abort."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"

        def close_each() -> None:
            conn, _ = listener.accept()
            conn.close()

        threading.Thread(target=close_each, daemon=True).start()
        with pytest.raises(ModelLoadError, match=f"RPC endpoint {endpoint}"):
            load_backend(smollm2_path, RuntimeOptions(threads=1, rpc=(endpoint,)))


def test_endpoint_killed_mid_generation_ends_the_request_and_health_says_error(
        smollm2_path: Path, tmp_path: Path) -> None:
    """In a runner subprocess: ggml parks the thread that met the dead host, so this process must not be ours."""
    own = [RpcServer(tmp_path), RpcServer(tmp_path)]
    runner = RunnerProcess.start(smollm2_path, ["--threads", "1", "--ctx-size", "4096", "--tensor-split", "1,1,1",
                                                "--rpc", ",".join(s.endpoint for s in own)], tmp_path)
    try:
        runner.wait_ready(timeout=60)
        with runner.client(timeout=30) as c:
            body = p3_request("Write a long story", temperature=0, num_predict=3000)
            lines: list[dict[str, Any]] = []
            t0 = time.monotonic()
            with c.stream("POST", "/completion", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line:
                        continue
                    lines.append(json.loads(line))
                    if len(lines) == 5:
                        own[1].stop()  # the host of the last layers dies mid-generation
                        t_kill = time.monotonic()
            ended = time.monotonic()
            assert len(lines) >= 5 and ended - t_kill < 10, (len(lines), ended - t0)
            assert not any(o.get("done") for o in lines)  # no normal end: the stream broke off
            deadline = time.monotonic() + 10
            while c.get("/health").json().get("status") not in (4, "error") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert c.get("/health").json().get("status") in (4, "error")
            # a new request gets its error at once, it does not wait on the parked loop
            t1 = time.monotonic()
            r2 = c.post("/completion", json=body)
            assert r2.status_code == 500 and time.monotonic() - t1 < 5, r2.text
        assert f"RPC endpoint {own[1].endpoint} is gone" in runner.stderr()
    finally:
        runner.stop()
        for s in own:
            s.stop()


def test_mem_is_the_memory_the_server_reports(tmp_path: Path) -> None:
    server = RpcServer(tmp_path, extra=("--mem", "123"))
    try:
        free, total = ffi.new("size_t *"), ffi.new("size_t *")
        lib.pyrunner_rpc_device_memory(server.endpoint.encode(), free, total)
        assert (free[0], total[0]) == (123 << 20, 123 << 20)
    finally:
        server.stop()


def test_port_in_use_ends_rpc_server_with_an_error(servers: list[RpcServer]) -> None:
    port = servers[0].endpoint.rpartition(":")[2]
    r = subprocess.run([PYTHON, "-m", "runner.cli", "rpc-server", "--port", port, "--threads", "1"], cwd=REPO,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1 and f"could not serve on 127.0.0.1:{port}" in r.stderr


def test_host_failing_after_hello_ends_the_runner_load_with_an_error(smollm2_path: Path, tmp_path: Path) -> None:
    """A host that passes the probe and then drops ggml's connection: the loading thread is parked inside ggml,
    and the runner exits with the reason instead of loading forever."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"

        def hello_then_close() -> None:  # answers HELLO like ggml's server, then hangs up
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(1 + 8 + 24)
                    conn.sendall((28).to_bytes(8, "little") + bytes([rpc.PROTO_MAJOR, 0, 0, 0]) + bytes(24))
                    conn.recv(1)

        threading.Thread(target=hello_then_close, daemon=True).start()
        runner = RunnerProcess.start(smollm2_path, ["--threads", "1", "--rpc", endpoint], tmp_path)
        try:
            assert runner.proc.wait(timeout=30) == 1
            assert "error loading model: an RPC device failed:" in runner.stderr()
        finally:
            runner.stop()


def test_a_busy_server_is_refused_with_a_reason(servers: list[RpcServer]) -> None:
    """ggml's server takes one client at a time: a second one's HELLO waits, and the probe says why it gave up."""
    host, _, port = servers[0].endpoint.rpartition(":")
    with socket.create_connection((host, int(port))) as first:
        first.sendall(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))
        assert len(first.recv(64)) > 0  # the first client is being served
        with pytest.raises(rpc.RpcError, match="serves one client at a time"):
            rpc.probe(servers[0].endpoint, timeout_s=1)
    rpc.probe(servers[0].endpoint)  # free again once the first client left
