"""The batch loop survives any one sequence's failure (issue 10): a sampler that raises mid-stream, a forward pass
that fails, hostile sampling values, a forward pass that never returns. Each test runs the real engine in-process
on a tiny random-weight llama and compares the surviving sequences with their serial runs token for token."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

import runner.engine as engine_mod
from ml.errors import ModelLoadError
from runner.cli import Loaded
from runner.engine import ComputeWatch, Engine, Event
from runner.protocol import CompletionRequest, Dialect
from runner.responses import DoneReason, ServerStatus
from runner.sampling import Sampler, SamplerParams
from runner.server import RunnerState, build_app
from tiny_gguf import llama_spec, make_weights, write_gguf

F32_MAX = float(np.finfo(np.float32).max)
FAIL_SEED = 666  # the test sampler below raises for requests with this seed


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("survive") / "tiny.gguf"
    write_gguf(path, llama_spec(n_layer=2))
    return path


@pytest.fixture
def loaded(tiny_path: Path) -> Iterator[Loaded]:
    m = Loaded(str(tiny_path), 1)
    yield m
    m.backend.close()


def new_engine(m: Loaded, parallel: int = 3, **kw: Any) -> Engine:
    e = Engine(m.backend, m.model, m.tokenizer, n_ctx=64 * parallel, n_batch=32, parallel=parallel, **kw)
    e.start()
    return e


class Collector:
    def __init__(self) -> None:
        self.text = ""
        self.final: Event | None = None
        self.done = threading.Event()

    def __call__(self, ev: Event) -> None:
        self.text += ev.text
        if ev.done is not None:
            self.final = ev
            self.done.set()


def request(prompt: str = "the cat", n: int = 10, **sampling: Any) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, images=(), sampling=SamplerParams(**sampling), num_predict=n,
                             num_keep=0, stop=())


def run_all(engine: Engine, reqs: list[CompletionRequest], timeout: float = 60.0) -> list[Collector]:
    outs = [Collector() for _ in reqs]
    for r, c in zip(reqs, outs):
        engine.submit(r, c)
    for c in outs:
        assert c.done.wait(timeout), "a sequence never finished"
    return outs


def serial_text(m: Loaded, req: CompletionRequest) -> str:
    e = new_engine(m, parallel=1)
    try:
        (out,) = run_all(e, [req])
        assert out.final is not None and out.final.error is None
        return out.text
    finally:
        e.close()


class FailingSampler(Sampler):
    """Raises on its third token for requests seeded FAIL_SEED (a stand-in for any per-sequence failure)."""

    def sample(self, logits: Any) -> int:
        if self.params.seed == FAIL_SEED:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:
                raise RuntimeError("injected sampler failure")
        return super().sample(logits)


def test_sampler_failure_mid_stream_ends_only_that_sequence(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "Sampler", FailingSampler)
    good = [request("the cat", 12), request("a dog sat", 12)]
    want = [serial_text(loaded, r) for r in good]
    e = new_engine(loaded)
    try:
        outs = run_all(e, [good[0], request("on the", 12, temperature=1.0, seed=FAIL_SEED), good[1]])
        bad = outs[1].final
        assert bad is not None and bad.error == "injected sampler failure" and bad.done == DoneReason.STOP
        assert [o.text for o in (outs[0], outs[2])] == want
        assert all(o.final is not None and o.final.error is None for o in (outs[0], outs[2]))
        assert e.health_error() is None
        (later,) = run_all(e, [good[0]])  # the loop still serves, and the failed slot is reusable
        assert later.text == want[0]
    finally:
        e.close()


def test_extreme_sampling_values_complete(loaded: Loaded) -> None:
    """Well-typed but extreme values used to make the sampler raise and stop the engine for good."""
    hostile = [
        dict(temperature=0.8, repeat_last_n=64, repeat_penalty=1e-45, seed=1),
        dict(temperature=0.8, repeat_last_n=64, presence_penalty=F32_MAX, frequency_penalty=-F32_MAX, seed=2),
        dict(temperature=0.8, repeat_last_n=-1, presence_penalty=-F32_MAX, frequency_penalty=F32_MAX, seed=3),
        dict(temperature=1e-45, top_k=1 << 30, top_p=1e-45, min_p=1.0, seed=4),
        dict(temperature=F32_MAX, top_p=F32_MAX, min_p=-F32_MAX, seed=-(1 << 63)),
        dict(temperature=0.0, repeat_last_n=1 << 30, repeat_penalty=F32_MAX),
    ]
    greedy = request("the cat", 8)
    want = serial_text(loaded, greedy)
    e = new_engine(loaded, parallel=4)
    try:
        for params in hostile:
            outs = run_all(e, [request("the cat the cat", 6, **params), greedy])
            assert all(o.final is not None and o.final.error is None for o in outs), (params, outs[0].final)
            assert outs[1].text == want
        assert e.health_error() is None
    finally:
        e.close()


def test_forward_failure_fails_its_batch_and_the_loop_goes_on(loaded: Loaded,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    req = request("the cat", 8)
    want = serial_text(loaded, req)
    e = new_engine(loaded)
    real = e._forward.logits  # kept graphs or fresh ones: every pass goes through here
    calls = {"n": 0}

    def flaky(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # mid-generation: the KV cache already holds the prompt
            raise RuntimeError("injected forward failure")
        return real(*args, **kw)

    monkeypatch.setattr(e._forward, "logits", flaky)
    try:
        (first,) = run_all(e, [req])
        assert first.final is not None and first.final.error == "RuntimeError: injected forward failure"
        (again,) = run_all(e, [req])  # the half-written slot was forgotten: same text as a fresh run
        assert again.final is not None and again.final.error is None and again.text == want
        assert e.health_error() is None
    finally:
        e.close()


def test_forward_failing_every_time_turns_health_red(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("backend gone")

    e = new_engine(loaded)
    monkeypatch.setattr(loaded.model, "forward", broken)
    try:
        for i in range(engine_mod.MAX_FAILED_FORWARDS):
            assert e.health_error() is None
            (out,) = run_all(e, [request("the cat", 4)])
            assert out.final is not None and out.final.error == "RuntimeError: backend gone"
        assert e.health_error() == "3 forward passes failed in a row; last: RuntimeError: backend gone"
    finally:
        e.close()


def test_compute_watch_limits() -> None:
    w = ComputeWatch(floor_s=10.0)
    assert w.stalled() is None
    w.begin(4)
    t0 = time.monotonic()
    assert w.stalled(t0 + 9.0) is None
    assert w.stalled(t0 + 11.0) is not None and "4 tokens" in w.stalled(t0 + 11.0)  # type: ignore[operator]
    w.end()
    assert w.stalled(t0 + 1000.0) is None
    # A slow pass raises the expectation: 2 s per token seen -> a 100-token pass may take 50 x 200 s.
    w._per_token_s = 2.0
    w.begin(100)
    t1 = time.monotonic()
    assert w.stalled(t1 + 9999.0) is None and w.stalled(t1 + 10001.0) is not None


def test_health_says_error_while_a_forward_pass_is_stuck(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = loaded.model.forward

    def stuck(*args: Any, **kw: Any) -> Any:
        release.wait(30)
        return real(*args, **kw)

    e = new_engine(loaded, stall_after_s=0.2)
    monkeypatch.setattr(loaded.model, "forward", stuck)
    state = RunnerState(status=ServerStatus.READY, progress=1.0, engine=e)
    state.ready.set()
    try:
        with TestClient(build_app(state, Dialect.P3)) as client:
            assert client.get("/health").json() == {"status": 0, "progress": 1}
            out = Collector()
            e.submit(request("the cat", 2), out)
            # stall_after_s=0.2 from when the pass began; a busy machine may start it late, so poll (bounded)
            deadline = time.monotonic() + 10.0
            while (body := client.get("/health").json()) != {"status": 4, "progress": 1}:
                assert body == {"status": 0, "progress": 1} and time.monotonic() < deadline, body
                time.sleep(0.05)
            release.set()
            assert out.done.wait(30)
            assert client.get("/health").json() == {"status": 0, "progress": 1}
    finally:
        release.set()
        e.close()


def test_warm_up_refuses_a_model_that_gives_nan(tmp_path: Path) -> None:
    spec = llama_spec(n_layer=2)
    w = make_weights(spec)
    w["blk.1.ffn_down.weight"][0, 0] = np.nan
    path = tmp_path / "nan.gguf"
    write_gguf(path, spec, w)
    m = Loaded(str(path), 1)
    try:
        e = Engine(m.backend, m.model, m.tokenizer, n_ctx=64, n_batch=16, parallel=1)
        with pytest.raises(ModelLoadError, match="non-finite values"):
            e.warm_up()
        e.close()
    finally:
        m.backend.close()
