"""llama.cpp's tokenizer test pairs (models/ggml-vocab-*.gguf.inp/.out), reproduced exactly.

llama.cpp's test-tokenizer-0 reads the inputs separated by "\\n__ggml_vocab_test__\\n", keys them in a map (a
repeated input keeps its last expected output), and tokenizes each with add_special=false,
parse_special=false; every .out line is the expected ids separated by spaces.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
from test_tokenizer_gguf import read_metadata

from models.tokenizer import BpeTokenizer, SpmTokenizer, Tokenizer, WpmTokenizer, tokenizer_from_metadata

# every vocabulary that ships test pairs, with the implementation it must get
VOCABS: dict[str, type[Tokenizer]] = {
    "llama-spm": SpmTokenizer,
    "phi-3": SpmTokenizer,
    "llama-bpe": BpeTokenizer,
    "qwen2": BpeTokenizer,
    "qwen35": BpeTokenizer,
    "gpt-2": BpeTokenizer,
    "gemma-4": BpeTokenizer,
    "falcon": BpeTokenizer,
    "mpt": BpeTokenizer,
    "starcoder": BpeTokenizer,
    "deepseek-llm": BpeTokenizer,
    "deepseek-coder": BpeTokenizer,
    "command-r": BpeTokenizer,
    "refact": BpeTokenizer,
    "bert-bge": WpmTokenizer,
}

_SEPARATOR = "\n__ggml_vocab_test__\n"


def vocab_path(llama_cpp_dir: Path, name: str) -> Path:
    return llama_cpp_dir / "models" / f"ggml-vocab-{name}.gguf"


@functools.cache
def load_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer for a GGUF file, built once per session."""
    return tokenizer_from_metadata(read_metadata(path))


def read_pairs(path: Path) -> dict[str, list[int]]:
    """The (input, expected ids) pairs of a vocabulary file, as llama.cpp's test reads them."""
    raw = Path(f"{path}.inp").read_bytes().decode("utf-8")
    inputs: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(_SEPARATOR, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(_SEPARATOR)
    lines = Path(f"{path}.out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # getline() yields no line after the final newline
    assert len(inputs) == len(lines), f"{path.name}: {len(inputs)} inputs, {len(lines)} outputs"
    return {text: [int(t) for t in line.strip().split()] for text, line in zip(inputs, lines)}


def test_every_vocab_with_pairs_is_covered(llama_cpp_dir: Path) -> None:
    shipped = {p.name.removeprefix("ggml-vocab-").removesuffix(".gguf.inp")
               for p in (llama_cpp_dir / "models").glob("ggml-vocab-*.gguf.inp")}
    assert shipped == set(VOCABS)


@pytest.mark.parametrize("name", list(VOCABS))
def test_llama_cpp_pairs(llama_cpp_dir: Path, name: str) -> None:
    path = vocab_path(llama_cpp_dir, name)
    tok = load_tokenizer(path)
    assert type(tok) is VOCABS[name]
    pairs = read_pairs(path)
    assert len(pairs) >= 40
    failures = []
    for text, expected in pairs.items():
        got = tok.encode(text, add_special=False, parse_special=False)
        if got != expected:
            failures.append(f"{text!r}:\n  expected {expected}\n  got      {got}")
    assert not failures, f"{len(failures)}/{len(pairs)} pairs differ:\n" + "\n".join(failures)


@pytest.mark.parametrize("name", [n for n, kind in VOCABS.items() if kind is not WpmTokenizer])
def test_pairs_decode_back(llama_cpp_dir: Path, name: str) -> None:
    """The expected ids render back to the input (BPE and SentencePiece are lossless here)."""
    path = vocab_path(llama_cpp_dir, name)
    tok = load_tokenizer(path)
    for text, expected in read_pairs(path).items():
        assert tok.decode(expected) == text
