"""mllama over HTTP: a real runner subprocess with the tiny random-weight mllama GGUF, started with --parallel 2
(capped to 1, said in its log), driven with P3 /completion bodies carrying a real PNG with and without
`aspect_ratio_id` (sent by servers before v0.7.0, ignored by the new engine). The streamed text equals the
in-process engine's; the image changes it."""
from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mllama_tiny import write_mllama
from runner.cli import Loaded
from runner.engine import Engine
from runner.protocol import CompletionRequest, ImageData
from runner.sampling import SamplerParams
from test_engine_survives import run_all
from test_server_support import RunnerProcess, Stream, complete, p3_request
from test_vision_engine import png

SAMPLING: dict[str, Any] = {"temperature": 1.0, "seed": 11, "top_k": 0, "top_p": 1.0}
PROMPT = "the a [img-0]<|image|> the a"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mllama-server") / "mllama.gguf"
    write_mllama(path)
    return path


@pytest.fixture(scope="module")
def runner(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    yield from RunnerProcess.serving(model_path, ["--threads", "1", "--parallel", "2", "--ctx-size", "256"],
                                     tmp_path_factory.mktemp("mllama-logs"), name="mllama")


def body(prompt: str, data: bytes | None, aspect_ratio_id: int | None = None, n: int = 12) -> dict[str, Any]:
    b = p3_request(prompt, num_predict=n, **SAMPLING)
    if data is not None:
        image: dict[str, Any] = {"id": 0, "data": base64.b64encode(data).decode()}
        if aspect_ratio_id is not None:
            image["aspect_ratio_id"] = aspect_ratio_id
        b["Images"] = [image]
    return b


def in_process(model_path: Path, prompt: str, data: bytes | None, n: int = 12) -> str:
    m = Loaded(str(model_path), 1)
    try:
        e = Engine(m.backend, m.model, m.tokenizer, n_ctx=256, n_batch=512, parallel=1)
        e.start()
        try:
            req = CompletionRequest(prompt=prompt, images=(ImageData(0, data),) if data is not None else (),
                                    sampling=SamplerParams(**SAMPLING), num_predict=n, num_keep=0, stop=())
            (c,) = run_all(e, [req])
        finally:
            e.close()
        assert c.final is not None and c.final.error is None
        return c.text
    finally:
        m.backend.close()


def _ok(s: Stream) -> Stream:
    assert s.status == 200, (s.status, s.body)
    return s


def test_png_with_and_without_aspect_ratio_id(runner: RunnerProcess, model_path: Path) -> None:
    image = png(8, 30)  # 30 x 30 on 8-pixel tiles: 2x2 (the tiny model's tiles)
    with runner.client() as c:
        new = _ok(complete(c, body(PROMPT, image)))
        old = _ok(complete(c, body(PROMPT, image, aspect_ratio_id=3)))  # a pre-v0.7.0 server's body
        plain = _ok(complete(c, body("the a the a", None)))
    assert new.final["done"] and new.text
    assert old.text == new.text  # the id on the wire is ignored: the runner tiles the image itself
    assert new.text == in_process(model_path, PROMPT, image)
    assert new.text != plain.text
    assert "--parallel 2 reduced to 1" in runner.stderr()
