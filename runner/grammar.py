"""Grammar-constrained sampling (structured outputs) on top of `llguidance`.

A request's `grammar` (llama.cpp GBNF, as Ollama's server sends it) or, when that is empty, its `format` (`"json"`
or a JSON schema object) becomes one `Constraint` per sequence. Sampling follows Ollama (runner-protocol.md §4.11):
sample unconstrained first; if the grammar accepts the token, keep it (most steps); otherwise mask the disallowed
tokens to -inf and sample again, consuming a second random number. Keeping an allowed token and resampling from the
renormalised allowed set on rejection draws from the same distribution as masking up front, at a fraction of the
cost. End-of-generation tokens are allowed exactly where the grammar can end.

Why llguidance: a maintained Rust engine (PyPI abi3 wheels) that parses GBNF (via its GBNF-to-Lark converter) and
JSON schema, works on raw token bytes (so tokens that split a UTF-8 character are handled), and computes a
vocabulary mask in tens to hundreds of microseconds: measured in bench/grammar.py.
"""
from __future__ import annotations

import json
import re
import threading
from typing import Any, Final

import llguidance
import numpy as np
import numpy.typing as npt
from llguidance.gbnf_to_lark import gbnf_to_lark

from runner.errors import GrammarError
from runner.protocol import CompletionRequest
from runner.sampling import Sampler

# Ollama server's fixed grammar for `format: "json"` (llm/server.go grammarJSON, v0.6.7+ whitespace rules); the
# wire input a real server sends, so a runner that is given `format` alone converts to exactly this.
OLLAMA_JSON_GRAMMAR = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::=
  "{" ws (
         string ":" ws value
    ("," ws string ":" ws value)*
  )? ws "}"
array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? ws "]"
string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]) # escapes
  )* "\""
number ::= ("-"? ([0-9] | [1-9] [0-9]*)) ("." [0-9]+)? ([eE] [-+]? [0-9]+)?
# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= ([ \t\n] ws)?
'''

VOCAB_ERROR = "failed to load model vocabulary required for format"  # Ollama's wording
_SPECIAL_PREFIX = b"\xff"  # llguidance's marker for tokens that text can never produce


_ESCAPE = re.compile(r"\\\\|\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})")


def _unicode_escape(m: re.Match[str]) -> str:
    code = m.group(1) or m.group(2)
    if code is None:  # an escaped backslash: keep, so that "\\u0041" stays a backslash and text
        return m.group(0)
    cp = int(code, 16)
    if cp < 0x80:
        return f"\\x{cp:02x}"
    if 0xD800 <= cp < 0xE000 or cp > 0x10FFFF:
        return m.group(0)  # not a character: the converter reports it
    return chr(cp)  # non-ASCII characters are never GBNF syntax, so the character itself is equivalent


def _name_spans(gbnf: str) -> list[tuple[int, int]]:
    """Where the rule names (definitions and references) are: every word outside literals, classes, repetition
    counts and comments."""
    spans, i, n = [], 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in "\"[{":
            close = {"\"": "\"", "[": "]", "{": "}"}[c]
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
            i += 1
        elif c == "#":
            while i < n and gbnf[i] not in "\r\n":
                i += 1
        elif c.isalnum() or c in "-_":
            j = i
            while j < n and (gbnf[j].isalnum() or gbnf[j] in "-_"):
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    return spans


def _lark_name(name: str) -> str:
    # how llguidance's converter renames a rule (case aside: terminals get upper case, the others lower)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name.replace("-", "_")).lower()


def _rename_clashing_rules(gbnf: str) -> str:
    """The converter renames `root` to `start`, `-` to `_` and camelCase to snake_case, and fails when two rules
    meet (a JSON schema property named `start`, or `first-name` next to `firstName`): give such rules fresh
    names first."""
    spans = _name_spans(gbnf)
    names = {gbnf[a:b] for a, b in spans}
    taken: dict[str, str] = {}
    rename: dict[str, str] = {}
    for name in sorted(names, key=lambda x: (x != "root", x)):
        key = "start" if name == "root" else _lark_name(name)
        if key in taken:
            k = 0
            while f"r{k}-{name}" in names or _lark_name(f"r{k}-{name}") in taken:
                k += 1
            rename[name] = f"r{k}-{name}"
            key = _lark_name(rename[name])
        taken[key] = name
    if not rename:
        return gbnf
    out, last = [], 0
    for a, b in spans:
        out.append(gbnf[last:a])
        out.append(rename.get(gbnf[a:b], gbnf[a:b]))
        last = b
    out.append(gbnf[last:])
    return "".join(out)


def gbnf_to_llguidance(gbnf: str) -> str:
    """The llguidance grammar for a llama.cpp GBNF text (not yet checked against a vocabulary).

    llguidance's GBNF converter writes `\\u00e9` as `\\ue9`, which its own parser then refuses, so \\u and \\U
    escapes are rewritten first to `\\xHH` (ASCII) or the character itself. The text is always taken as GBNF (the
    converter's own sniffing would read a GBNF rule named `start` as Lark).

    Raises:
        GrammarError: the text does not parse; the message names the position or the rule.
    """
    try:
        lark = gbnf_to_lark(_rename_clashing_rules(_ESCAPE.sub(_unicode_escape, gbnf)))
    except Exception as e:  # the converter raises plain Exception for a missing rule or root
        raise GrammarError(f"invalid grammar: {e}") from e
    return str(llguidance.LLMatcher.grammar_from_lark(lark))


# What llama.cpp's schema converter (Ollama's server) does differently from llguidance's defaults: whitespace is its
# bounded `space` rule rather than any run, and keywords it cannot enforce are ignored rather than refused.
_AS_LLAMA_CPP: Final[Any] = {"whitespace_pattern": r"( |\n{1,2}[ \t]{0,20})?", "lenient": True}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def _closed_objects(schema: Any) -> Any:
    """A copy of `schema` where an object with `properties` and no `additionalProperties` allows no other keys:
    llama.cpp's converter generates only the listed properties (JSON Schema itself would allow any)."""
    if isinstance(schema, list):
        return [_closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _closed_objects(v) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS + _SCHEMA_ONE:
        if key in out:
            out[key] = _closed_objects(out[key])
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def format_to_llguidance(fmt: str) -> str | None:
    """The llguidance grammar for a request's `format` (its compact JSON text): `"json"` -> Ollama's JSON grammar,
    a JSON object -> that schema, `""`/null -> None (no constraint), as Ollama's server converts it.

    Raises:
        GrammarError: anything else.
    """
    try:
        value = json.loads(fmt)
    except ValueError as e:
        raise GrammarError(f"invalid format: {fmt!r}; expected \"json\" or a valid JSON Schema") from e
    if value is None or value == "":
        return None
    if value == "json":
        return gbnf_to_llguidance(OLLAMA_JSON_GRAMMAR)
    if isinstance(value, dict):
        try:
            return str(llguidance.LLMatcher.grammar_from_json_schema(_closed_objects(value), overrides=_AS_LLAMA_CPP))
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from e
    raise GrammarError(f"invalid format: {fmt!r}; expected \"json\" or a valid JSON Schema")


class _VocabView:
    """What llguidance's TokenizerWrapper reads: every token's bytes, the end tokens, and a text encoder."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        eog = sorted(int(t) for t in tokenizer.eog_ids)
        if not eog or tokenizer.n_vocab <= 0:
            raise ValueError("the vocabulary has no end-of-generation token")
        self.eos_token_id = eog[0]
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.n_vocab) if tokenizer.is_control(i)]
        tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.n_vocab)]
        for i in set(self.special_token_ids) | set(eog):  # they render as their name, never as constrained text
            tokens[i] = _SPECIAL_PREFIX + tokens[i]
        tokens += [b""] * (n_vocab - len(tokens))  # rows wider than the vocabulary: padding, never allowed
        self.tokens = tokens
        self.eog = eog
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        return list(self._tokenizer.encode(text.decode("utf-8", errors="replace"), add_special=False,
                                           parse_special=False))


class Constraint:
    """One sequence's grammar state: which tokens may come next, advanced by each accepted token."""

    def __init__(self, matcher: Any, n_vocab: int, eog: frozenset[int]) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab
        self._eog = eog
        self._bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (no state change)."""
        if token in self._eog:  # llguidance's validate_tokens never counts an end token
            return bool(self._matcher.is_accepting())
        return bool(self._matcher.validate_tokens([int(token)]) == 1)

    def allowed(self) -> npt.NDArray[np.bool_]:
        """Mask over the vocabulary of the tokens that may come next.

        Raises:
            GrammarError: the grammar is in an error state or allows no token at all (a dead end).
        """
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        mask: npt.NDArray[np.bool_] = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[
            :self._n_vocab].astype(np.bool_)
        if self._matcher.is_error() or not mask.any():
            detail = (self._matcher.get_error() or str(self._matcher.stop_reason())).strip().splitlines()[0]
            raise GrammarError(f"grammar dead end: no token of the vocabulary can continue the text ({detail})")
        return mask

    def accept(self, token: int) -> None:
        """Advance the grammar over a chosen token.

        Raises:
            GrammarError: the token is not allowed here.
        """
        if not self._matcher.consume_token(int(token)):
            raise GrammarError(f"grammar rejected token {token}: {self._matcher.get_error()}")

    def sample(self, sampler: Sampler, row: npt.NDArray[Any]) -> int:
        """Pick and accept the next token under the grammar: sample, keep an allowed token, else resample from the
        allowed tokens only.

        Raises:
            GrammarError: a dead end (no allowed token).
            SamplingError: from the sampler.
        """
        token = sampler.sample(row)
        if not self.allows(token):
            masked = np.where(self.allowed(), np.asarray(row, dtype=np.float32).reshape(-1), np.float32(-np.inf))
            token = sampler.sample(masked)
        self.accept(token)
        return token


class GrammarCompiler:
    """Builds per-sequence constraints over one engine's vocabulary. The llguidance view of the vocabulary costs
    ~0.5 s (SmolLM2) to ~3 s (Gemma 3's 262k tokens), so it is built once, on the first constrained request.
    Thread-safe: requests compile on the HTTP worker threads, off the batch loop."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        self._tokenizer = tokenizer
        self._n_vocab = n_vocab
        self._lock = threading.Lock()
        self._lltok: Any = None
        self._eog: frozenset[int] = frozenset()
        self._failed = False
        self._limits = llguidance.LLParserLimits(verbose_errors=False)  # errors without the state dump

    def _vocabulary(self) -> Any:
        with self._lock:
            if self._lltok is None and not self._failed:
                try:
                    view = _VocabView(self._tokenizer, self._n_vocab)
                    self._lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(view), n_vocab=self._n_vocab,
                                                         eos_token=view.eog)
                    self._eog = frozenset(view.eog)
                except Exception as e:
                    self._failed = True
                    raise GrammarError(VOCAB_ERROR) from e
            if self._lltok is None:
                raise GrammarError(VOCAB_ERROR)
            return self._lltok

    def source(self, request: CompletionRequest) -> str | None:
        """The llguidance grammar a request asks for: its GBNF `grammar`, else its `format`, else None."""
        if request.grammar:
            return gbnf_to_llguidance(request.grammar)
        if request.format:
            return format_to_llguidance(request.format)
        return None

    def compile(self, request: CompletionRequest) -> Constraint | None:
        """A fresh constraint for `request`, or None when it asks for none.

        Raises:
            GrammarError: the grammar or format is invalid (message names the problem), or the model's vocabulary
                cannot back a grammar (Ollama's message).
        """
        grammar = self.source(request)
        if grammar is None:
            return None
        lltok = self._vocabulary()
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise GrammarError(f"invalid grammar: {matcher.get_error().strip()}")
        return Constraint(matcher, self._n_vocab, self._eog)
