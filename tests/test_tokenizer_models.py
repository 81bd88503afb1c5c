"""Tokenizers of the real models the runner serves (SmolLM2: byte-level BPE, Gemma 3: SentencePiece)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_tokenizer_gguf import read_metadata
from test_tokenizer_vocab import load_tokenizer

from models.tokenizer import BpeTokenizer, SpmTokenizer, TokenType, tokenizer_from_metadata

PROMPT = "The capital of France is"


def test_smollm2_prompt(smollm2_path: Path) -> None:
    meta = read_metadata(smollm2_path)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    tok = load_tokenizer(smollm2_path)
    assert isinstance(tok, BpeTokenizer)
    assert not tok.add_bos and not tok.add_eos
    assert tok.encode(PROMPT) == [504, 3575, 282, 4649, 314]
    assert tok.encode(PROMPT, add_special=False) == [504, 3575, 282, 4649, 314]
    assert tok.decode([504, 3575, 282, 4649, 314]) == PROMPT


def test_smollm2_chat_markup(smollm2_path: Path) -> None:
    tok = load_tokenizer(smollm2_path)
    text = "<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.encode(text)
    assert ids == [1, 4093, 198, 26843, 2, 198]
    assert [tok.token_bytes(i) for i in ids] == [b"<|im_start|>", b"user", b"\n", b"Hi", b"<|im_end|>", b"\n"]
    assert tok.decode(ids) == text
    assert tok.decode(ids, special=False) == "user\nHi\n"
    # without parse_special the markers are plain text
    plain = tok.encode(text, parse_special=False)
    assert 1 not in plain and 2 not in plain
    assert tok.decode(plain) == text


def test_smollm2_eog(smollm2_path: Path) -> None:
    tok = load_tokenizer(smollm2_path)
    assert tok.eos_id == 2 and tok.token_text(2) == "<|im_end|>"
    assert tok.eog_ids == frozenset({2})
    assert tok.is_eog(2)
    assert not tok.is_eog(0)  # "<|endoftext|>" is not the metadata's eos, so it does not end generation here
    assert tok.bos_id == 1


def test_gemma3_prompt(gemma3_path: Path) -> None:
    tok = load_tokenizer(gemma3_path)
    assert isinstance(tok, SpmTokenizer)
    assert tok.add_bos and not tok.add_eos
    assert tok.encode(PROMPT) == [2, 818, 5279, 529, 7001, 563]
    assert tok.encode(PROMPT, add_special=False) == [818, 5279, 529, 7001, 563]
    assert tok.decode([818, 5279, 529, 7001, 563]) == PROMPT


def test_gemma3_chat_markup(gemma3_path: Path) -> None:
    tok = load_tokenizer(gemma3_path)
    text = "<start_of_turn>user\nHi<end_of_turn>\n"
    ids = tok.encode(text, add_special=False)
    assert ids == [105, 2364, 107, 10979, 106, 107]
    assert tok.decode(ids) == text
    # "\n" is a user-defined token: cut out even when control tokens are not parsed
    assert tok.token_type[107] == TokenType.USER_DEFINED
    assert tok.encode("a\nb", add_special=False, parse_special=False) == tok.encode("a\nb", add_special=False)


def test_gemma3_eog(gemma3_path: Path) -> None:
    tok = load_tokenizer(gemma3_path)
    assert (tok.bos_id, tok.eos_id) == (2, 1)
    # this file has eos_token_id only (no eot/eom/eos_token_ids); Ollama's gemma3 model adds eot_token_id with
    # its default 106, `<end_of_turn>`, so a chat turn ends there without a stop string
    assert tok.eog_ids == frozenset({1, 106})
    assert tok.is_eog(106) and tok.token_text(106) == "<end_of_turn>"
    assert not tok.is_eog(0)


def test_gemma3_byte_fallback(gemma3_path: Path) -> None:
    tok = load_tokenizer(gemma3_path)
    text = "\x01\x02 tab\there \U0001F999 \u0378"  # control bytes, an emoji, an unassigned code point
    ids = tok.encode(text, add_special=False)
    assert tok.decode(ids) == text
    byte_ids = [i for i in ids if tok.token_type[i] == TokenType.BYTE]
    assert byte_ids, "expected <0xXX> fallback tokens"
    assert all(len(tok.token_bytes(i)) == 1 for i in byte_ids)


def test_metadata_arrays_as_lists_or_numpy(smollm2_path: Path) -> None:
    """Readers hand arrays over as numpy (ours) or lists (GGUFReader.contents()); both must work."""
    meta = dict(read_metadata(smollm2_path))
    as_lists = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in meta.items()}
    assert isinstance(as_lists["tokenizer.ggml.token_type"], list)
    tok = tokenizer_from_metadata(as_lists)
    assert tok.encode(PROMPT) == [504, 3575, 282, 4649, 314]
    assert tok.token_type.dtype == np.int32 and tok.token_type[0] == TokenType.CONTROL


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_long_prompt_throughput(which: str, request: pytest.FixtureRequest) -> None:
    """A long, varied prompt tokenizes without pathologies and round-trips (cold word cache)."""
    import time

    path: Path = request.getfixturevalue(f"{which}_path")
    tok = tokenizer_from_metadata(read_metadata(path))  # fresh instance: empty caches
    words = ["alpha", "Beta", "γάμμα", "дельта", "東京", "😀", "x1234", "foo_bar()", "\n", "  ", "don't", "§"]
    rng = np.random.default_rng(0)
    text = " ".join(words[i] for i in rng.integers(0, len(words), 20_000))
    start = time.perf_counter()
    ids = tok.encode(text, add_special=False)
    elapsed = time.perf_counter() - start
    assert tok.decode(ids) == text
    assert elapsed < 10.0, f"{len(text)} chars took {elapsed:.1f}s"
