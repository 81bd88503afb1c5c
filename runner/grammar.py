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
import threading
from typing import Any

import llguidance
import numpy as np
import numpy.typing as npt
from llguidance.gbnf_to_lark import any_to_lark

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


def gbnf_to_llguidance(gbnf: str) -> str:
    """The llguidance grammar for a llama.cpp GBNF text (not yet checked against a vocabulary).

    Raises:
        GrammarError: the text does not parse; the message names the position or the rule.
    """
    try:
        lark = any_to_lark(gbnf)
    except Exception as e:  # the converter raises plain Exception for a missing rule or root
        raise GrammarError(f"invalid grammar: {e}") from e
    return str(llguidance.LLMatcher.grammar_from_lark(lark))


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
            return str(llguidance.LLMatcher.grammar_from_json_schema(value))
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
        special = set(self.special_token_ids) - set(eog)
        tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.n_vocab)]
        for i in special:  # control tokens render as their name but are never part of constrained text
            tokens[i] = _SPECIAL_PREFIX + tokens[i]
        for i in eog:
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

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab
        self._bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (no state change)."""
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
            detail = self._matcher.get_error() or "no token can continue the text"
            raise GrammarError(f"grammar dead end: {detail}")
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
        self._failed = False

    def _vocabulary(self) -> Any:
        with self._lock:
            if self._lltok is None and not self._failed:
                try:
                    view = _VocabView(self._tokenizer, self._n_vocab)
                    self._lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(view), n_vocab=self._n_vocab,
                                                         eos_token=view.eog)
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
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid grammar: {matcher.get_error().strip()}")
        return Constraint(matcher, self._n_vocab)
