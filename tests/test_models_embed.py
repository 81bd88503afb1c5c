"""Decoders with `<arch>.pooling_type` embed: tiny random-weight GGUFs of every decoder architecture, pooled by
mean / last token / first token, against the float64 numpy reference of test_models_tiny (final-normed hidden
states, causal attention within the input, sliding windows), alone and with two inputs in one batch; through the
engine's embedding queue as the runner calls it; over HTTP from a runner that streams a completion at the same time;
and a decoder without pooling still refuses to embed."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_models_tiny import CASES, PROMPT, reference_hidden, rel_err, tol
from test_server_support import RunnerProcess, complete, p3_request
from tiny_gguf import TinySpec, write_gguf

from ggml import RuntimeOptions, load_backend
from ml.batch import Batch
from models import load_model
from models.pooling import Pooling
from models.tokenizer import tokenizer_from_metadata
from runner.engine import Engine

OTHER = [9, 31, 4, 50, 12, 2, 44]


def reference_pooled(spec: TinySpec, w: dict[str, np.ndarray], tokens: list[int], how: Pooling) -> np.ndarray:
    h = reference_hidden(spec, w, tokens)
    return {Pooling.MEAN: h.mean(axis=0), Pooling.LAST: h[-1], Pooling.CLS: h[0]}[how]


class Tiny:
    def __init__(self, path: Path, spec: TinySpec, seed: int) -> None:
        self.spec = spec
        self.weights = write_gguf(path, spec, seed=seed)
        self.backend = load_backend(path, RuntimeOptions(threads=1))
        self.model = load_model(self.backend, strict=True)

    def embed(self, batch: Batch, flash: bool = False) -> np.ndarray:
        self.model.new_cache(flash=flash)  # as the engine does: sets the attention kernel
        ctx = self.backend.new_context()
        try:
            out = self.model.embed(ctx, batch)
            ctx.forward(out).compute(out)
            return np.array(out.numpy(), dtype=np.float64).reshape(-1, self.spec.n_embd)
        finally:
            ctx.close()


def _pooled_spec(case: str, how: Pooling) -> TinySpec:
    spec = CASES[case]
    return spec.with_(extra_kv={**spec.extra_kv, f"{spec.arch}.pooling_type": int(how)})


@pytest.fixture(scope="module", params=[("llama", Pooling.MEAN), ("qwen2", Pooling.LAST), ("gemma2", Pooling.MEAN),
                                        ("gemma3", Pooling.LAST), ("gemma3", Pooling.CLS)],
                ids=lambda p: f"{p[0]}-{p[1].name.lower()}")
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Tiny, Pooling]]:
    case, how = request.param
    t = Tiny(tmp_path_factory.mktemp("embed") / f"{case}.gguf", _pooled_spec(case, how), seed=sum(map(ord, case)))
    try:
        yield t, how
    finally:
        t.backend.close()


@pytest.mark.parametrize("flash", [False, True], ids=["attn", "flash"])
def test_pooled_embedding_matches_reference(tiny: tuple[Tiny, Pooling], flash: bool) -> None:
    t, how = tiny
    assert t.model.can_embed and t.model.params.pooling == how
    got = t.embed(Batch.single(PROMPT), flash)
    want = reference_pooled(t.spec, t.weights, PROMPT, how)
    assert got.shape == (1, t.spec.n_embd)
    assert rel_err(got[0], want) < tol(t.spec, 2e-4 if flash else 1e-4)
    # the prompt crosses the tiny gemma windows (3 and 4): without them the reference is far off
    if t.spec.window and how != Pooling.CLS:
        unwindowed = reference_hidden(t.spec, t.weights, PROMPT, no_window=True)
        far = unwindowed.mean(axis=0) if how == Pooling.MEAN else unwindowed[-1]
        assert rel_err(got[0], far) > 10 * tol(t.spec)


def test_two_inputs_in_one_batch_embed_apart(tiny: tuple[Tiny, Pooling]) -> None:
    """Two sequences in one forward: each attends to itself only, vectors in order of first appearance."""
    t, how = tiny
    toks = np.array(OTHER + PROMPT, np.int32)
    pos = np.array(list(range(len(OTHER))) + list(range(len(PROMPT))), np.int32)
    seqs = np.array([3] * len(OTHER) + [1] * len(PROMPT), np.int32)
    got = t.embed(Batch(toks, pos, seqs, np.zeros(0, np.int32)))
    assert got.shape == (2, t.spec.n_embd)
    for row, tokens in zip(got, (OTHER, PROMPT)):
        assert rel_err(row, reference_pooled(t.spec, t.weights, tokens, how)) < tol(t.spec)


def test_engine_embeds_with_a_decoder(tmp_path: Path) -> None:
    """The runner's path: text -> tokenizer -> engine queue -> pooled vector; generation still works alongside."""
    t = Tiny(tmp_path / "llama.gguf", _pooled_spec("llama", Pooling.MEAN), seed=7)
    tok = tokenizer_from_metadata(t.backend.metadata)
    engine = Engine(t.backend, t.model, tok, n_ctx=64, n_batch=32, parallel=1)
    engine.start()
    try:
        assert engine.can_embed and engine.can_generate
        text = "ab cd"
        ids = tok.encode(text, add_special=True, parse_special=False)
        assert ids
        result: list[Any] = []
        done = threading.Event()
        engine.submit_embedding(text, lambda r: (result.append(r), done.set()))
        assert done.wait(30)
        assert not isinstance(result[0], str), result[0]
        want = reference_pooled(t.spec, t.weights, ids, Pooling.MEAN)
        assert rel_err(np.asarray(result[0]), want) < tol(t.spec)
    finally:
        engine.close()
        t.backend.close()


def test_empty_batch_is_an_error_not_an_abort(tiny: tuple[Tiny, Pooling]) -> None:
    t, _ = tiny
    with pytest.raises(ValueError, match="empty batch"):
        t.embed(Batch.single([]))


def test_decoder_without_pooling_does_not_embed(tmp_path: Path) -> None:
    t = Tiny(tmp_path / "plain.gguf", CASES["llama"], seed=1)
    try:
        assert t.model.params.pooling == Pooling.NONE and not t.model.can_embed
        engine = Engine(t.backend, t.model, tokenizer_from_metadata(t.backend.metadata), n_ctx=64, n_batch=32,
                        parallel=1)
        assert not engine.can_embed
    finally:
        t.backend.close()


def test_unsupported_pooling_type_means_no_embedding(tmp_path: Path) -> None:
    spec = CASES["llama"].with_(extra_kv={"llama.pooling_type": 4})  # RANK: needs a classifier head
    t = Tiny(tmp_path / "rank.gguf", spec, seed=1)
    try:
        assert t.model.params.pooling == Pooling.NONE and not t.model.can_embed
    finally:
        t.backend.close()


def test_http_embeddings_interleave_with_a_streaming_completion(tmp_path: Path) -> None:
    """A runner serving a decoder that both generates and embeds: 8 /embedding requests sent at once while a
    /completion streams; every one succeeds, each vector equals its serial value, the completion streams to its
    end."""
    path = tmp_path / "llama-mean.gguf"
    write_gguf(path, _pooled_spec("llama", Pooling.MEAN), seed=11)
    texts = ["the cat sat on the mat.", "a bat", "the the the", "in at on", "sea, sand and sun.", "he is here",
             "z", "on"]
    r = RunnerProcess.start(path, ["--threads", "1", "--parallel", "2", "--ctx-size", "256"], tmp_path,
                            name="tiny-embed")
    try:
        r.wait_ready()
        with r.client() as c:
            def embed(text: str) -> list[float]:
                resp = c.post("/embedding", json={"content": text})
                assert resp.status_code == 200, resp.text
                return list(resp.json()["embedding"])

            # no BOS in this vocabulary: an empty text has no token to pool, a clear error, and the runner goes on
            resp = c.post("/embedding", json={"content": ""})
            assert resp.status_code == 500
            assert resp.content == b"failed to embed: ValueError: the input is empty after tokenization\n"
            serial = [embed(t) for t in texts]
            with ThreadPoolExecutor(len(texts) + 1) as pool:
                gen = pool.submit(complete, c, p3_request("the cat", num_predict=24, temperature=0))
                together = list(pool.map(embed, texts))
                stream = gen.result()
    finally:
        r.stop()
    assert together == serial
    assert all(len(v) == CASES["llama"].n_embd and any(v) for v in serial)
    assert stream.status == 200 and stream.final["done"] is True
    assert 1 <= stream.final["eval_count"] <= 24
