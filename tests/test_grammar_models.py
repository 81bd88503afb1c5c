"""Grammar-constrained generation on the real models, in process (the HTTP path is in test_server_grammar.py):
30 seeded samples at temperature 1.0 per schema fixture on SmolLM2 (byte-level BPE) and Gemma 3 (SentencePiece
with byte fallback) all parse and validate; unconstrained sequences in the same batches are bit for bit what they
are alone; a dead end fails only its sequence; context shift and prompt truncation with a grammar in force.

The schemas bound every string and number, so each sample ends within a known number of tokens; the 30 samples
of a schema run as one batch of 30 sequences."""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runner.cli import Loaded
from runner.engine import Engine, Event
from runner.grammar import OLLAMA_JSON_GRAMMAR, GrammarCompiler
from runner.protocol import CompletionRequest
from runner.responses import DoneReason
from runner.sampling import SamplerParams

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent / "data" / "grammar"
SCHEMAS = sorted(p.name.removesuffix(".schema.json") for p in FIXTURES.glob("*.schema.json"))
N_SAMPLES = 30
SLOT_CTX = 96  # per sequence: prompt + a typical sample (a longer one shifts the context, which is fine)
NUM_PREDICT = 200  # above the longest text any of the schema grammars allows, in tokens
PROMPT = {"smollm2": "<|im_start|>user\nGive me an example as JSON.<|im_end|>\n<|im_start|>assistant\n",
          "gemma3": "<start_of_turn>user\nGive me an example as JSON.<end_of_turn>\n<start_of_turn>model\n"}


def request(prompt: str, *, grammar: str = "", fmt: str | None = None, seed: int = 0, temperature: float = 1.0,
            num_predict: int = NUM_PREDICT) -> CompletionRequest:
    # Ollama's default top_k and top_p, as a request through `ollama serve` would carry them
    return CompletionRequest(prompt=prompt, images=(), num_predict=num_predict, num_keep=0, stop=(),
                             grammar=grammar, format=fmt,
                             sampling=SamplerParams(temperature=temperature, top_k=40, top_p=0.9, seed=seed))


class Results:
    """Collects each submitted sequence's events; `wait` returns (text, final event) per sequence."""

    def __init__(self) -> None:
        self.events: list[list[Event]] = []
        self._done = threading.Semaphore(0)

    def sink(self) -> Any:
        evs: list[Event] = []
        self.events.append(evs)

        def put(ev: Event) -> None:
            evs.append(ev)
            if ev.done is not None:
                self._done.release()
        return put

    def wait(self, timeout: float = 600) -> list[tuple[str, Event]]:
        for _ in self.events:
            assert self._done.acquire(timeout=timeout), "a sequence did not finish"
        return [("".join(e.text for e in evs), evs[-1]) for evs in self.events]


def run(engine: Engine, reqs: list[CompletionRequest]) -> list[tuple[str, Event]]:
    res = Results()
    for r in reqs:
        engine.submit(r, res.sink())
    return res.wait()


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model(request: pytest.FixtureRequest, smollm2_path: Path, gemma3_path: Path) -> Iterator[tuple[str, Engine]]:
    path = smollm2_path if request.param == "smollm2" else gemma3_path
    loaded = Loaded(str(path), threads=2)
    engine = Engine(loaded.backend, loaded.model, loaded.tokenizer, n_ctx=SLOT_CTX * N_SAMPLES, n_batch=512,
                    parallel=N_SAMPLES)
    engine.start()
    yield request.param, engine
    engine.close()


@pytest.mark.parametrize("schema", SCHEMAS)
def test_seeded_samples_validate(model: tuple[str, Engine], schema: str) -> None:
    name, engine = model
    gbnf = (FIXTURES / f"{schema}.gbnf").read_text()
    spec = json.loads((FIXTURES / f"{schema}.schema.json").read_text())
    out = run(engine, [request(PROMPT[name], grammar=gbnf, seed=s) for s in range(N_SAMPLES)])
    texts = set()
    for seed, (text, final) in enumerate(out):
        assert final.error is None and final.done == DoneReason.STOP, (seed, text, final)
        jsonschema.validate(json.loads(text), spec)
        texts.add(text)
    assert len(texts) > 1  # temperature 1.0 really samples


def test_format_json_and_schema(model: tuple[str, Engine]) -> None:
    """`format` alone (a client talking to the runner itself): "json" gives Ollama's grammar, a schema object is
    compiled directly; greedy, so the texts are also what the GBNF grammar gives."""
    name, engine = model
    schema = (FIXTURES / "person.schema.json").read_text()
    compact = json.dumps(json.loads(schema), separators=(",", ":"))
    (by_fmt, f1), (by_gbnf, f2), (schema_text, f3) = run(engine, [
        request(PROMPT[name], fmt='"json"', temperature=0, num_predict=120),
        request(PROMPT[name], grammar=OLLAMA_JSON_GRAMMAR, temperature=0, num_predict=120),
        request(PROMPT[name], fmt=compact, temperature=0)])
    assert by_fmt == by_gbnf and f1.done == f2.done
    if f1.done == DoneReason.STOP:
        assert isinstance(json.loads(by_fmt), dict)
    else:  # a long object: still a prefix of one
        assert by_fmt.lstrip().startswith("{")
    assert f3.done == DoneReason.STOP
    jsonschema.validate(json.loads(schema_text), json.loads(schema))


def test_unconstrained_neighbours_unchanged(model: tuple[str, Engine]) -> None:
    name, engine = model
    plain = [request(PROMPT[name], seed=s, num_predict=24) for s in (7, 8)]
    alone = run(engine, plain)
    gbnf = (FIXTURES / "nested.gbnf").read_text()
    mixed = run(engine, [plain[0], request(PROMPT[name], grammar=gbnf, seed=1), plain[1],
                         request(PROMPT[name], fmt='"json"', seed=2, num_predict=24)])
    assert [mixed[0][0], mixed[2][0]] == [t for t, _ in alone]
    jsonschema.validate(json.loads(mixed[1][0]), json.loads((FIXTURES / "nested.schema.json").read_text()))


class _HideZ:
    """The model's tokenizer with every token that contains "z" hidden from the grammar (marked control)."""

    def __init__(self, tokenizer: Any) -> None:
        self._t = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def is_control(self, i: int) -> bool:
        return bool(self._t.is_control(i)) or b"z" in self._t.token_bytes(i)

    def encode(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        ids: list[int] = self._t.encode(text, add_special=add_special, parse_special=parse_special)
        return [] if any(self.is_control(i) for i in ids) else ids  # no spelling without the hidden tokens


def test_dead_end_fails_only_its_sequence(model: tuple[str, Engine]) -> None:
    name, engine = model
    hidden = GrammarCompiler(_HideZ(engine.tokenizer), engine.n_vocab)
    dead = hidden.compile(request(PROMPT[name], grammar='root ::= "{" "z"'))
    res = Results()
    engine.submit(request(PROMPT[name], seed=3, num_predict=16), res.sink())
    engine.submit(request(PROMPT[name], grammar='root ::= "{" "z"'), res.sink(), grammar=dead)
    (text, ok), (dead_text, failed) = res.wait()
    assert ok.error is None and ok.done == DoneReason.LENGTH and text
    assert failed.error is not None and "dead end" in failed.error
    assert "z" not in dead_text  # it ended where no token could spell the "z"


def test_context_shift_and_truncation_with_grammar(smollm2_path: Path) -> None:
    """A 64-token context: the prompt is truncated, and the constrained text (well over 64 tokens) needs several
    shifts; the grammar state runs on undisturbed and the text matches it to the end."""
    loaded = Loaded(str(smollm2_path), threads=2)
    engine = Engine(loaded.backend, loaded.model, loaded.tokenizer, n_ctx=64, n_batch=64, parallel=1)
    engine.start()
    try:
        prompt = "Count with me: " + " ".join(str(i) for i in range(60))  # over 64 tokens
        assert len(loaded.tokenizer.encode(prompt)) > 64
        [(text, final)] = run(engine, [request(prompt, grammar='root ::= ("ab" [0-9] " "){40} "end"', seed=5,
                                               num_predict=400)])
    finally:
        engine.close()
    assert final.error is None and final.done == DoneReason.STOP
    assert re.fullmatch(r"(ab[0-9] ){40}end", text), text
    assert final.metrics is not None and final.metrics.eval_count > 64


def test_character_split_over_byte_tokens(model: tuple[str, Engine]) -> None:
    """"é" spelled by the vocabulary's two single-byte tokens (byte-level BPE's "Ã" "©" on SmolLM2, the byte-fallback
    tokens <0xC3> <0xA9> on Gemma 3), and the grammar ends only after the second byte."""
    name, engine = model
    tok = engine.tokenizer
    first, second = (tok.token_id("Ã"), tok.token_id("©")) if name == "smollm2" else (
        tok.token_id("<0xC3>"), tok.token_id("<0xA9>"))
    assert (tok.token_bytes(first), tok.token_bytes(second)) == (b"\xc3", b"\xa9")
    c = engine.grammars.compile(request("", grammar='root ::= "x" [à-ü]'))
    assert c is not None
    eos = min(tok.eog_ids)
    c.accept(tok.encode("x", add_special=False)[0])
    assert c.allows(first) and not c.allows(second) and not c.allows(eos)
    c.accept(first)
    assert c.allows(second) and not c.allows(first) and not c.allows(eos)
    c.accept(second)
    assert c.allows(eos)
