"""The llama-server mode's pure parts, without a model run: flags, request decoding, the JSON shapes and SSE
framing (against llama.cpp's tools/server/server-task.cpp field order), chat templates (SmolLM2's own template
against hand-written ChatML), and the HTTP layer's status codes (503 while loading, 413, 400) in-process."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from starlette.testclient import TestClient
from test_tokenizer_gguf import read_metadata
from test_tokenizer_vocab import load_tokenizer

from runner.errors import RequestError
from runner.llamaserver import shapes
from runner.llamaserver.app import ServeState, build_app
from runner.llamaserver.decode import decode_completion, decode_prompt, parse_body
from runner.llamaserver.flags import parse_serve_args, wants_help
from runner.llamaserver.main import invoked_as_llama_server, run_serve
from runner.llamaserver.media import engine_prompt, image_url_bytes, multimodal_data
from runner.llamaserver.template import ChatTemplate, TemplateError, chat_prompt, normalize_messages
from runner.protocol import ImageData
from runner.responses import DoneReason, Metrics
from runner.sampling import TokenProbs

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
# two conversations rendered by hand from the ChatML convention SmolLM2's template implements
CONVERSATIONS: list[tuple[list[dict[str, str]], str]] = [
    ([{"role": "user", "content": "Hi"}],
     SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
     "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"),
]


# ---- flags ----------------------------------------------------------------------------------------------------

def test_flags_as_ollama_passes_them() -> None:
    argv = ["--model", "/m.gguf", "--port", "41235", "--host", "127.0.0.1", "--no-webui", "--offline", "-c", "8192",
            "-np", "2", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--flash-attn", "on", "-ngl", "0",
            "-t", "4", "--mmproj", "/p.gguf", "--jinja", "--context-shift", "--keep", "4",
            "--model-draft", "/d.gguf", "--draft-max", "16", "--some-new-flag", "7", "--other-bool"]
    cfg, unknown = parse_serve_args(argv)
    assert (cfg.model, cfg.port, cfg.host, cfg.ctx_size, cfg.parallel) == ("/m.gguf", 41235, "127.0.0.1", 8192, 2)
    assert (cfg.cache_type_k, cfg.cache_type_v, cfg.flash_attn, cfg.n_gpu_layers, cfg.threads) == (
        "q8_0", "q8_0", "on", 0, 4)
    assert (cfg.mmproj, cfg.jinja, cfg.context_shift, cfg.keep) == ("/p.gguf", True, True, 4)
    assert cfg.ignored == ("--model-draft /d.gguf", "--draft-max 16")
    assert unknown == ("--some-new-flag", "7", "--other-bool")


def test_flag_forms() -> None:
    cfg, unknown = parse_serve_args(["serve", "-m=/m.gguf", "--port=9", "-fa", "--ctx-size", "512", "--x", "-1"],
                                    cpu_count=3)
    assert (cfg.model, cfg.port, cfg.flash_attn, cfg.ctx_size, cfg.threads) == ("/m.gguf", 9, "on", 512, 3)
    assert unknown == ("--x", "-1")  # a negative number is the unknown flag's value
    cfg, _ = parse_serve_args(["-m", "a", "--flash-attn", "off", "-t", "-1", "--host", "0.0.0.0"], cpu_count=5)
    assert (cfg.flash_attn, cfg.threads, cfg.host, cfg.port, cfg.ctx_size) == ("off", 5, "0.0.0.0", 8080, 0)
    assert parse_serve_args(["-m", "a"])[0].host == "127.0.0.1"  # loopback unless --host says otherwise
    assert parse_serve_args(["-m", "a", "--chat-template", "chatml"])[0].chat_template_name == "chatml"
    inline = parse_serve_args(["-m", "a", "--chat-template", "{{ messages[0].content }}"])[0]
    assert inline.chat_template == "{{ messages[0].content }}" and not inline.chat_template_name


def test_flags_beyond_ollamas() -> None:
    cfg, unknown = parse_serve_args(["-m", "a", "--api-key", "k", "-n", "64", "--chat-template-kwargs",
                                     '{"enable_thinking": false}', "-ub", "512", "--no-cont-batching"])
    assert (cfg.api_key, cfg.n_predict, cfg.chat_template_kwargs) == ("k", 64, '{"enable_thinking": false}')
    assert unknown == ("-ub", "512")  # --no-cont-batching is known (always on here)
    with pytest.raises(ValueError, match="--chat-template-kwargs"):
        parse_serve_args(["-m", "a", "--chat-template-kwargs", "[1]"])


def test_flag_errors(tmp_path: Path) -> None:
    for argv, message in [([], "--model is required"), (["-m", "a", "-c", "x"], "invalid value 'x' for -c"),
                          (["-m", "a", "--port"], "flag needs an argument: --port"),
                          (["-m", "a", "--flash-attn=maybe"], "--flash-attn"), (["-m", "a", "-np", "0"], "-np")]:
        with pytest.raises(ValueError, match=message):
            parse_serve_args(argv)
    f = tmp_path / "t.jinja"
    f.write_text("{{ 'x' }}")
    assert parse_serve_args(["-m", "a", "--chat-template-file", str(f)])[0].chat_template == "{{ 'x' }}"


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert wants_help(["--help"]) and wants_help(["serve", "-h"]) and wants_help(["-m", "x", "-h"])
    assert not wants_help(["--alias", "--help", "-m", "x"])  # the alias' value, not a request for help
    assert run_serve(["--help"]) == 0  # no --model needed, nothing started
    out = capsys.readouterr().out
    assert out.startswith("usage: llama-server --model FILE")
    for flag in ("-m, --model VALUE", "-c, --ctx-size VALUE", "-fa, --flash-attn [on|off|auto]", "--no-webui"):
        assert f"\n  {flag}\n" in out


def test_argv0_detection() -> None:
    assert invoked_as_llama_server("/usr/lib/ollama/llama-server")
    assert invoked_as_llama_server("llama-server")
    assert not invoked_as_llama_server("/usr/bin/ollama-pyrunner")


# ---- templates -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_template(smollm2_path: Path) -> ChatTemplate:
    source = read_metadata(smollm2_path)["tokenizer.chat_template"]
    assert isinstance(source, str)
    return ChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>")


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_smollm2_template(smol_template: ChatTemplate, case: int) -> None:
    messages, expected = CONVERSATIONS[case]
    assert smol_template.render(normalize_messages(messages)) == expected
    # without the generation prompt the assistant header is not added
    assert smol_template.render(messages, add_generation_prompt=False) == expected.removesuffix(
        "<|im_start|>assistant\n")


def test_template_globals_and_errors() -> None:
    t = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
                     "{% if tools %}T{% endif %}{{ strftime_now('%Y')[:2] }}", bos_token="<s>")
    assert t.render([{"role": "user", "content": "é\""}], tools=[{"type": "function"}]) == '<s>"é\\""T20'
    with pytest.raises(TemplateError, match="only user"):
        ChatTemplate("{{ raise_exception('only user') }}").render([])
    with pytest.raises(TemplateError):  # the sandbox refuses Python internals
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    assert normalize_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]}])[0]["content"] == "a\nb"
    for bad in [[], "x", [{"content": "no role"}], [{"role": "user", "content": 3}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}]]:
        with pytest.raises(ValueError):
            normalize_messages(bad)


def test_template_bos_is_not_doubled(gemma3_path: Path, smollm2_path: Path, smol_template: ChatTemplate) -> None:
    tok = load_tokenizer(gemma3_path)  # adds <bos> (id 2) when tokenizing with add_special
    t = ChatTemplate("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                     "<end_of_turn>\n{% endfor %}<start_of_turn>model\n", bos_token="<bos>", eos_token="<eos>")
    text = t.render([{"role": "user", "content": "Hi"}])
    prompt, ids = chat_prompt(text, t, tok)
    assert prompt == "" and ids is not None and ids[0] == 2 and ids.count(2) == 1
    assert list(ids) == tok.encode(text, add_special=False)
    # with images the text goes to the engine, which adds the BOS itself while laying the images out
    media_prompt, none = chat_prompt(text, t, tok, with_media=True)
    assert none is None and media_prompt == text.removeprefix("<bos>")
    assert tok.encode(media_prompt, add_special=True) == list(ids)
    # SmolLM2's BOS is <|im_start|>, which its prompts start with, but it adds no BOS: the text goes as it is
    smol = CONVERSATIONS[0][1]
    assert chat_prompt(smol, smol_template, load_tokenizer(smollm2_path)) == (smol, None)


# ---- request decoding ----------------------------------------------------------------------------------------

class _Tok:
    n_vocab = 100
    add_bos = True

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return ([1] if add_special else []) + [10 + len(w) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)

    def token_bytes(self, i: int) -> bytes:
        return b"\xe4" if i == 3 else str(i).encode()


def test_prompt_shapes() -> None:
    tok = _Tok()
    assert decode_prompt("hello", tok) == ("hello", None)
    assert decode_prompt([5, 6, 7], tok) == ("", (5, 6, 7))
    assert decode_prompt(["a bb", 5, "ccc"], tok) == ("", (1, 11, 12, 5, 13))  # BOS only for a leading string
    assert decode_prompt([5, "a"], tok) == ("", (5, 11))
    assert decode_prompt({"prompt_string": "x"}, tok) == ("x", None)
    assert decode_prompt([[4, 5]], tok) == ("", (4, 5))
    assert decode_prompt({"prompt_string": "x <__media__>", "multimodal_data": ["AA=="]}, tok) == ("x <__media__>", None)
    for bad in [["a", "b"], [100], [-1], [1.5], [], None, 3]:
        with pytest.raises(RequestError):
            decode_prompt(bad, tok)


def test_completion_fields() -> None:
    d = decode_completion({}, "p", None)
    s = d.request.sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.seed, s.repeat_last_n, s.repeat_penalty) == (
        0.8, 40, 0.95, 0.05, None, 64, 1.0)
    assert (d.request.num_predict, d.n_predict, d.stream, d.request.cache_prompt, d.request.format) == (
        0, -1, False, True, None)
    d = decode_completion({"max_tokens": 5, "n_predict": 7, "seed": 3, "stop": "\n", "stream": True,
                           "cache_prompt": False, "n_keep": -1, "temperature": 0, "model": "m",
                           "stream_options": {"include_usage": True}, "grammar": "root ::= \"a\""}, "p", None, 4)
    assert (d.request.num_predict, d.request.sampling.seed, d.request.stop, d.stream, d.request.cache_prompt) == (
        7, 3, ("\n",), True, False)
    assert (d.request.num_keep, d.model, d.include_usage, d.request.grammar) == (-1, "m", True, 'root ::= "a"')
    assert decode_completion({"max_completion_tokens": 9, "n": 1}, "", None).request.num_predict == 9
    assert decode_completion({}, "", None, default_keep=4).request.num_keep == 4
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert decode_completion({"json_schema": schema}, "", None).request.format == json.dumps(schema).replace(" ", "")
    assert decode_completion({"response_format": {"type": "json_object"}}, "", None).request.format == '"json"'
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert decode_completion({"response_format": rf}, "", None).request.format == json.dumps(schema).replace(" ", "")
    assert decode_completion({"response_format": {"type": "text"}}, "", None).request.format is None
    for bad in [{"temperature": "hot"}, {"n_predict": 1.5}, {"stream": 1}, {"stop": [1]}, {"json_schema": "x"},
                {"response_format": {"type": "xml"}}, {"response_format": {"type": "json_schema"}}, {"seed": True},
                {"n": 2}, {"n_cmpl": 3}]:
        with pytest.raises(RequestError):
            decode_completion(bad, "", None)
    for body in [b"", b"[1]", b"{", b"\xff"]:
        with pytest.raises(RequestError):
            parse_body(body)


def test_probability_fields() -> None:
    def n_probs(doc: dict[str, Any]) -> int:
        return decode_completion(doc, "p", None).request.n_probs
    assert n_probs({}) == 0 and n_probs({"n_probs": 5}) == 5
    assert n_probs({"logprobs": True}) == 20 and n_probs({"logprobs": True, "top_logprobs": 2}) == 2  # llama-server
    assert n_probs({"logprobs": False}) == 0 and n_probs({"logprobs": 3}) == 3  # the legacy /v1/completions int
    assert n_probs({"n_probs": 100}) == 100 and not decode_completion({}, "p", None).return_tokens
    assert decode_completion({"return_tokens": True}, "p", None).return_tokens
    for bad, message in [({"top_logprobs": 2}, "requires logprobs"), ({"logprobs": False, "top_logprobs": 2},
                          "requires logprobs"), ({"n_probs": 101}, "0..100"), ({"n_probs": -1}, "0..100"),
                         ({"logprobs": "yes"}, "wrong type"), ({"n_probs": 2, "post_sampling_probs": True},
                                                               "post_sampling_probs is not supported")]:
        with pytest.raises(RequestError, match=message):
            decode_completion(bad, "p", None)


def test_probability_shapes() -> None:
    probs = (TokenProbs(5, -0.25, ((5, -0.25), (7, -1.5))), TokenProbs(9, -2.0, ((8, -0.5),)))
    pieces = {5: b" Pa", 7: b"\xc3", 8: b"ris", 9: b"!"}
    got = shapes.token_probs(probs, pieces.__getitem__)
    assert got[0] == {"id": 5, "token": " Pa", "bytes": [32, 80, 97], "logprob": -0.25, "top_logprobs": [
        {"id": 5, "token": " Pa", "bytes": [32, 80, 97], "logprob": -0.25},
        {"id": 7, "token": "\ufffd", "bytes": [195], "logprob": -1.5}]}
    assert got[1]["top_logprobs"] == [{"id": 8, "token": "ris", "bytes": [114, 105, 115], "logprob": -0.5}]
    partial = shapes.completion_partial(" Pa", 1, 5, (5,), got[:1])
    assert list(partial)[:4] == ["index", "content", "tokens", "stop"] and partial["tokens"] == [5]
    assert partial["completion_probabilities"] == got[:1]
    assert "completion_probabilities" not in shapes.completion_partial("x", 1, 5, (5,))


def test_media() -> None:
    """llama-server's multimodal_data and OpenAI image_url parts, down to the engine's [img-N] form."""
    assert multimodal_data({"prompt_string": "a", "multimodal_data": ["aGk=", "AA\n=="]}, {}) == (b"hi", b"\0")
    assert multimodal_data("a", {"multimodal_data": ["aGk="]}) == (b"hi",)
    assert multimodal_data("a", {}) == () and multimodal_data({"prompt_string": "a"}, {}) == ()
    for prompt, doc, message in [({"multimodal_data": ["aGk="]}, {"multimodal_data": ["aGk="]}, "given twice"),
                                 ("a", {"multimodal_data": "aGk="}, "must be an array"),
                                 ("a", {"multimodal_data": [""]}, r"multimodal_data\[0\] must be a non-empty"),
                                 ("a", {"multimodal_data": ["aGk=", "a?=="]}, r"multimodal_data\[1\] is not valid")]:
        with pytest.raises(RequestError, match=message):
            multimodal_data(prompt, doc)
    assert image_url_bytes({"image_url": {"url": "data:image/png;base64,aGk="}}, "p") == b"hi"
    assert image_url_bytes({"image_url": "DATA:image/jpeg;BASE64,aGk="}, "p") == b"hi"
    for url, message in [("http://x/a.png", "not fetched"), ("file:///etc/passwd", "not fetched"),
                         ("aGk=", "must be a data:image"), ("data:text/plain;base64,aGk=", "not an image"),
                         ("data:image/png,aGk=", "must be base64"), ("", "needs a 'url'")]:
        with pytest.raises(RequestError, match=message):
            image_url_bytes({"image_url": {"url": url}}, "p")
    text, files = engine_prompt("a <__media__> b <__media__>", [b"x", b"y"])
    assert text == "a [img-0] b [img-1]" and files == (ImageData(0, b"x"), ImageData(1, b"y"))
    assert engine_prompt("<__media__><__media__>", [b"x", b"y"])[0] == "[img-0][img-1]"
    for prompt, n, message in [("a", 1, "0 <__media__> marker"), ("<__media__>", 0, "1 <__media__> marker"),
                               ("[img-0] <__media__>", 1, "may not contain")]:
        with pytest.raises(RequestError, match=message):
            engine_prompt(prompt, [b"x"] * n)
    media: list[bytes] = []
    msgs = normalize_messages([{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}]}],
        media)
    assert msgs[0]["content"] == "a\n<__media__>" and media == [b"hi"]


# ---- response shapes ------------------------------------------------------------------------------------------

METRICS = Metrics(prompt_eval_count=10, prompt_eval_duration_ns=20_000_000, eval_count=4,
                  eval_duration_ns=8_000_000, cache_n=6)


def test_timings_bytes() -> None:
    assert shapes.dumps(shapes.timings(METRICS)) == (
        b'{"cache_n":6,"prompt_n":4,"prompt_ms":20.0,"prompt_per_token_ms":5.0,"prompt_per_second":200.0,'
        b'"predicted_n":4,"predicted_ms":8.0,"predicted_per_token_ms":2.0,"predicted_per_second":500.0}')
    zero = shapes.timings(Metrics())
    assert zero["prompt_per_second"] == 0.0 and zero["predicted_per_token_ms"] == 0.0  # no inf/NaN on the wire


def test_error_and_sse_bytes() -> None:
    assert shapes.dumps(shapes.error_object(503, "Loading model")) == (
        b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}')
    assert shapes.dumps(shapes.error_object(400, "x"))[-32:] == b'"type":"invalid_request_error"}}'
    assert shapes.sse({"content": "é\n"}) == 'data: {"content":"é\\n"}\n\n'.encode()
    assert shapes.SSE_DONE == b"data: [DONE]\n\n"


def test_completion_shapes() -> None:
    out = shapes.Outcome(DoneReason.STOP, METRICS, stop_word="\n\n")
    final = shapes.completion_final("a\nb", out, "m", "p", {})
    assert list(final) == ["index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted",
                           "tokens_evaluated", "generation_settings", "prompt", "has_new_line", "truncated",
                           "stop_type", "stopping_word", "tokens_cached", "timings"]
    assert (final["stop"], final["stop_type"], final["stopping_word"], final["has_new_line"]) == (
        True, "word", "\n\n", True)
    assert shapes.Outcome(DoneReason.STOP, METRICS).stop_type == "eos"
    assert shapes.Outcome(DoneReason.LENGTH, METRICS).stop_type == "limit"
    assert shapes.Outcome(DoneReason.LENGTH, METRICS).finish_reason == "length"
    assert shapes.dumps(shapes.completion_partial("x", 2, 10)) == (
        b'{"index":0,"content":"x","tokens":[],"stop":false,"id_slot":-1,"tokens_predicted":2,"tokens_evaluated":10}')


def test_openai_shapes() -> None:
    chunk = shapes.text_completion("x", None, "cmpl-1", 7, "m", None)
    assert shapes.dumps(chunk) == (
        b'{"choices":[{"text":"x","index":0,"logprobs":null,"finish_reason":null}],"created":7,"model":"m",'
        b'"system_fingerprint":"ollama-pyrunner-0.1.0","object":"text_completion","id":"cmpl-1"}')
    whole = shapes.text_completion("x", "stop", "cmpl-1", 7, "m", METRICS)
    assert list(whole) == ["choices", "created", "model", "system_fingerprint", "object", "usage", "id", "timings"]
    assert whole["usage"] == {"completion_tokens": 4, "prompt_tokens": 10, "total_tokens": 14}
    chat = shapes.chat_completion("hi", shapes.Outcome(DoneReason.STOP, METRICS), "chatcmpl-1", 7, "m")
    assert list(chat) == ["choices", "created", "model", "system_fingerprint", "object", "usage", "id", "timings"]
    assert chat["choices"] == [{"finish_reason": "stop", "index": 0,
                                "message": {"role": "assistant", "content": "hi"}}]
    assert shapes.dumps(shapes.chat_chunk({"content": "a"}, None, "c", 7, "m")) == (
        b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"a"}}],"created":7,"id":"c","model":"m",'
        b'"system_fingerprint":"ollama-pyrunner-0.1.0","object":"chat.completion.chunk"}')
    usage = shapes.chat_usage_chunk(METRICS, "c", 7, "m")
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 14


def test_embedding_shapes() -> None:
    v = shapes.l2_normalize([3.0, 4.0])
    assert v == [pytest.approx(0.6), pytest.approx(0.8)]
    assert shapes.dumps(shapes.embeddings_oai([[0.5, 1.0]], 3, "m")) == (
        b'{"model":"m","object":"list","usage":{"prompt_tokens":3,"total_tokens":3},'
        b'"data":[{"embedding":[0.5,1.0],"index":0,"object":"embedding"}]}')
    b64 = shapes.embeddings_oai([[1.0]], 1, "m", "base64")["data"][0]["embedding"]
    assert b64 == "AACAPw=="  # 1.0f little-endian
    assert shapes.embeddings_native([[1.0]]) == [{"index": 0, "embedding": [[1.0]]}]


# ---- HTTP status codes in-process ---------------------------------------------------------------------------

class _FakeEngine:
    tokenizer = _Tok()
    can_embed = False
    error: str | None = None
    n_ctx_slot = 64
    parallel = 1


def test_loading_answers_503() -> None:
    state = ServeState(model_path="/m.gguf", model_name="m")
    with TestClient(build_app(state)) as c:
        loading = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
        for r in [c.get("/health"), c.post("/completion", json={"prompt": "x"}), c.get("/v1/models"),
                  c.post("/v1/chat/completions", json={"messages": []})]:
            assert (r.status_code, r.content) == (503, loading)
            assert r.headers["content-type"] == "application/json; charset=utf-8"
        state.engine = cast(Any, _FakeEngine())
        assert (c.get("/health").status_code, c.get("/health").content) == (200, b'{"status":"ok"}')


def test_api_key() -> None:
    state = ServeState(model_path="/m.gguf", model_name="m", engine=cast(Any, _FakeEngine()), api_key="sesame")
    with TestClient(build_app(state)) as c:
        r = c.post("/tokenize", json={"content": "a"})
        assert (r.status_code, r.content) == (
            401, b'{"error":{"code":401,"message":"Invalid API Key","type":"authentication_error"}}')
        assert c.post("/tokenize", json={"content": "a"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/tokenize", json={"content": "a"}, headers={"Authorization": "Bearer sesame"}).json() == {
            "tokens": [11]}
        assert c.get("/props").status_code == 401
        assert c.post("/tokenize", json={}, headers={"X-Api-Key": "sésame".encode()}).status_code == 401
        assert c.get("/health").status_code == 200  # public, as in llama-server


def test_template_kwargs_and_failures() -> None:
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
                            "{{ messages[0]['content'] }}|{{ enable_thinking }}|{{ add_generation_prompt }}")
    state = ServeState(model_path="/m.gguf", model_name="m", engine=cast(Any, _FakeEngine()), template=template,
                       template_kwargs={"enable_thinking": True})
    user = [{"role": "user", "content": "x"}]
    with TestClient(build_app(state)) as c:
        assert c.post("/apply-template", json={"messages": user}).json() == {"prompt": "x|True|True"}
        r = c.post("/apply-template", json={"messages": user, "chat_template_kwargs": {"enable_thinking": False,
                                                                                      "messages": "ignored"}})
        assert r.json() == {"prompt": "x|False|True"}  # the request's kwargs win, the reserved names stay ours
        r = c.post("/apply-template", json={"messages": [{"role": "system", "content": "s"}]})
        assert (r.status_code, r.json()["error"]["message"]) == (400, "user first")
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "s"}]})
        assert (r.status_code, r.json()["error"]["type"]) == (400, "invalid_request_error")
        assert c.post("/apply-template", json={"messages": user, "chat_template_kwargs": 1}).status_code == 400


def test_request_errors() -> None:
    state = ServeState(model_path="/m.gguf", model_name="m", engine=cast(Any, _FakeEngine()))
    with TestClient(build_app(state, max_body=64)) as c:
        r = c.post("/tokenize", content=b'{"content": "' + b"a" * 100 + b'"}')
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/tokenize", content=b"{")
        assert r.status_code == 400 and r.json()["error"]["code"] == 400
        assert c.post("/tokenize", json={"content": "a bb"}).content == b'{"tokens":[11,12]}'
        assert c.post("/tokenize", json={"content": "a", "add_special": True}).json() == {"tokens": [1, 11]}
        pieces = c.post("/tokenize", json={"content": "a", "with_pieces": True}).json()
        assert pieces == {"tokens": [{"id": 11, "piece": "11"}]}
        assert c.post("/detokenize", json={"tokens": [5, 6]}).content == b'{"content":"5 6"}'
        assert c.post("/detokenize", json={"tokens": [100]}).status_code == 400
        assert c.post("/completion", json={"n_predict": 1}).status_code == 400  # no prompt
        r = c.post("/v1/embeddings", json={"input": "x"})
        assert (r.status_code, r.json()["error"]["type"]) == (501, "not_supported_error")
        assert c.get("/completion").status_code == 405
    state.error = "bad file"
    state.engine = None
    with TestClient(build_app(state)) as c:
        r = c.get("/health")
        assert r.status_code == 500 and r.json()["error"]["message"] == "model failed to load: bad file"


def test_deeply_nested_body_is_a_400_not_a_500() -> None:
    from runner.errors import RequestError
    from runner.llamaserver.decode import parse_body
    with pytest.raises(RequestError, match="nesting too deep"):
        parse_body(b'{"prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
