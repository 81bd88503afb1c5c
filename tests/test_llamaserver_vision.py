"""Images in the llama-server mode: `serve --mmproj` with the tiny Gemma 3 split into a text GGUF and a projector.
`/completion`'s {"prompt_string", "multimodal_data"} prompt (one `<__media__>` marker per image) and OpenAI chat
`image_url` parts (data: URLs) reach the engine as the `[img-N]` prompt the Ollama runner takes: the sampled text
equals the in-process engine's for that request; bad images and marker counts are 400s or the request's own
error; a server without a projector refuses images."""
from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.cli import Loaded
from runner.errors import RequestError
from runner.llamaserver.decode import decode_completion
from runner.llamaserver.media import MEDIA_MARKER, media_bytes, split_multimodal_prompt, with_markers
from runner.llamaserver.template import CHATML_TEMPLATE, ChatTemplate, normalize_messages
from runner.protocol import ImageData
from test_engine_survives import run_all
from test_llamaserver import Server, _start
from test_vision_engine import png
from test_vision_mmproj import write_split
from runner.engine import Engine

SAMPLING: dict[str, Any] = {"temperature": 1.0, "seed": 7, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "n_predict": 10}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- units ----------------------------------------------------------------------------------------------------

def test_media_bytes() -> None:
    data = png(1)
    assert media_bytes(b64(data), "x") == data
    assert media_bytes("data:image/png;base64," + b64(data), "x") == data
    for bad, message in [(3, "must be a base64 string"), ("data:image/png," + b64(data), "only base64 data"),
                         ("https://example.com/a.png", "not fetched from a URL"), ("@@@", "not valid base64"),
                         ("", "is empty")]:
        with pytest.raises(RequestError, match=message):
            media_bytes(bad, "x")


def test_markers() -> None:
    assert with_markers(f"a {MEDIA_MARKER} b {MEDIA_MARKER}", 2) == "a [img-0] b [img-1]"
    assert with_markers("plain", 0) == "plain"
    for text, n in [(f"a {MEDIA_MARKER}", 2), ("a", 1), (f"{MEDIA_MARKER}{MEDIA_MARKER}", 1)]:
        with pytest.raises(RequestError, match="markers for"):
            with_markers(text, n)
    assert split_multimodal_prompt("text") is None and split_multimodal_prompt({"prompt_string": "x"}) is None
    assert split_multimodal_prompt({"prompt_string": f"{MEDIA_MARKER}!", "multimodal_data": [b64(b"ab")]}) == (
        "[img-0]!", (ImageData(0, b"ab"),))
    for bad in [{"prompt_string": "x", "multimodal_data": "AA=="}, {"multimodal_data": ["AA=="]},
                {"prompt_string": MEDIA_MARKER, "multimodal_data": [1]}]:
        with pytest.raises(RequestError):
            split_multimodal_prompt(bad)


def test_chat_image_parts() -> None:
    media: list[bytes] = []
    msgs = normalize_messages([{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                              + b64(b"one")}},
        {"type": "image_url", "image_url": {"url": b64(b"two")}}]}], media)
    assert msgs[0]["content"] == f"look\n{MEDIA_MARKER}\n{MEDIA_MARKER}" and media == [b"one", b"two"]
    with pytest.raises(ValueError):  # without a list to take them, image parts are refused
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": b64(b"x")}}]}])


# ---- end to end -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_split(tmp_path_factory.mktemp("serve-vision"))


@pytest.fixture(scope="module")
def server(split: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    text, proj = split
    yield from _start(text, tmp_path_factory.mktemp("serve-vision-run"),
                      ["--mmproj", str(proj), "-c", "512", "-np", "2", "-t", "1"])


@pytest.fixture(scope="module")
def loaded(split: tuple[Path, Path]) -> Iterator[Loaded]:
    m = Loaded(str(split[0]), 1, mmproj=str(split[1]))
    yield m
    m.backend.close()


def in_process(m: Loaded, body: dict[str, Any], prompt: str, imgs: tuple[ImageData, ...]) -> str:
    """The engine's text for what the server decodes from `body` (same settings, same `[img-N]` prompt)."""
    req = decode_completion(body, prompt, None, images=imgs).request
    e = Engine(m.backend, m.model, m.tokenizer, n_ctx=256, n_batch=512, parallel=1)
    e.start()
    try:
        out = run_all(e, [req])[0]
    finally:
        e.close()
    assert out.final is not None and out.final.error is None, out.final
    return out.text


def test_completion_with_multimodal_data(server: Server, loaded: Loaded) -> None:
    texts = []
    for image in (png(1), png(3)):
        body = {"prompt": {"prompt_string": f"the {MEDIA_MARKER} a", "multimodal_data": [b64(image)]}, **SAMPLING}
        with server.client() as c:
            r = c.post("/completion", json=body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["content"] == in_process(loaded, body, "the [img-0] a", (ImageData(0, image),))
        assert got["timings"]["prompt_n"] > 4  # the image's soft tokens are counted
        texts.append(got["content"])
    assert texts[0] != texts[1]
    with server.client() as c:
        assert c.get("/props").json()["modalities"]["vision"] is True


def test_chat_with_image_url(server: Server, loaded: Loaded) -> None:
    image = png(2)
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "the a"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                + b64(image)}}]}], **SAMPLING}
    with server.client() as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    prompt = ChatTemplate(CHATML_TEMPLATE).render([{"role": "user", "content": "the a\n[img-0]"}])
    assert r.json()["choices"][0]["message"]["content"] == in_process(loaded, body, prompt, (ImageData(0, image),))


@pytest.mark.parametrize("prompt,status,message", [
    ({"prompt_string": f"{MEDIA_MARKER} {MEDIA_MARKER}", "multimodal_data": [b64(png(1))]}, 400, "2 <__media__>"),
    ({"prompt_string": MEDIA_MARKER, "multimodal_data": ["not base64!"]}, 400, "not valid base64"),
    ({"prompt_string": MEDIA_MARKER, "multimodal_data": [b64(b"not an image")]}, 500, "failed to decode image"),
])
def test_bad_images(server: Server, prompt: dict[str, Any], status: int, message: str) -> None:
    with server.client() as c:
        r = c.post("/completion", json={"prompt": prompt, "n_predict": 2})
        assert r.status_code == status and message in r.text, r.text
        assert c.post("/completion", json={"prompt": "the a", "n_predict": 2}).status_code == 200


def test_a_server_without_projector_refuses_images(split: tuple[Path, Path],
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    for s in _start(split[0], tmp_path_factory.mktemp("serve-text"), ["-c", "256", "-t", "1"]):
        body = {"prompt": {"prompt_string": MEDIA_MARKER, "multimodal_data": [b64(png(1))]}, "n_predict": 2}
        with s.client() as c:
            r = c.post("/completion", json=body)
            assert r.status_code == 400 and "start the server with --mmproj" in r.text, r.text
            assert c.get("/props").json()["modalities"]["vision"] is False
