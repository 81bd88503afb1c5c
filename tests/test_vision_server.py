"""Images over HTTP: a real runner subprocess with a tiny random-weight Gemma 3 vision GGUF, driven with P3
/completion bodies carrying `Images` (base64 file bytes) and `[img-N]` markers. The streamed text equals the
in-process engine's for the same request; images change it; a bad image is a 500 for that request only while a
concurrent text request completes."""
from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import test_vision_gemma3 as tv
from runner.cli import Loaded
from runner.protocol import CompletionRequest, ImageData
from runner.sampling import SamplerParams
from test_server_support import REPO, RunnerProcess, Stream, complete, p3_request
from test_vision_engine import png, run
from tiny_gguf import gemma3_spec

SAMPLING: dict[str, Any] = {"temperature": 1.0, "seed": 7, "top_k": 0, "top_p": 1.0}
PROMPT = "the a [img-0] the [img-1] a"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vision-server") / "gemma3-vision.gguf"
    tv.write_vision_gguf(path, text=gemma3_spec(image_tokens=True))
    return path


@pytest.fixture(scope="module")
def runner(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    yield from RunnerProcess.serving(model_path, ["--threads", "1", "--parallel", "2", "--ctx-size", "256"],
                                     tmp_path_factory.mktemp("vision-logs"), name="vision")


def solid(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (value, value, value)).save(buf, "PNG")
    return buf.getvalue()


def body(prompt: str, imgs: dict[int, bytes], n: int = 12) -> dict[str, Any]:
    b = p3_request(prompt, num_predict=n, **SAMPLING)
    b["Images"] = [{"id": k, "data": base64.b64encode(v).decode()} for k, v in imgs.items()] or None
    return b


def in_process(model_path: Path, prompt: str, imgs: dict[int, bytes], n: int = 12) -> str:
    m = Loaded(str(model_path), 1)
    try:
        req = CompletionRequest(prompt=prompt, images=tuple(ImageData(k, v) for k, v in imgs.items()),
                                sampling=SamplerParams(**SAMPLING), num_predict=n, num_keep=0, stop=())
        (c,) = run(m, [req], parallel=2)
        assert c.final is not None and c.final.error is None
        return c.text
    finally:
        m.backend.close()


def _ok(s: Stream) -> Stream:
    assert s.status == 200, (s.status, s.body)
    return s


def test_two_images_stream_and_equal_the_engine(runner: RunnerProcess, model_path: Path) -> None:
    imgs = {0: png(1), 1: png(2)}
    with runner.client() as c:
        s = _ok(complete(c, body(PROMPT, imgs)))
        other = _ok(complete(c, body(PROMPT, {0: solid(0), 1: solid(255)})))
        plain = _ok(complete(c, body("the a the a", {})))
    assert s.final["done"] and s.text
    # BOS, 4 text tokens, and per image "\n\n<start_of_image>", 4 soft tokens, "<end_of_image>\n\n"
    assert s.final["prompt_eval_count"] > plain.final["prompt_eval_count"] + 2 * tv.VS.tokens_per_image
    assert s.text == in_process(model_path, PROMPT, imgs)
    assert s.text != other.text and s.text != plain.text


@pytest.mark.parametrize("imgs,prompt,message", [
    ({0: b"GIF89a broken"}, "[img-0] the", b"Failed to create new sequence: failed to process inputs: failed to "
                                          b"decode image"),
    ({0: png(1)}, "[img-0] [img-3]", b"Failed to create new sequence: failed to process inputs: invalid image "
                                     b"index: 3"),
])
def test_bad_image_is_a_500_for_that_request_only(runner: RunnerProcess, imgs: dict[int, bytes], prompt: str,
                                                  message: bytes) -> None:
    with runner.client() as c, ThreadPoolExecutor(2) as pool:
        good = pool.submit(complete, c, body("the a the", {}, n=24))
        bad = pool.submit(complete, c, body(prompt, imgs))
        b, g = bad.result(), good.result()
    assert b.status == 500 and b.body.startswith(message), (b.status, b.body)
    assert _ok(g).final["done"] and g.final["eval_count"] == 24


def test_generate_takes_images(model_path: Path, tmp_path: Path) -> None:
    """`generate --image` (repeatable): images the prompt does not mention go in front of it as [img-i] markers,
    as Ollama's server puts them; the text equals the engine's for that prompt, and other images change it."""
    files = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    for f, data in zip(files, (png(1), png(2), solid(0))):
        f.write_bytes(data)

    def generate(*images: Path) -> subprocess.CompletedProcess[str]:
        flags = [arg for f in images for arg in ("--image", str(f))]
        return subprocess.run([sys.executable, "-m", "runner.cli", "generate", "--model", str(model_path),
                               "--prompt", "the [img-1] a", "-n", "12", "--temperature", "1.0", "--seed", "7",
                               "--threads", "1", *flags], capture_output=True, text=True, timeout=120, cwd=REPO)

    out = generate(files[0], files[1])
    assert out.returncode == 0 and out.stdout.endswith("\n"), out.stderr[-2000:]
    assert out.stdout[:-1] == in_process(model_path, "[img-0] the [img-1] a", {0: png(1), 1: png(2)})
    other = generate(files[2], files[1])
    assert other.returncode == 0 and other.stdout != out.stdout
    missing = generate(files[0])  # the prompt names [img-1], which was not given
    assert missing.returncode == 1 and "invalid image index: 1" in missing.stderr
