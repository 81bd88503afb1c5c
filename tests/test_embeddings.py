"""Embeddings end to end with all-MiniLM-L6-v2: our converter's GGUF, run by our engine, against the Hugging Face
reference vectors (../shared/fixtures/minilm-reference.json: text, token_ids, mean_pooled per case); then the same
vectors over HTTP (`POST /embedding` of a runner subprocess) and from `ollama-pyrunner embed`.
"""
from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from test_server_support import (HEALTH_DEADLINE_S, PYTHON, REPO, HealthWatch, RunnerProcess, complete, describe,
                                 p3_request, worst_latency)

from ml.batch import Batch
from ml.dtype import DType
from models.convert import convert
from models.tokenizer import tokenizer_from_metadata
from runner.cli import Loaded
from runner.engine import Engine

pytestmark = pytest.mark.slow

Vector = npt.NDArray[np.float32]
# longer than MiniLM's 512 positions: ~1,600 word pieces
LONG_TEXT = " ".join(f"Sentence number {i} talks about apples, rivers and distant mountains." for i in range(120))


@pytest.fixture(scope="module")
def reference(shared_dir: Path) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((shared_dir / "fixtures" / "minilm-reference.json").read_text())["cases"]
    assert len(cases) == 6
    return cases


@pytest.fixture(scope="module")
def ggufs(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """all-MiniLM-L6-v2 converted by our converter, per output type."""
    out = tmp_path_factory.mktemp("minilm")
    paths = {}
    for outtype in ("f32", "f16", "q8_0"):
        paths[outtype] = out / f"minilm-{outtype}.gguf"
        convert(minilm_dir, paths[outtype], outtype)
    return paths


class Embedder:
    """Our engine over one GGUF, in this process (1 thread, as the runner subprocesses use)."""

    def __init__(self, path: Path) -> None:
        self.loaded = Loaded(str(path), 1)
        self.engine = Engine(self.loaded.backend, self.loaded.model, self.loaded.tokenizer, n_ctx=2048, n_batch=512,
                             parallel=1)
        self.engine.start()

    def __call__(self, text: str) -> Vector:
        done = threading.Event()
        result: list[list[float] | str] = []

        def reply(r: list[float] | str) -> None:
            result.append(r)
            done.set()

        self.engine.submit_embedding(text, reply)
        assert done.wait(60)
        assert not isinstance(result[0], str), result[0]
        return np.asarray(result[0], dtype=np.float32)

    def close(self) -> None:
        self.engine.close()
        self.loaded.backend.close()


@pytest.fixture(scope="module")
def embedders(ggufs: dict[str, Path]) -> Iterator[Callable[[str], Embedder]]:
    made: dict[str, Embedder] = {}

    def get(outtype: str) -> Embedder:
        if outtype not in made:
            made[outtype] = Embedder(ggufs[outtype])
        return made[outtype]

    yield get
    for e in made.values():
        e.close()


@pytest.fixture(scope="module")
def runner(ggufs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    """A runner subprocess serving the f16 MiniLM, launched as Ollama launches an embedding model."""
    yield from RunnerProcess.serving(ggufs["f16"], ["--threads", "1", "--parallel", "1", "--ctx-size", "2048"],
                                     tmp_path_factory.mktemp("runner-logs"), name="minilm")


def _cos(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def _http_embed(c: httpx.Client, text: str) -> Vector:
    r = c.post("/embedding", json={"content": text})
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["embedding"]
    return np.asarray(body["embedding"], dtype=np.float32)


# ---- tokenizer and numbers -------------------------------------------------------------------------------------

def test_token_ids_match_reference(ggufs: dict[str, Path], reference: list[dict[str, Any]]) -> None:
    loaded = Loaded(str(ggufs["f16"]), 1)
    try:
        tok = tokenizer_from_metadata(loaded.backend.metadata)
        for case in reference:
            assert tok.encode(case["text"], add_special=True, parse_special=False) == case["token_ids"], case["text"]
    finally:
        loaded.backend.close()


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_embeddings_match_reference(outtype: str, embedders: Callable[[str], Embedder],
                                    reference: list[dict[str, Any]]) -> None:
    embed = embedders(outtype)
    for case in reference:
        v = embed(case["text"])
        assert v.shape == (384,) and np.all(np.isfinite(v))
        cos = _cos(v, case["mean_pooled"])
        assert cos >= 0.9999, (case["text"], cos)
        # pooled, not normalised (the server normalises): the reference's scale, not unit length
        assert np.linalg.norm(v) == pytest.approx(np.linalg.norm(case["mean_pooled"]), rel=1e-3)


def test_embeddings_q8_0(embedders: Callable[[str], Embedder], reference: list[dict[str, Any]]) -> None:
    """q8_0: >= 0.999 for every text, the empty input ([CLS] [SEP] only) included. That needs the weights held
    as F16 (Bert.widen_weights): with ggml's 8-bit activations of a q8_0 mat-mul it scores 0.9983."""
    e = embedders("q8_0")
    assert e.loaded.backend.get("blk.0.attn_q.weight").dtype == DType.F16  # q8_0 in the file, F16 in memory
    for case in reference:
        cos = _cos(e(case["text"]), case["mean_pooled"])
        assert cos >= 0.999, (case["text"], cos)


def test_long_input_truncated(embedders: Callable[[str], Embedder]) -> None:
    e = embedders("f16")
    tokens = e.loaded.tokenizer.encode(LONG_TEXT, add_special=True, parse_special=False)
    n_ctx = e.loaded.model.params.n_ctx_train
    assert len(tokens) > n_ctx == 512
    v = e(LONG_TEXT)  # not an error
    assert v.shape == (384,) and np.all(np.isfinite(v))
    # the engine keeps the first n_ctx tokens
    ctx = e.loaded.backend.new_context()
    try:
        model: Any = e.loaded.model
        out = model.embed(ctx, Batch.single(tokens[:n_ctx]))
        ctx.forward(out).compute(out)
        head = out.numpy().reshape(-1)
    finally:
        ctx.close()
    np.testing.assert_array_equal(v, head)


# ---- over HTTP and from the command line -----------------------------------------------------------------------

def test_http_embedding_equals_engine(runner: RunnerProcess, embedders: Callable[[str], Embedder],
                                      reference: list[dict[str, Any]]) -> None:
    e = embedders("f16")
    with runner.client() as c:
        assert c.get("/health").json() == {"status": 0, "progress": 1}
        for text in [case["text"] for case in reference] + [LONG_TEXT]:
            got = _http_embed(c, text)
            # Go's float32 formatting round-trips: the same float32 values, bit for bit
            np.testing.assert_array_equal(got, e(text), err_msg=text[:40])
        r = c.post("/embedding", content=b'{"content": ')
        assert (r.status_code, r.content) == (400, b"Bad request\n")


def test_concurrent_embeddings_and_a_completion(runner: RunnerProcess, reference: list[dict[str, Any]]) -> None:
    """8 embedding requests at once, with a completion request to the same runner in the middle of them.

    One runner serves one model, and no model here both generates and embeds, so the completion cannot stream: it
    must fail on its own with a Go-style error while every embedding still succeeds and equals its serial result,
    and /health stays fast. (A second runner with SmolLM2 streaming at the same time would only test two
    independent processes, which test_server.py already covers.)"""
    texts = [case["text"] for case in reference] + [LONG_TEXT, "one more sentence to embed"]
    assert len(texts) == 8
    with runner.client() as c:
        serial = [_http_embed(c, t) for t in texts]
        barrier = threading.Barrier(len(texts) + 1)

        def embed(t: str) -> Vector:
            barrier.wait()
            return _http_embed(c, t)

        def generate() -> Any:
            barrier.wait()
            return complete(c, p3_request("The capital of France is", num_predict=10))

        with HealthWatch(runner.url, runner.t_start, interval=0.0) as watch, \
                ThreadPoolExecutor(len(texts) + 1) as pool:
            gen = pool.submit(generate)
            vecs = list(pool.map(embed, texts))
            completion = gen.result()
    for t, v, s in zip(texts, vecs, serial):
        np.testing.assert_array_equal(v, s, err_msg=t[:40])
    assert completion.status == 500
    assert completion.body == b"Failed to create new sequence: this model does not support generation\n"
    assert completion.headers["content-type"].startswith("text/plain")
    assert len(watch.polls) >= 3
    assert all(p.body == {"status": 0, "progress": 1} for p in watch.polls), [p.body for p in watch.polls]
    worst = worst_latency(watch.polls)
    assert worst.runner_latency < HEALTH_DEADLINE_S, describe(worst)


def test_embed_command(ggufs: dict[str, Path], embedders: Callable[[str], Embedder]) -> None:
    texts = ["This is an example sentence", ""]
    out = subprocess.run([PYTHON, "-m", "runner.cli", "embed", "--model", str(ggufs["f16"]), "--threads", "1",
                          *texts], cwd=REPO, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    lines = out.stdout.decode().splitlines()
    assert len(lines) == len(texts)
    e = embedders("f16")
    for line, text in zip(lines, texts):
        values = json.loads(line)
        assert isinstance(values, list) and len(values) == 384
        np.testing.assert_array_equal(np.asarray(values, dtype=np.float32), e(text))
