"""Images through the llama-server mode: a real `llama-server` subprocess on the tiny random-weight Gemma 3 vision
GGUF the vision tests build, driven with llama-server's `multimodal_data` (native /completion) and OpenAI
`image_url` data URIs (the `openai` client on /v1/chat/completions). The texts equal the in-process engine's for
the same prompt with `[img-N]` markers and images (test_vision_server ties that to the P3 front end), so both front
ends reach one engine path. Bad images are clear 400s and leave the server serving; a model without vision
answers llama-server's own refusal."""
from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from test_llamaserver import Server, _events, _start
from test_vision_engine import png
from test_vision_server import SAMPLING, in_process, solid
from tiny_gguf import gemma3_spec, write_gguf

import test_vision_gemma3 as tv
from runner.llamaserver.media import NO_VISION
from runner.sampling import SamplerParams

FLAGS = ["-t", "1", "-np", "2", "-c", "512"]
# The engine's sampler settings of test_vision_server's in-process run, spelled as llama-server request fields
# (whose own defaults differ: min_p 0.05, top_k 40, ...).
PARAMS: dict[str, Any] = {**dataclasses.asdict(SamplerParams(**SAMPLING)), "n_predict": 12}
PROMPT = "the a [img-0] the [img-1] a"
MEDIA_PROMPT = "the a <__media__> the <__media__> a"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve-vision") / "gemma3-vision.gguf"
    tv.write_vision_gguf(path, text=gemma3_spec(image_tokens=True))
    return path


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _start(model_path, tmp_path_factory.mktemp("serve-vision-run"), FLAGS)


@pytest.fixture(scope="module")
def text_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-text-gemma3")
    write_gguf(tmp / "text.gguf", gemma3_spec(image_tokens=True))
    yield from _start(tmp / "text.gguf", tmp, FLAGS)


def _completion(c: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post("/completion", json={**PARAMS, **body})
    assert r.status_code == 200, r.content
    out: dict[str, Any] = r.json()
    return out


def test_multimodal_data_equals_the_engine(server: Server, model_path: Path) -> None:
    imgs = {0: png(1), 1: png(2)}
    want = in_process(model_path, PROMPT, imgs)
    media = [b64(imgs[0]), b64(imgs[1])]
    with server.client() as c:
        inside = _completion(c, {"prompt": {"prompt_string": MEDIA_PROMPT, "multimodal_data": media}})
        beside = _completion(c, {"prompt": MEDIA_PROMPT, "multimodal_data": media})
        other = _completion(c, {"prompt": {"prompt_string": MEDIA_PROMPT,
                                           "multimodal_data": [b64(solid(0)), b64(solid(255))]}})
        plain = _completion(c, {"prompt": "the a  the  a"})
        with c.stream("POST", "/completion", json={**PARAMS, "stream": True, "prompt": {
                "prompt_string": MEDIA_PROMPT, "multimodal_data": media}}) as r:
            raw = r.read()
    assert inside["content"] == want and beside["content"] == want
    assert other["content"] != want
    events = [json.loads(e) for e in _events(raw)]
    assert "".join(e["content"] for e in events) == want and events[-1]["stop"] is True
    # the images' soft tokens count as prompt tokens (4 per image here, plus their start/end wrappers)
    assert inside["timings"]["prompt_n"] >= plain["timings"]["prompt_n"] + 2 * tv.VS.tokens_per_image
    assert events[-1]["timings"]["prompt_n"] == inside["timings"]["prompt_n"]


def test_image_url_through_the_openai_client(server: Server, model_path: Path) -> None:
    messages: list[Any] = [{"role": "user", "content": [
        {"type": "text", "text": "the a"}, {"type": "image_url", "image_url": {"url": data_uri(png(3))}},
        {"type": "text", "text": "a"}]}]
    with server.client() as c:  # the tiny file has no template: ChatML, the marker in place of the image
        r = c.post("/apply-template", json={"messages": messages})
        assert r.status_code == 200, r.content
        rendered = r.json()["prompt"]
    assert rendered == "<|im_start|>user\nthe a\n<__media__>\na<|im_end|>\n<|im_start|>assistant\n"
    want = in_process(model_path, rendered.replace("<__media__>", "[img-0]"), {0: png(3)})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    extra = {k: v for k, v in PARAMS.items() if k not in ("temperature", "top_p", "seed", "presence_penalty",
                                                             "frequency_penalty", "n_predict")}
    out = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=PARAMS["temperature"],
                                         top_p=PARAMS["top_p"], seed=PARAMS["seed"], extra_body=extra)
    assert out.choices[0].message.content == want
    pieces = client.chat.completions.create(model="m", messages=messages, max_tokens=12, stream=True,
                                            temperature=PARAMS["temperature"], top_p=PARAMS["top_p"],
                                            seed=PARAMS["seed"], extra_body=extra)
    assert "".join(ch.choices[0].delta.content or "" for ch in pieces if ch.choices) == want
    # the plain-string form of image_url that some clients send
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={**PARAMS, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "the a"}, {"type": "image_url", "image_url": data_uri(png(3))},
            {"type": "text", "text": "a"}]}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want


def test_image_tokens_count_against_the_slot(server: Server) -> None:
    """Without --context-shift a prompt that fills its slot (256 here) is a 400 before it queues: the image's soft
    tokens count, so a text that fits alone does not fit with an image after it."""
    with server.client() as c:
        k, n = 1, 0
        while n < 250:  # the longest run of words whose prompt (with BOS) fits with a few tokens to spare
            k += 1
            n = len(c.post("/tokenize", json={"content": "the " * k, "add_special": True}).json()["tokens"])
        text = "the " * (k - 1)
        assert _completion(c, {"prompt": text, "n_predict": 1})["timings"]["prompt_n"] < 256 - tv.VS.tokens_per_image
        r = c.post("/completion", json={**PARAMS, "prompt": {"prompt_string": text + "<__media__>",
                                                             "multimodal_data": [b64(png(1))]}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "exceed_context_size_error", r.content


@pytest.mark.parametrize("path,body,message", [
    ("/completion", {"prompt": {"prompt_string": "<__media__> a", "multimodal_data": ["not base64!"]}},
     "multimodal_data[0] is not valid base64"),
    ("/completion", {"prompt": {"prompt_string": "<__media__> a", "multimodal_data": [b64(b"GIF89a broken")]}},
     "failed to process inputs: failed to decode image"),
    ("/completion", {"prompt": {"prompt_string": "a <__media__>", "multimodal_data": [b64(png(1))] * 2}},
     "the prompt has 1 <__media__> marker(s) for 2 image(s)"),
    ("/completion", {"prompt": [1, 2, 3], "multimodal_data": [b64(png(1))]},
     "images need a text prompt with one media marker each"),
    ("/completion", {"prompt": {"prompt_string": "[img-0] <__media__>", "multimodal_data": [b64(png(1))]}},
     "may not contain the text [img-<number>]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "image URLs are not fetched by this server"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}]},
     "the data URI is not an image (text/plain;base64)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}]}]},
     "the image data URI must be base64 encoded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
     "messages[0].content[0]: the image data is not valid base64"),
])
def test_bad_images_are_400s(server: Server, path: str, body: dict[str, Any], message: str) -> None:
    with server.client() as c:
        r = c.post(path, json={**PARAMS, **body})
        assert r.status_code == 400, r.content
        err = r.json()["error"]
        assert message in err["message"] and err["type"] == "invalid_request_error", err
        assert _completion(c, {"prompt": "the a"})["content"]  # still serving


def test_a_model_without_vision_refuses_images(text_server: Server, server: Server) -> None:
    with text_server.client() as c:
        for path, body in [("/completion", {"prompt": {"prompt_string": "<__media__>",
                                                        "multimodal_data": [b64(png(1))]}}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                               {"type": "image_url", "image_url": {"url": data_uri(png(1))}}]}]})]:
            r = c.post(path, json={**PARAMS, **body})
            assert r.status_code == 400 and r.json()["error"]["message"] == NO_VISION, r.content
        assert c.get("/props").json()["modalities"] == {"vision": False, "audio": False}
        assert _completion(c, {"prompt": "the a"})["content"]
    with server.client() as c:
        assert c.get("/props").json()["modalities"] == {"vision": True, "audio": False}
