"""A device the backend relies on fails for good (an RPC host died, ggml parked the loop thread inside a compute):
the engine's backend watch ends the running and the waiting requests with the backend's reason, turns /health to
error and answers new requests at once. The real RPC case runs in tests/test_rpc.py; here the parked compute is a
forward pass that blocks, on a tiny random-weight llama."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.cli import Loaded
from runner.engine import Engine, Event
from runner.protocol import CompletionRequest
from runner.sampling import SamplerParams
from tiny_gguf import llama_spec, write_gguf

REASON = "RPC endpoint 10.0.0.9:50052 is gone: Remote RPC server crashed or returned malformed response"


@pytest.fixture
def loaded(tmp_path: Path) -> Iterator[Loaded]:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, llama_spec(n_layer=2))
    m = Loaded(str(path), 1)
    yield m
    m.backend.close()


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)
        if ev.done is not None:
            self.done.set()


def request(n: int) -> CompletionRequest:
    return CompletionRequest(prompt="the cat", images=(), sampling=SamplerParams(), num_predict=n, num_keep=0,
                             stop=())


def test_a_failed_device_ends_every_request_and_turns_health_red(loaded: Loaded,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    failed = threading.Event()
    parked = threading.Event()
    calls = [0]

    def forward(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == 4:  # mid-generation: the host dies, ggml parks this thread
            failed.set()
            parked.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(loaded.backend, "failure", lambda: REASON if failed.is_set() else None)
    engine = Engine(loaded.backend, loaded.model, loaded.tokenizer, n_ctx=128, n_batch=32, parallel=2)
    real = engine._forward.logits  # every pass, kept graph or fresh, goes through here
    monkeypatch.setattr(engine._forward, "logits", forward)
    engine.start()
    try:
        outs = [Collector() for _ in range(3)]  # two run, one waits for a slot
        for c in outs:
            engine.submit(request(40), c)
        t0 = time.monotonic()
        for c in outs:
            assert c.done.wait(5), "a request was left hanging"
        assert time.monotonic() - t0 < 5
        assert calls[0] == 4  # the loop never came back from the parked pass
        for c in outs:
            assert c.events[-1].error == f"a device failed: {REASON}"
        assert engine.health_error() == f"a device failed: {REASON}"
        late = Collector()
        engine.submit(request(5), late)
        assert late.done.is_set() and late.events[-1].error == f"a device failed: {REASON}"
        replies: list[Any] = []
        engine.submit_embedding("x", replies.append)
        assert replies == [f"a device failed: {REASON}"]
    finally:
        t_close = time.monotonic()
        engine.close()
        assert time.monotonic() - t_close < 2  # does not wait on the parked loop thread
        parked.set()
        engine._thread.join(10)  # let it finish before the fixture frees the model under it
