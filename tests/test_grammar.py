"""Grammar-constrained sampling, on a small byte vocabulary (no model): GBNF constructs accepted and rejected,
parse errors naming the problem, `format` conversion, the fixtures, the sample-first/mask-on-rejection sampler
and its distribution, end-of-generation only where the grammar can end, dead ends."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runner.errors import GrammarError
from runner.grammar import OLLAMA_JSON_GRAMMAR, VOCAB_ERROR, Constraint, GrammarCompiler, format_to_llguidance
from runner.protocol import CompletionRequest
from runner.sampling import Sampler, SamplerParams

FIXTURES = Path(__file__).resolve().parent / "data" / "grammar"
SCHEMAS = sorted(p.name.removesuffix(".schema.json") for p in FIXTURES.glob("*.schema.json"))


class ByteVocab:
    """A tokenizer-shaped vocabulary: the 256 single bytes, a few multi-byte tokens (one of them a whole UTF-8
    character, one its first byte only), a control token and an end token."""

    MULTI = (b"ab", b"\xc3\xa9", b'{"', b'":', b"true")

    def __init__(self, pieces: list[bytes] | None = None) -> None:
        self.pieces = pieces if pieces is not None else [bytes([i]) for i in range(256)] + list(self.MULTI)
        self.pieces = self.pieces + [b"<ctl>", b"</s>"]
        self.n_vocab = len(self.pieces)
        self.eos = self.n_vocab - 1
        self.ctl = self.n_vocab - 2
        self.eog_ids = frozenset({self.eos})
        self.bos_id = None

    def is_control(self, i: int) -> bool:
        return i >= self.ctl

    def token_bytes(self, i: int) -> bytes:
        return self.pieces[i]

    def encode(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        return list(text.encode())

    def id(self, piece: bytes) -> int:
        return self.pieces.index(piece)


VOCAB = ByteVocab()
COMPILER = GrammarCompiler(VOCAB, VOCAB.n_vocab)


def request(grammar: str = "", fmt: str | None = None) -> CompletionRequest:
    return CompletionRequest(prompt="p", images=(), sampling=SamplerParams(), num_predict=0, num_keep=0, stop=(),
                             grammar=grammar, format=fmt)


def constraint(grammar: str = "", fmt: str | None = None, compiler: GrammarCompiler = COMPILER) -> Constraint:
    c = compiler.compile(request(grammar, fmt))
    assert c is not None
    return c


def matches(c: Constraint, text: bytes, tokens: list[int] | None = None) -> bool:
    """Whether the grammar takes `text` (fed one byte token at a time, or as `tokens`) and can end after it."""
    for t in tokens if tokens is not None else list(text):
        if not c.allows(t):
            return False
        c.accept(t)
    return c.allows(VOCAB.eos)


# (grammar, accepted texts, rejected texts) per GBNF construct
CONSTRUCTS = [
    ('root ::= "ab"', ["ab"], ["", "a", "abc", "ba"]),
    ('root ::= "a" | "bc"', ["a", "bc"], ["b", "abc", ""]),  # alternation
    ('root ::= ("a" "b")+ "c"', ["abc", "ababc"], ["c", "abac", "ab"]),  # grouping, +
    ('root ::= "a"* "b"', ["b", "aaab"], ["a", "bb"]),  # *
    ('root ::= "a"? "b"', ["b", "ab"], ["aab"]),  # ?
    ('root ::= "a"{2,3}', ["aa", "aaa"], ["a", "aaaa"]),  # {m,n}
    ('root ::= [0-9]{2}', ["42"], ["4", "423"]),  # {m}
    ('root ::= "x"{2,}', ["xx", "xxxxx"], ["x"]),  # {m,}
    ('root ::= "x"{0,2} "y"', ["y", "xy", "xxy"], ["xxxy"]),  # {0,n}
    ('root ::= [a-c0-9]+', ["a1c", "0"], ["d", "a-"]),  # class with ranges
    ('root ::= [^a-c]', ["d", "Z", "é"], ["a", "b", "c"]),  # negation (é: two bytes, one character)
    ('root ::= [\\n\\t\\]\\\\]+', ["\n\t]\\"], ["n", "t"]),  # escapes inside a class
    ('root ::= [\\x41-\\x43] [\\u00e9]', ["Bé"], ["Dé", "Be"]),  # \x and \u escapes in classes
    ('root ::= "\\"q\\"\\n" "\\x41" "\\u00e9"', ['"q"\nAé'], ['"q"nAé', "qAé"]),  # escapes in literals
    ('# a comment\nroot ::= ("a" # inside a group\n  "b") # trailing\n', ["ab"], ["a"]),  # comments, newlines
    ('root ::= start\nstart ::= "s"', ["s"], ["start"]),  # a rule named start (Lark's start rule)
    ('root ::= first-name firstName "#"\nfirst-name ::= "a"\nfirstName ::= "b"', ["ab#"], ["aa#"]),  # same in Lark
    ('root ::= "\\\\u0041" [\\u0041-\\u0043] [\\U0001F600]', ["\\u0041B😀"], ["AB😀", "\\u0041D😀"]),
    ('root ::= item ("," item)*\nitem ::= [a-z]+', ["ab,c", "x"], ["ab,", ",a"]),  # rule references
    ('root ::= "(" root? ")"', ["()", "(())"], ["(()", ")("]),  # recursion through root
    ('root ::= "a" . "b"', ["axb", "aéb"], ["ab", "axxb"]),  # any character
    ('root ::= [à-ü]+', ["éü", "à"], ["a", "e"]),  # multi-byte range
    ('root   ::=   "a"\n\n\nother ::= "never used"', ["a"], ["never used"]),  # whitespace, unused rule
]


@pytest.mark.parametrize(("grammar", "good", "bad"), CONSTRUCTS, ids=[c[0][:30] for c in CONSTRUCTS])
def test_gbnf_constructs(grammar: str, good: list[str], bad: list[str]) -> None:
    for text in good:
        assert matches(constraint(grammar), text.encode()), (grammar, text)
    for text in bad:
        assert not matches(constraint(grammar), text.encode()), (grammar, text)


def test_multi_byte_character_split_over_tokens() -> None:
    """é as one token, or as its two bytes (a token holding only the first byte, as byte-fallback or byte-level
    vocabularies have); a lone continuation byte is refused."""
    g = 'root ::= "x" [é]'
    assert matches(constraint(g), b"", [ord("x"), VOCAB.id(b"\xc3\xa9")])
    assert matches(constraint(g), b"", [ord("x"), 0xC3, 0xA9])
    c = constraint(g)
    c.accept(ord("x"))
    assert c.allows(0xC3) and not c.allows(0xA9) and not c.allows(0xC2)
    c.accept(0xC3)
    assert c.allows(0xA9) and not c.allows(0xA8)


def test_ollama_json_grammar() -> None:
    for text in ['{"a": [1, -2.5e3, true, null, "x\\u00e9\\n"], "b": {}}', "{}", '{ "k": "é" }']:
        assert matches(constraint(OLLAMA_JSON_GRAMMAR), text.encode()), text
    for text in ['{"a":}', "[1]", '{"a": 01}', '{"a": "\x01"}', '{"a": 1,}', '"s"', '{"a" 1}']:
        assert not matches(constraint(OLLAMA_JSON_GRAMMAR), text.encode()), text
    # multi-byte tokens of the vocabulary are used where they fit
    assert matches(constraint(OLLAMA_JSON_GRAMMAR), b"", [VOCAB.id(b'{"'), ord("k"), VOCAB.id(b'":'),
                                                         VOCAB.id(b"true"), ord("}")])


def test_fixture_is_the_runners_json_grammar() -> None:
    assert (FIXTURES / "ollama_json.gbnf").read_text() == OLLAMA_JSON_GRAMMAR
    old = constraint((FIXTURES / "ollama_json_v060.gbnf").read_text())  # the pre-v0.6.7 text parses too
    assert matches(old, b'{"a": [1] } ')


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_fixtures_parse_and_match(name: str) -> None:
    gbnf = (FIXTURES / f"{name}.gbnf").read_text()
    examples = {
        "person": ('{"name": "Zoë", "age": 42, "height": 1.85, "active": false}',
                   '{"name": "Zoë", "age": 151, "height": 1.85, "active": false}'),
        "enum": ('{"color": "green", "size": "XL"}', '{"color": "pink", "size": "S"}'),
        "array_of_objects": ('{"items": [{"id": 1, "tag": "a"}, {"id": 999, "tag": "bcde"}]}',
                             '{"items": [{"id": 1, "tag": "a"}, {"id": 2, "tag": "b"}, {"id": 3, "tag": "c"}]}'),
        "nested": ('{"user": {"name": "Ann", "address": {"city": "Oslo", "zip": "0150"}}}',
                   '{"user": {"name": "Ann"}}'),
        "pattern": ('{"code": "ABC-123", "ok": true}', '{"code": "AB-123", "ok": true}'),
    }
    good, bad = examples[name]
    assert matches(constraint(gbnf), good.encode())
    assert not matches(constraint(gbnf), bad.encode())
    # the same schema given directly as `format` constrains the same way
    fmt = json.dumps(json.loads((FIXTURES / f"{name}.schema.json").read_text()), separators=(",", ":"))
    assert matches(constraint(fmt=fmt), good.encode())
    assert not matches(constraint(fmt=fmt), bad.encode())


@pytest.mark.parametrize(("grammar", "needle"), [
    ('root ::= [a-', "line 1"),
    ('root ::= "abc', "line 1"),
    ('root ::= ( "a"', "Expected ')'"),
    ("root ::= foo", "'foo'"),
    ('x ::= "a"', "root"),
    ('root ::= "a"{2,1}', "range end must be >= start"),
    ('root ::= "a" )', "line 1"),
])
def test_parse_errors_name_the_problem(grammar: str, needle: str) -> None:
    with pytest.raises(GrammarError, match="^invalid grammar: ") as e:
        COMPILER.compile(request(grammar))
    assert needle in str(e.value)


def test_format_field() -> None:
    assert format_to_llguidance("null") is None and format_to_llguidance('""') is None
    assert COMPILER.compile(request(fmt=None)) is None and COMPILER.compile(request()) is None
    assert matches(constraint(fmt='"json"'), b'{"a": [true]}')
    assert not matches(constraint(fmt='"json"'), b"[1]")  # Ollama's "json" grammar wants an object
    for bad in ['"xml"', "123", "[1]", "{not json"]:
        with pytest.raises(GrammarError, match="format"):
            COMPILER.compile(request(fmt=bad))
    # a grammar wins over a format
    assert matches(constraint('root ::= "z"', fmt='"json"'), b"z")


def test_vocabulary_without_end_token_gives_ollamas_message() -> None:
    vocab = ByteVocab()
    vocab.eog_ids = frozenset()
    compiler = GrammarCompiler(vocab, vocab.n_vocab)
    for _ in range(2):  # and stays failed, without retrying the build
        with pytest.raises(GrammarError) as e:
            compiler.compile(request('root ::= "a"'))
        assert str(e.value) == VOCAB_ERROR
    assert compiler.compile(request()) is None  # a request without a grammar does not need the vocabulary


def test_dead_end_is_a_grammar_error() -> None:
    vocab = ByteVocab([bytes([i]) for i in range(32, 127) if i != ord("z")])  # no token can spell "z"
    c = constraint('root ::= "a" "z"', compiler=GrammarCompiler(vocab, vocab.n_vocab))
    c.accept(vocab.id(b"a"))
    with pytest.raises(GrammarError, match="dead end"):
        c.allowed()
    with pytest.raises(GrammarError, match="dead end"):
        c.sample(Sampler(SamplerParams(temperature=1.0, seed=1)), np.zeros(vocab.n_vocab, dtype=np.float32))


def _logits(favour: dict[int, float]) -> np.ndarray:
    row = np.zeros(VOCAB.n_vocab, dtype=np.float32)
    for t, v in favour.items():
        row[t] = v
    return row


def test_allowed_token_is_kept_as_sampled() -> None:
    """When the sampled token is allowed it is kept, and only one random number was drawn: over many steps the
    constrained sampler picks exactly what an unconstrained one with the same seed picks."""
    row = np.full(VOCAB.n_vocab, -np.inf, dtype=np.float32)
    row[32:127] = np.random.default_rng(0).normal(size=95).astype(np.float32) * 2  # printable ASCII only
    for seed in range(5):
        free = Sampler(SamplerParams(temperature=1.0, seed=seed))
        constrained = Sampler(SamplerParams(temperature=1.0, seed=seed))
        c = constraint("root ::= [ -~]*")
        assert [c.sample(constrained, row) for _ in range(40)] == [free.sample(row) for _ in range(40)]


def test_greedy_picks_the_best_allowed_token() -> None:
    row = _logits({ord("z"): 9.0, ord("b"): 5.0, ord("a"): 4.0, VOCAB.eos: 20.0})
    c = constraint('root ::= "a" | "b"')
    assert c.sample(Sampler(SamplerParams(temperature=0.0)), row) == ord("b")
    # the end token only once the grammar can end, then it wins
    assert c.sample(Sampler(SamplerParams(temperature=0.0)), row) == VOCAB.eos


def test_control_tokens_never_allowed() -> None:
    c = constraint(OLLAMA_JSON_GRAMMAR)
    assert not c.allows(VOCAB.ctl)
    mask = c.allowed()
    assert mask[ord("{")] and not mask[VOCAB.ctl] and not mask[VOCAB.eos] and not mask[ord("[")]


def test_constrained_distribution_is_the_renormalised_allowed_one() -> None:
    """Sample first, resample masked on rejection: P(t) = p(t) / P(allowed). Frequencies over 1500 seeded draws
    against the exact probabilities (a deterministic check: the seed fixes every draw)."""
    logits = {ord("a"): 1.0, ord("b"): 2.0, ord("c"): 0.5, ord("x"): 3.0, ord("y"): 2.5}
    row = np.full(VOCAB.n_vocab, -np.inf, dtype=np.float32)
    for t, v in logits.items():
        row[t] = v
    allowed = [ord("a"), ord("b"), ord("c")]
    p = np.exp([logits[t] for t in allowed])
    p /= p.sum()
    sampler = Sampler(SamplerParams(temperature=1.0, seed=1234))
    n = 1500
    counts = dict.fromkeys(allowed, 0)
    for _ in range(n):
        t = constraint("root ::= [abc]").sample(sampler, row)
        counts[t] += 1
    for t, pt in zip(allowed, p):
        assert abs(counts[t] / n - pt) < 4 * np.sqrt(pt * (1 - pt) / n), (chr(t), counts[t] / n, pt)


def test_seeded_constrained_sampling_is_reproducible() -> None:
    rng = np.random.default_rng(5)
    rows = [rng.normal(size=VOCAB.n_vocab).astype(np.float32) * 4 for _ in range(30)]

    def run() -> list[int]:
        c = constraint(OLLAMA_JSON_GRAMMAR)
        s = Sampler(SamplerParams(temperature=1.0, seed=42))
        out = []
        for r in rows:
            t = c.sample(s, r)
            out.append(t)
            if t == VOCAB.eos:
                break
        return out

    first = run()
    assert first == run() and len(first) > 3


def test_format_schema_as_llama_cpp_converts_it() -> None:
    """A schema given as `format` constrains as llama.cpp's converter would: only the listed properties (nested too,
    also for a property literally named "properties"), whitespace bounded like its `space` rule, and keywords it
    cannot enforce ignored rather than refused."""
    schema = {"type": "object", "required": ["a", "properties"],
              "properties": {"a": {"type": "integer", "description": "ignored"},
                             "properties": {"type": "object", "properties": {"b": {"type": "boolean"}},
                                            "required": ["b"]}}}
    fmt = json.dumps(schema)
    assert matches(constraint(fmt=fmt), b'{"a": 1, "properties": {"b": true}}')
    assert matches(constraint(fmt=fmt), b'{\n  "a": 1,\n  "properties": {"b": true}\n}')
    assert not matches(constraint(fmt=fmt), b'{"a": 1, "properties": {"b": true}, "c": 2}')
    assert not matches(constraint(fmt=fmt), b'{"a": 1, "properties": {"b": true, "c": 2}}')
    assert not matches(constraint(fmt=fmt), b'{' + b" " * 25 + b'"a": 1, "properties": {"b": true}}')
    open_schema = {**schema, "additionalProperties": True}
    assert matches(constraint(fmt=json.dumps(open_schema)), b'{"a": 1, "properties": {"b": true}, "c": 2}')
    assert matches(constraint(fmt=json.dumps({"type": "string", "format": "no-such-format"})), b'"x"')
