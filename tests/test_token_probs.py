"""n_probs / logprobs: each generated token's log-probability and the likeliest tokens', from the softmax of the raw
logits the sampler saw (llama-server's n_probs without post_sampling_probs). Checked against a brute-force float64
reference on the very rows the engine's sampler received, event by event: with sampling, with a stop string (only
the pieces sent whole report their tokens), and not at all when nobody asked."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runner.engine as engine_mod
from runner.cli import Loaded
from runner.engine import Engine, Event
from runner.protocol import CompletionRequest
from runner.sampling import Sampler, SamplerParams, TokenProbs, token_probs
from tiny_gguf import llama_spec, write_gguf


def reference(row: np.ndarray, token: int, n: int) -> TokenProbs:
    """log p_i = x_i - log(sum_j exp x_j) over the finite logits, in float64; likeliest first, ties by id;
    -9999 for a token of no probability."""
    x = np.asarray(row, dtype=np.float64)
    lse = np.logaddexp.reduce(x[np.isfinite(x)])

    def lp(i: int) -> float:
        return max(float(x[i] - lse), -9999.0) if np.isfinite(x[i]) else -9999.0
    order = sorted(range(x.size), key=lambda i: (-lp(i), i))[:n]
    return TokenProbs(token, lp(token), tuple((i, lp(i)) for i in order))


def close(got: TokenProbs, want: TokenProbs) -> None:
    assert got.token == want.token and [t for t, _ in got.top] == [t for t, _ in want.top]
    np.testing.assert_allclose([got.logprob, *(v for _, v in got.top)],
                               [want.logprob, *(v for _, v in want.top)], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_token_probs_match_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    row = (rng.standard_normal(300) * 4).astype(np.float32)
    row[rng.integers(0, 300, 20)] = row[7]  # ties
    row[rng.integers(0, 300, 5)] = -np.inf  # masked tokens
    for token, n in [(7, 10), (int(np.argmax(row)), 1), (3, 0), (11, 300), (12, 500)]:
        close(token_probs(row, token, n), reference(row, token, n))
    got = token_probs(row, 0, 300)
    assert abs(sum(np.exp(v) for _, v in got.top) - 1.0) < 1e-9  # the whole vocabulary sums to one


def test_extreme_rows() -> None:
    big = np.array([3e38, -3e38, 0.0], dtype=np.float32)
    got = token_probs(big, 1, 3)
    assert got.top[0] == (0, 0.0) and got.logprob == -9999.0 and all(np.isfinite(v) for _, v in got.top)
    lone = np.array([-np.inf, 2.0, -np.inf], dtype=np.float32)
    assert token_probs(lone, 1, 2) == TokenProbs(1, 0.0, ((1, 0.0), (0, -9999.0)))


# ---- through the engine --------------------------------------------------------------------------------------

ROWS: list[tuple[np.ndarray, int]] = []


class RecordingSampler(Sampler):
    def sample(self, logits: Any) -> int:
        token = super().sample(logits)
        ROWS.append((np.array(logits, copy=True), token))
        return token


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    path: Path = tmp_path_factory.mktemp("probs") / "tiny.gguf"
    write_gguf(path, llama_spec(n_layer=2))
    m = Loaded(str(path), 1)
    yield m
    m.backend.close()


def generate(m: Loaded, req: CompletionRequest, monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    monkeypatch.setattr(engine_mod, "Sampler", RecordingSampler)
    ROWS.clear()
    events: list[Event] = []
    done = threading.Event()

    def sink(ev: Event) -> None:
        events.append(ev)
        if ev.done is not None:
            done.set()
    e = Engine(m.backend, m.model, m.tokenizer, n_ctx=128, n_batch=32, parallel=1)
    e.start()
    try:
        e.submit(req, sink)
        assert done.wait(60)
    finally:
        e.close()
    assert events[-1].error is None, events[-1]
    return events


def req(n_probs: int, stop: tuple[str, ...] = (), **sampling: Any) -> CompletionRequest:
    return CompletionRequest(prompt="the cat sat", images=(), sampling=SamplerParams(**sampling), num_predict=12,
                             num_keep=0, stop=stop, n_probs=n_probs)


def test_every_token_reports_the_rows_probabilities(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    events = generate(loaded, req(5, temperature=1.5, seed=3, top_k=0), monkeypatch)
    tokens = [t for ev in events for t in ev.tokens]
    probs = [p for ev in events for p in ev.probs]
    sampled = [t for _, t in ROWS if not loaded.tokenizer.is_eog(t)]
    assert tokens == sampled and len(probs) == len(tokens) and len(tokens) >= 2
    for (row, token), got in zip(ROWS, probs):
        close(got, reference(row, token, 5))
    assert any(p.top[0][0] != p.token for p in probs)  # sampled, not greedy: the reported token is not always top
    for ev in events:  # every text event carries the tokens its text is made of
        assert b"".join(loaded.tokenizer.token_bytes(t) for t in ev.tokens).decode() == ev.text


def test_a_stop_string_keeps_only_the_pieces_sent(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    first = generate(loaded, req(3, temperature=0.0), monkeypatch)
    all_tokens = [t for ev in first for t in ev.tokens]
    piece = loaded.tokenizer.token_bytes(all_tokens[3]).decode()
    k = next(i for i, t in enumerate(all_tokens) if piece in loaded.tokenizer.token_bytes(t).decode())
    events = generate(loaded, req(3, (piece,), temperature=0.0), monkeypatch)
    tokens = [t for ev in events for t in ev.tokens]
    assert events[-1].stop_word == piece and tokens == all_tokens[:len(tokens)] and len(tokens) <= k
    assert [p.token for ev in events for p in ev.probs] == tokens
    assert b"".join(loaded.tokenizer.token_bytes(t) for t in tokens).decode() == "".join(ev.text for ev in events)


def test_no_probabilities_unless_asked(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    events = generate(loaded, req(0, temperature=0.0), monkeypatch)
    assert all(not ev.probs for ev in events) and sum(len(ev.tokens) for ev in events) >= 1
