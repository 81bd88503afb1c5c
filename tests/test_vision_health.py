"""Encoding an image does not stall the runner: a runner subprocess (llama.cpp's split layout, `--mmproj`) with a
SigLIP-shaped tower big enough that one image takes about a second to encode answers /health within 200 ms
throughout, while the image's request is being encoded and evaluated (the encoder runs on the engine thread; ggml
computes without the GIL, and the HTTP thread keeps serving)."""
from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import httpx
import pytest

from test_server_support import (HEALTH_DEADLINE_S, HealthWatch, RunnerProcess, complete, describe, p3_request,
                                 worst_latency)
from test_vision_engine import png
from tiny_gguf import VisionSpec, gemma3_spec, make_vision_weights, write_gguf, write_projector_gguf

# 1024 patches of width 768, 6 blocks: ~110 GFLOP per image, about a second on one thread.
TOWER = VisionSpec(n_embd=768, n_head=12, n_layer=6, n_ff=3072, image_size=448, patch_size=14, tokens_per_image=64)
TEXT = gemma3_spec(image_tokens=True)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    d = tmp_path_factory.mktemp("vision-health")
    write_gguf(d / "text.gguf", TEXT)
    write_projector_gguf(d / "mmproj.gguf", TOWER, make_vision_weights(TOWER, TEXT.n_embd), TEXT.n_embd, f16=True)
    yield from RunnerProcess.serving(d / "text.gguf", ["--threads", "1", "--ctx-size", "512", "--mmproj",
                                                       str(d / "mmproj.gguf")], d, name="vision-health")


def test_health_answers_while_an_image_is_encoded(runner: RunnerProcess) -> None:

    def check(r: httpx.Response) -> None:
        assert r.status_code == 200

    body = p3_request("the [img-0] a", num_predict=2, temperature=0.0)
    body["Images"] = [{"id": 0, "data": base64.b64encode(png(1, 600)).decode()}]
    with HealthWatch(runner.url, runner.t_start, check=check) as watch, runner.client() as c:
        t0 = time.monotonic()
        out = complete(c, body)
        elapsed = time.monotonic() - t0
    assert out.status == 200 and out.final["done"], out.body[-500:]
    # the image really is in the prompt, and encoding it took long enough for the polls to mean something
    assert out.final["prompt_eval_count"] > TOWER.tokens_per_image and elapsed > 0.3, elapsed
    during = watch.between(t0, t0 + elapsed)
    assert len(during) >= 10, (len(during), elapsed)
    worst = worst_latency(during)
    print(f"\n/health while an image is encoded: {len(during)} polls in {elapsed:.2f} s, worst {describe(worst)}")
    assert worst.runner_latency < HEALTH_DEADLINE_S, describe(worst)
