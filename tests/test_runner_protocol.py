"""runner.protocol: decoding /completion and /embedding bodies per dialect (runner-protocol.md §2.2, §5.1, §6)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from runner.errors import RequestError
from runner.protocol import (DEFAULT_OPTIONS, CompletionRequest, Dialect, ImageData, decode_completion,
                             decode_embedding)
from runner.sampling import SamplerParams


def f32(x: float) -> float:
    """Options are Go float32 fields: the decoded value is the float32 nearest to the JSON number."""
    return float(np.float32(x))


PNG = "iVBORw0KGgo="  # base64 of the 8-byte PNG signature
PNG_BYTES = b"\x89PNG\r\n\x1a\n"

# §2.2: api.DefaultOptions() (as in the P1 wire example of §6)
DEFAULT_SAMPLING = SamplerParams(temperature=f32(0.8), top_k=40, top_p=f32(0.9), min_p=0.0, seed=-1,
                                 repeat_last_n=64, repeat_penalty=f32(1.1), presence_penalty=0.0,
                                 frequency_penalty=0.0)
# §5.1: an Options object decodes into a zero struct
ZERO_SAMPLING = SamplerParams(temperature=0.0, top_k=0, top_p=0.0, min_p=0.0, seed=0, repeat_last_n=0,
                              repeat_penalty=0.0, presence_penalty=0.0, frequency_penalty=0.0)


def req(prompt: str = "", *, sampling: SamplerParams = DEFAULT_SAMPLING, num_predict: int = -1, num_keep: int = 4,
        stop: tuple[str, ...] = (), images: tuple[ImageData, ...] = (), grammar: str = "",
        fmt: str | None = None, cache_prompt: bool = True) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, images=images, sampling=sampling, num_predict=num_predict,
                             num_keep=num_keep, stop=stop, grammar=grammar, format=fmt, cache_prompt=cache_prompt)


P3_WIRE_EXAMPLE = json.dumps({  # §6, P3 request (image data completed to a valid base64 string)
    "Prompt": "<start_of_turn>user\n[img-0]Describe<end_of_turn>\n<start_of_turn>model\n", "Format": None,
    "Images": [{"data": PNG, "id": 0, "aspect_ratio_id": 0}],
    "Options": {"num_ctx": 4096, "num_batch": 512, "num_gpu": -1, "num_keep": 4, "seed": -1, "num_predict": 81920,
                "top_k": 64, "top_p": 0.95, "typical_p": 1, "repeat_last_n": 64, "temperature": 1,
                "repeat_penalty": 1.1, "mirostat_tau": 5, "mirostat_eta": 0.1, "stop": ["<end_of_turn>"]},
    "Grammar": ""}).encode()

P1_WIRE_EXAMPLE = json.dumps({  # §6, P1 request
    "cache_prompt": True, "frequency_penalty": 0, "image_data": None, "main_gpu": 0, "min_p": 0, "mirostat": 0,
    "mirostat_eta": 0.1, "mirostat_tau": 5, "n_keep": 4, "n_predict": -1, "presence_penalty": 0,
    "prompt": "<|start_header_id|>user", "repeat_last_n": 64, "repeat_penalty": 1.1, "seed": -1,
    "stop": ["<|eot_id|>"], "stream": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "typical_p": 1}).encode()


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param(P3_WIRE_EXAMPLE, req(
        "<start_of_turn>user\n[img-0]Describe<end_of_turn>\n<start_of_turn>model\n",
        sampling=SamplerParams(temperature=1.0, top_k=64, top_p=f32(0.95), min_p=0.0, seed=-1, repeat_last_n=64,
                               repeat_penalty=f32(1.1), presence_penalty=0.0, frequency_penalty=0.0),
        num_predict=81920, num_keep=4, stop=("<end_of_turn>",), images=(ImageData(0, PNG_BYTES),)),
        id="wire-example-§6"),
    pytest.param(b'{"Prompt":"a"}', req("a"), id="options-absent-defaults-§5.1"),
    pytest.param(b'{"Prompt":"a","Options":null}', req("a"), id="options-null-defaults-§5.1"),
    pytest.param(b'{"Prompt":"a","Options":{}}', req("a", sampling=ZERO_SAMPLING, num_predict=0, num_keep=0),
                 id="options-empty-zero-§5.1"),
    pytest.param(b'{"prompt":"a","OPTIONS":{"TEMPERATURE":0.5,"Top_K":3}}',
                 req("a", sampling=SamplerParams(0.5, 3, 0.0, 0.0, 0, 0, 0.0, 0.0, 0.0), num_predict=0, num_keep=0),
                 id="keys-case-insensitive-§2"),
    pytest.param(b'{"Prompt":"a","Shift":true,"Options":{"foo":1,"num_predict":7}}',
                 req("a", sampling=ZERO_SAMPLING, num_predict=7, num_keep=0), id="unknown-keys-ignored"),
    pytest.param(b'{"Prompt":"a","prompt":"b"}', req("b"), id="duplicate-last-wins"),
    pytest.param(b'{"Options":{"top_k":5},"Options":{"seed":3}}',
                 req(sampling=SamplerParams(0.0, 5, 0.0, 0.0, 3, 0, 0.0, 0.0, 0.0), num_predict=0, num_keep=0),
                 id="repeated-options-merge-like-go"),
    pytest.param(b'{"Options":{"top_k":5},"Options":null}', req(), id="options-reset-by-null"),
    pytest.param(b'{"Options":{"temperature":null,"seed":-1}}',
                 req(sampling=SamplerParams(0.0, 0, 0.0, 0.0, -1, 0, 0.0, 0.0, 0.0), num_predict=0, num_keep=0),
                 id="null-field-keeps-zero"),
    pytest.param(b'{"Format":"json","Grammar":"root ::= \\"x\\""}', req(grammar='root ::= "x"', fmt='"json"'),
                 id="format-and-grammar-kept"),
    pytest.param(b'{"Format":{"type":"object"}}', req(fmt='{"type":"object"}'), id="format-schema"),
    pytest.param(b'{"Images":[{"data":"aGk=","id":3,"aspect_ratio_id":1},null,{"ID":2,"Data":"aG\\nk="}]}',
                 req(images=(ImageData(3, b"hi"), ImageData(0, b""), ImageData(2, b"hi"))), id="images"),
    pytest.param(b'{"Images":null}', req(), id="images-null"),
    pytest.param(b'{"Options":{"stop":["a",null,""]}}',
                 req(sampling=ZERO_SAMPLING, num_predict=0, num_keep=0, stop=("a",)), id="stop-empty-dropped"),
    pytest.param(b'null', req(), id="null-body"),
    pytest.param(b'{"Prompt":"x"} {"Prompt":"y"}', req("x"), id="trailing-value-ignored"),
])
def test_decode_p3(body: bytes, expected: CompletionRequest) -> None:
    assert decode_completion(body, Dialect.P3) == expected


def test_p2_decodes_like_p3() -> None:
    assert decode_completion(P3_WIRE_EXAMPLE, Dialect.P2) == decode_completion(P3_WIRE_EXAMPLE, Dialect.P3)


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param(P1_WIRE_EXAMPLE, req("<|start_header_id|>user", stop=("<|eot_id|>",)), id="wire-example-§6"),
    pytest.param(b"{}", req(), id="empty-defaults-§2.2"),
    pytest.param(b'{"prompt":"x","n_predict":10,"n_keep":-1,"temperature":0,"image_data":[{"data":"aGk=","id":1}],'
                 b'"cache_prompt":false,"grammar":"g"}',
                 req("x", sampling=SamplerParams(0.0, 40, f32(0.9), 0.0, -1, 64, f32(1.1), 0.0, 0.0),
                     num_predict=10, num_keep=-1, images=(ImageData(1, b"hi"),), cache_prompt=False, grammar="g"),
                 id="p1-fields"),
    pytest.param(b'{"num_predict":10,"num_keep":1,"temperature":null,"stop":null}', req(),
                 id="p2-names-unknown-in-p1-null-keeps-default"),
])
def test_decode_p1(body: bytes, expected: CompletionRequest) -> None:
    assert decode_completion(body, Dialect.P1) == expected


def test_default_options_table() -> None:
    # §6 P1 example: the server fills the map from api.DefaultOptions()
    assert DEFAULT_OPTIONS["num_keep"] == 4 and DEFAULT_OPTIONS["num_predict"] == -1
    assert DEFAULT_OPTIONS["seed"] == -1 and DEFAULT_OPTIONS["repeat_last_n"] == 64


@pytest.mark.parametrize(("dialect", "body", "match"), [
    pytest.param(Dialect.P3, b"", "empty", id="empty"),
    pytest.param(Dialect.P3, b"not json", "invalid JSON", id="not-json"),
    pytest.param(Dialect.P3, b"[1]", "array", id="array-body"),
    pytest.param(Dialect.P3, b'"x"', "string", id="string-body"),
    pytest.param(Dialect.P3, b'{"Options":"x"}', "string into .*Options of type api.Options", id="options-string"),
    pytest.param(Dialect.P3, b'{"Options":{"temperature":"hot"}}', "string into .*temperature of type float32",
                 id="temperature-string"),
    pytest.param(Dialect.P3, b'{"Options":{"top_k":1.5}}', "number 1.5 into .*top_k of type int", id="int-fraction"),
    pytest.param(Dialect.P3, b'{"Options":{"top_k":1e3}}', "top_k", id="int-exponent"),
    pytest.param(Dialect.P3, b'{"Options":{"seed":true}}', "bool into .*seed", id="int-bool"),
    pytest.param(Dialect.P3, b'{"Options":{"top_k":9223372036854775808}}', "top_k", id="int64-overflow"),
    pytest.param(Dialect.P3, b'{"Options":{"temperature":1e39}}', "temperature", id="float32-overflow"),
    pytest.param(Dialect.P3, b'{"Options":{"num_ctx":"x"}}', "num_ctx", id="ignored-field-still-typed"),
    pytest.param(Dialect.P3, b'{"Options":{"use_mmap":1}}', "use_mmap", id="bool-number"),
    pytest.param(Dialect.P3, b'{"Options":{"stop":"x"}}', "stop", id="stop-string"),
    pytest.param(Dialect.P3, b'{"Options":{"stop":[1]}}', r"stop\[0\]", id="stop-number"),
    pytest.param(Dialect.P3, b'{"Prompt":5}', "Prompt", id="prompt-number"),
    pytest.param(Dialect.P3, b'{"Images":{}}', "Images", id="images-object"),
    pytest.param(Dialect.P3, b'{"Images":[5]}', "Images", id="image-number"),
    pytest.param(Dialect.P3, b'{"Images":[{"data":"!!!!"}]}', "base64", id="bad-base64"),
    pytest.param(Dialect.P3, b'{"Images":[{"data":"aGk"}]}', "base64", id="unpadded-base64"),
    pytest.param(Dialect.P3, b'{"Images":[{"data":1}]}', "data", id="data-number"),
    pytest.param(Dialect.P1, b'{"temperature":"hot"}', "temperature", id="p1-temperature"),
    pytest.param(Dialect.P1, b'{"n_predict":"5"}', "n_predict", id="p1-n-predict"),
    pytest.param(Dialect.P1, b'{"cache_prompt":1}', "cache_prompt", id="p1-cache-prompt"),
])
def test_decode_errors(dialect: Dialect, body: bytes, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        decode_completion(body, dialect)


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"content":"x"}', "x"), (b'{"Content":"y","other":1}', "y"), (b"{}", ""), (b"null", ""),
    (b'{"content":"a"} junk', "a"),
])
def test_decode_embedding(body: bytes, expected: str) -> None:
    assert decode_embedding(body).content == expected


@pytest.mark.parametrize("body", [b'{"content":1}', b"", b"[]", b'{"content":'])
def test_decode_embedding_errors(body: bytes) -> None:
    with pytest.raises(RequestError):
        decode_embedding(body)


@pytest.mark.parametrize(("text", "expected"), [("p1", Dialect.P1), (" P3 ", Dialect.P3), ("p2", Dialect.P2)])
def test_dialect_parse(text: str, expected: Dialect) -> None:
    assert Dialect.parse(text) is expected


def test_dialect_parse_error() -> None:
    with pytest.raises(ValueError, match="unknown dialect"):
        Dialect.parse("p4")
