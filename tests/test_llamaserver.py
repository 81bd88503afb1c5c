"""The llama-server mode end to end: a real subprocess started through a launcher named `llama-server` (as newer
Ollama finds it in lib/ollama) with the flags Ollama passes, driven over HTTP as Ollama and the `openai` client
drive llama-server. SmolLM2 for generation (its own ChatML template), all-MiniLM-L6-v2 for embeddings.

The greedy texts are the P3 runner's (test_server.EXPECTED_20, which test_server checks against the P3 runner and
the standalone `generate` tool), so the three routes and both front ends are tied to one engine output."""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from test_llamaserver_units import CONVERSATIONS
from test_server import EXPECTED_20, PROMPT
from test_server_support import PYTHON, REPO, free_port

from models.convert import convert

pytestmark = pytest.mark.slow

PROMPT_IDS = [504, 3575, 282, 4649, 314]  # SmolLM2's ids for PROMPT (tests/test_tokenizer_models.py)
LOADING = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
OLLAMA_FLAGS = ["--host", "127.0.0.1", "--no-webui", "--offline", "-c", "1024", "-np", "2", "--cache-type-k", "f16",
                "--cache-type-v", "f16", "--flash-attn", "auto", "-ngl", "0", "-t", "1", "--jinja", "--keep", "0",
                "--draft-max", "16", "--a-future-flag", "1"]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    stderr_path: Path
    polls: list[tuple[int, bytes]]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120.0)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def _start(model: Path, tmp: Path, flags: list[str]) -> Iterator[Server]:
    launcher = tmp / "llama-server"  # what a `llama-server` console script or lib/ollama launcher looks like
    launcher.write_text(f"#!{PYTHON}\nimport sys\nfrom runner.cli import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    port = free_port()
    stderr_path = tmp / f"serve-{port}.stderr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([str(launcher), "--model", str(model), "--port", str(port), *flags], cwd=tmp,
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
    server = Server(proc, port, stderr_path, [])
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=server.url, timeout=5.0) as c:
            while True:
                assert proc.poll() is None, f"server exited:\n{server.stderr()[-3000:]}"
                assert time.monotonic() < deadline, server.stderr()[-3000:]
                try:
                    r = c.get("/health")
                except httpx.TransportError:
                    time.sleep(0.005)
                    continue
                server.polls.append((r.status_code, r.content))
                if r.status_code == 200:
                    break
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def smol(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _start(smollm2_path, tmp_path_factory.mktemp("serve-smol"), OLLAMA_FLAGS)


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-minilm")
    gguf = tmp / "minilm-f16.gguf"
    convert(minilm_dir, gguf, "f16")
    yield from _start(gguf, tmp, ["-t", "1", "-c", "512"])


@pytest.fixture(scope="module")
def oai(smol: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0)


def _events(raw: bytes) -> list[bytes]:
    """Split an SSE body into its `data: ` payloads, checking the framing byte for byte."""
    assert raw.endswith(b"\n\n"), raw[-100:]
    frames = raw[:-2].split(b"\n\n")
    for f in frames:
        assert f.startswith(b"data: ") and b"\n" not in f, f
    return [f[len(b"data: "):] for f in frames]


def _stream(c: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Response, list[bytes]]:
    with c.stream("POST", path, json=body) as r:
        raw = r.read()
    assert r.status_code == 200, raw
    assert r.headers["content-type"].startswith("text/event-stream")
    return r, _events(raw)


def _greedy(**extra: Any) -> dict[str, Any]:
    return {"temperature": 0, **extra}


# ---- start-up ------------------------------------------------------------------------------------------------

def test_health_while_loading(smol: Server) -> None:
    assert smol.polls[-1] == (200, b'{"status":"ok"}')
    for status, body in smol.polls[:-1]:
        assert (status, body) == (503, LOADING)
    log = smol.stderr()
    assert "ignoring unknown flags: --a-future-flag 1" in log
    assert "speculative decoding is not supported; ignoring --draft-max 16" in log
    print(f"\n/health during load: {len(smol.polls) - 1} answers of 503 before 200")


# ---- native /completion -------------------------------------------------------------------------------------

def test_greedy_completion_equals_p3_runner(smol: Server) -> None:
    with smol.client() as c:
        for prompt in [PROMPT, PROMPT_IDS, [PROMPT_IDS[0], " capital of France is"]]:
            r = c.post("/completion", json=_greedy(prompt=prompt, n_predict=20))
            assert r.status_code == 200 and r.headers["content-type"] == "application/json; charset=utf-8"
            res = r.json()
            assert res["content"] == EXPECTED_20, prompt
            assert (res["stop"], res["stop_type"], res["tokens_predicted"], res["tokens_evaluated"]) == (
                True, "limit", 20, 5)
            assert res["timings"]["predicted_n"] == 20 and res["prompt"] == PROMPT
        # n_predict 0 generates nothing
        res = c.post("/completion", json=_greedy(prompt=PROMPT, n_predict=0)).json()
        assert (res["content"], res["stop_type"], res["tokens_evaluated"], res["tokens_predicted"]) == (
            "", "limit", 5, 0)
        r = c.post("/v1/completions", json=_greedy(prompt=PROMPT, max_tokens=20))
        assert r.json()["choices"][0]["text"] == EXPECTED_20
        assert r.json()["choices"][0]["finish_reason"] == "length"


def test_cache_n_counts_reused_prompt_tokens(smol: Server) -> None:
    prompt = "Zebras rarely visit Antarctica because"  # shares no prefix with the other tests' prompts
    with smol.client() as c:
        n = len(c.post("/tokenize", json={"content": prompt}).json()["tokens"])
        first = c.post("/completion", json=_greedy(prompt=prompt, n_predict=4)).json()
        second = c.post("/completion", json=_greedy(prompt=prompt, n_predict=4)).json()
    assert (first["timings"]["cache_n"], first["timings"]["prompt_n"]) == (0, n)
    # the whole prompt but its last token is reused (that one is evaluated again for its logits)
    assert (second["timings"]["cache_n"], second["timings"]["prompt_n"]) == (n - 1, 1)
    assert second["content"] == first["content"] and second["tokens_evaluated"] == n
    t = second["timings"]
    assert list(t) == ["cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n",
                       "predicted_ms", "predicted_per_token_ms", "predicted_per_second"]
    assert t["predicted_per_second"] == pytest.approx(1e3 * t["predicted_n"] / t["predicted_ms"])


def test_completion_stream(smol: Server) -> None:
    with smol.client() as c:
        _, events = _stream(c, "/completion", _greedy(prompt=PROMPT, n_predict=20, stream=True))
    objs = [json.loads(e) for e in events]
    assert all(not o["stop"] and list(o)[:4] == ["index", "content", "tokens", "stop"] for o in objs[:-1])
    assert [o["tokens_predicted"] for o in objs[:-1]] == list(range(1, len(objs)))
    assert all(o["tokens_evaluated"] == 5 for o in objs[:-1])
    final = objs[-1]
    assert final["stop"] is True and final["content"] == "" and final["timings"]["predicted_n"] == 20
    assert "".join(o["content"] for o in objs) == EXPECTED_20


def test_token_ids_and_probabilities(smol: Server, oai: openai.OpenAI) -> None:
    """n_probs (native), logprobs (OpenAI chat, and the legacy integer of /v1/completions) report the same numbers,
    streamed or not; streamed pieces carry their token ids; greedy picks the likeliest reported candidate."""
    with smol.client() as c:
        res = c.post("/completion", json=_greedy(prompt=PROMPT, n_predict=8, n_probs=3, return_tokens=True)).json()
        _, events = _stream(c, "/completion", _greedy(prompt=PROMPT, n_predict=8, n_probs=3, stream=True))
        legacy = c.post("/v1/completions", json=_greedy(prompt=PROMPT, max_tokens=8, logprobs=3)).json()
        plain = c.post("/completion", json=_greedy(prompt=PROMPT, n_predict=8)).json()
    probs = res["completion_probabilities"]
    assert len(probs) == 8 and [p["id"] for p in probs] == res["tokens"]
    assert "".join(p["token"] for p in probs) == res["content"] and EXPECTED_20.startswith(res["content"])
    for p in probs:
        top = p["top_logprobs"]
        assert len(top) == 3 and (top[0]["id"], top[0]["logprob"]) == (p["id"], p["logprob"])
        assert top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        assert 0 < sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-9
        assert p["bytes"] == list(p["token"].encode()) and list(p) == ["id", "token", "bytes", "logprob", "top_logprobs"]
    objs = [json.loads(e) for e in events]
    assert [t for o in objs[:-1] for t in o["tokens"]] == res["tokens"]
    assert [q for o in objs[:-1] for q in o["completion_probabilities"]] == probs
    assert "completion_probabilities" not in plain and plain["tokens"] == []
    assert legacy["choices"][0]["logprobs"] == {"content": probs}
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    with smol.client() as c:
        rendered = c.post("/apply-template", json={"messages": messages}).json()["prompt"]
        native = c.post("/completion", json=_greedy(prompt=rendered, n_predict=6, n_probs=2)).json()
    out = oai.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                      top_logprobs=2)
    content = out.choices[0].logprobs.content if out.choices[0].logprobs else None
    assert content is not None and out.choices[0].message.content == native["content"]
    assert [(t.token, t.logprob, [(u.token, u.logprob) for u in t.top_logprobs]) for t in content] == [
        (p["token"], p["logprob"], [(u["token"], u["logprob"]) for u in p["top_logprobs"]])
        for p in native["completion_probabilities"]]


def test_stop_word(smol: Server) -> None:
    with smol.client() as c:
        res = c.post("/completion", json=_greedy(prompt=PROMPT, n_predict=20, stop=["\n"])).json()
    assert (res["content"], res["stop_type"], res["stopping_word"]) == (" Paris.", "word", "\n")


def test_context_limits_without_context_shift(smol: Server) -> None:
    """Without --context-shift (Ollama passes it only when asked): a prompt that fills the 512-token slot is a 400,
    and a generation ends when the slot is full."""
    with smol.client() as c:
        too_long = list(range(1000, 1512))
        r = c.post("/completion", json={"prompt": too_long, "n_predict": 4})
        assert (r.status_code, r.json()["error"]["type"]) == (400, "exceed_context_size_error")
        res = c.post("/completion", json=_greedy(prompt=too_long[:504], n_predict=-1)).json()
    assert res["tokens_evaluated"] == 504 and res["tokens_predicted"] <= 8
    assert res["stop_type"] == "eos" or res["tokens_predicted"] == 8


def test_openai_completions_stream(smol: Server) -> None:
    with smol.client() as c:
        _, events = _stream(c, "/v1/completions", _greedy(prompt=PROMPT, max_tokens=20, stream=True))
    assert events[-1] == b"[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert "".join(o["choices"][0]["text"] for o in objs) == EXPECTED_20
    assert [o["choices"][0]["finish_reason"] for o in objs] == [None] * (len(objs) - 1) + ["length"]
    assert objs[-1]["usage"] == {"completion_tokens": 20, "prompt_tokens": 5, "total_tokens": 25}
    assert len({o["id"] for o in objs}) == 1 and objs[0]["object"] == "text_completion"


# ---- chat -----------------------------------------------------------------------------------------------------

def test_apply_template_uses_the_models_template(smol: Server) -> None:
    with smol.client() as c:
        for messages, expected in CONVERSATIONS:
            r = c.post("/apply-template", json={"messages": messages})
            assert r.status_code == 200 and r.content == json.dumps({"prompt": expected}).replace(
                '": "', '":"').encode()
        r = c.post("/v1/chat/completions", json={"messages": [{"role": 3, "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_chat_equals_completion_of_rendered_prompt(smol: Server) -> None:
    messages, rendered = CONVERSATIONS[1]
    with smol.client() as c:
        plain = c.post("/completion", json=_greedy(prompt=rendered, n_predict=16)).json()
        chat = c.post("/v1/chat/completions", json=_greedy(messages=messages, max_tokens=16)).json()
        _, events = _stream(c, "/v1/chat/completions", _greedy(messages=messages, max_tokens=16, stream=True))
    assert plain["content"] and chat["choices"][0]["message"] == {"role": "assistant", "content": plain["content"]}
    assert chat["usage"]["prompt_tokens"] == plain["tokens_evaluated"] and chat["object"] == "chat.completion"
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks) == plain["content"]
    finish = "length" if plain["stop_type"] == "limit" else "stop"
    assert chat["choices"][0]["finish_reason"] == finish
    assert chunks[-1]["choices"][0] == {"finish_reason": finish, "index": 0, "delta": {}}
    assert "timings" in chunks[-1] and all(ch["object"] == "chat.completion.chunk" for ch in chunks)


def test_openai_client_chat(oai: openai.OpenAI, smol: Server) -> None:
    messages: Any = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    whole = oai.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0)
    assert whole.model == "smol" and whole.choices[0].finish_reason == "length"
    text = whole.choices[0].message.content
    assert text
    pieces = [ch.choices[0].delta.content or "" for ch in oai.chat.completions.create(
        model="smol", messages=messages, max_tokens=12, temperature=0, stream=True) if ch.choices]
    assert "".join(pieces) == text
    seeded = [oai.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=1.0,
                                          seed=seed).choices[0].message.content for seed in (42, 42, 7)]
    assert seeded[0] == seeded[1] and seeded[0] != seeded[2]
    stopped = oai.chat.completions.create(model="smol", messages=CONVERSATIONS[0][0], max_tokens=30, temperature=0,
                                          stop=["!"])
    # unstopped the reply is "Hello! How can I help you today?"
    assert (stopped.choices[0].finish_reason, stopped.choices[0].message.content) == ("stop", "Hello")
    # JSON mode reaches the engine as Ollama's format "json" (its grammar is enforced by the engine's sampler)
    json_mode = oai.chat.completions.create(model="smol", messages=messages, max_tokens=4, temperature=0,
                                            response_format={"type": "json_object"})
    assert json_mode.choices[0].finish_reason in ("stop", "length")
    usage_stream = list(oai.chat.completions.create(model="smol", messages=messages, max_tokens=3, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
    assert usage_stream[-1].choices == [] and usage_stream[-1].usage is not None
    assert usage_stream[-1].usage.completion_tokens == 3
    legacy = oai.completions.create(model="smol", prompt=PROMPT, max_tokens=20, temperature=0)
    assert legacy.choices[0].text == EXPECTED_20


# ---- tokens, facts, errors ------------------------------------------------------------------------------------

def test_tokenize_detokenize(smol: Server) -> None:
    markup = "<|im_start|>user\nHi<|im_end|>\n"
    with smol.client() as c:
        assert c.post("/tokenize", json={"content": PROMPT}).content == b'{"tokens":[504,3575,282,4649,314]}'
        ids = c.post("/tokenize", json={"content": markup}).json()["tokens"]
        assert ids == [1, 4093, 198, 26843, 2, 198]
        plain = c.post("/tokenize", json={"content": markup, "parse_special": False}).json()["tokens"]
        assert 1 not in plain and 2 not in plain
        for tokens, text in [(PROMPT_IDS, PROMPT), (ids, markup), (plain, markup)]:
            assert c.post("/detokenize", json={"tokens": tokens}).json() == {"content": text}
        pieces = c.post("/tokenize", json={"content": " 世", "with_pieces": True}).json()["tokens"]
        assert [p["piece"] for p in pieces] == [" ", [0xE4, 0xB8], [0x96]]  # split UTF-8 comes back as bytes
        r = c.post("/completion", json={"prompt": [49152]})
        assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
        r = c.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"


def test_models_and_props(smol: Server, smollm2_path: Path) -> None:
    with smol.client() as c:
        models = c.get("/v1/models").json()
        props = c.get("/props").json()
    assert models["object"] == "list" and models["data"][0]["id"] == smollm2_path.name
    assert models["data"][0]["meta"] == {"n_vocab": 49152, "n_ctx_train": 8192, "n_embd": 576}
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 512
    assert props["model_path"] == str(smollm2_path) and props["chat_template"].startswith("{% for message")


# ---- embeddings -----------------------------------------------------------------------------------------------

def test_openai_embeddings_minilm(minilm: Server, shared_dir: Path) -> None:
    cases = json.loads((shared_dir / "fixtures" / "minilm-reference.json").read_text())["cases"]
    texts = [case["text"] for case in cases]
    with minilm.client() as c:
        res = c.post("/v1/embeddings", json={"input": texts, "model": "minilm"}).json()
        native = c.post("/embedding", json={"content": texts[0]}).json()
    assert list(res) == ["model", "object", "usage", "data"] and res["model"] == "minilm"
    n_tokens = sum(len(case["token_ids"]) for case in cases)
    assert res["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    for i, (case, item) in enumerate(zip(cases, res["data"])):
        assert (item["index"], item["object"]) == (i, "embedding")
        v, ref = np.asarray(item["embedding"]), np.asarray(case["mean_pooled"])
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-6)  # normalised, as llama-server does
        assert float(v @ ref / np.linalg.norm(ref)) >= 0.9999, case["text"]
    assert native == [{"index": 0, "embedding": [res["data"][0]["embedding"]]}]
    # the openai client asks for base64 and decodes it itself
    client = openai.OpenAI(base_url=minilm.url + "/v1", api_key="unused", max_retries=0)
    got = client.embeddings.create(model="minilm", input=texts[:2]).data
    np.testing.assert_allclose([d.embedding for d in got], [d["embedding"] for d in res["data"][:2]], rtol=1e-6)


# ---- hostile clients (issue 10 for this front end) --------------------------------------------------------------

_FUZZ_BASES: dict[str, dict[str, Any]] = {
    "/completion": {"prompt": "Hi", "n_predict": 2, "temperature": 0},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 2, "temperature": 0},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/tokenize": {"content": "Hi"}, "/detokenize": {"tokens": [1, 2]},
    "/apply-template": {"messages": [{"role": "user", "content": "Hi"}]},
    "/v1/embeddings": {"input": "Hi"}, "/embedding": {"content": "Hi"},
}
_FUZZ_KEYS = ["prompt", "n_predict", "max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "stream",
              "repeat_penalty", "presence_penalty", "frequency_penalty", "repeat_last_n", "grammar", "json_schema",
              "response_format", "messages", "tokens", "content", "input", "n_keep", "cache_prompt", "n",
              "stream_options", "chat_template_kwargs", "add_special", "with_pieces"]
_FUZZ_VALUES: list[Any] = [None, True, 0, -1, 1.5, "", "x", [], {}, [1, "a"], {"a": 1}, 2**70, -2**63, 1e-45,
                           3.4e38, -3.4e38, 1e39, [[1]], [{"role": 1}], "\udcff"]


def test_hostile_bodies_never_get_a_server_error(smol: Server) -> None:
    """Every endpoint with every field set to wrong types and extreme values (a seeded sample of the product): only
    200, 400 or (embeddings of a model without pooling) 501; a bad grammar and a lone surrogate escape are 400."""
    import random
    rng = random.Random(11)
    cases = [(path, key, value) for path in _FUZZ_BASES for key in _FUZZ_KEYS for value in _FUZZ_VALUES]
    with smol.client() as c:
        for path, key, value in rng.sample(cases, 500):
            body = json.dumps({**_FUZZ_BASES[path], key: value}).encode()
            with c.stream("POST", path, content=body, headers={"Content-Type": "application/json"}) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i > 8:  # an unlimited generation: hang up, as a client would
                        break
                allowed = {200, 400, 501} if "embedding" in path else {200, 400}
                assert r.status_code in allowed, (path, key, value, r.status_code)
        assert c.post("/completion", json={"prompt": "Hi", "grammar": "root ::= ("}).status_code == 400
        lone = b'{"prompt": "Hi \\udcff", "n_predict": 1}'
        assert c.post("/completion", content=lone).status_code == 400
        assert c.get("/health").json() == {"status": "ok"}
    assert smol.proc.poll() is None and "Traceback" not in smol.stderr()
