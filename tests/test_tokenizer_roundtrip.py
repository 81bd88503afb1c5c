"""encode -> decode is the identity on arbitrary Unicode for byte-level BPE and byte-fallback SentencePiece."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_tokenizer_vocab import load_tokenizer, vocab_path

from models.tokenizer import Tokenizer

# pools to draw characters from: each string mixes several
_POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    " \t\n\r  \n\n   ",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "àéîõüçñßøåæÀÉÎÕÜÇÑ",  # precomposed Latin
    "e\u0301a\u0308o\u0303\u0300\u0327\u20dd",  # combining marks, alone and after letters
    "日本語中文字漢字東京한국어",  # CJK, Hangul
    "нещо на Български ελληνικά עברית العربية हिन्दी ไทย",  # other scripts
    "\U0001F600\U0001F999\U0001F680\u2705\U0001F1EB\U0001F1F7\U0001F469\u200d\U0001F4BB\u2764\ufe0f",  # emoji, ZWJ
    "\x00\x01\x07\x1b\x7f\x85\u200b\u200e\ufeff\u2028",  # control, format and separator characters
    "\u3000\u00a0\u2003\u205f",  # non-ASCII spaces
    "\U00010348\U0001D11E\U0002070E\uFFFD\uE000\u0378",  # astral, replacement char, private use, unassigned
]


def random_texts(seed: int, count: int, exclude: str = "") -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        pools = rng.sample(_POOLS, rng.randint(1, 4))
        chars = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 40))]
        texts.append("".join(c for c in chars if c not in exclude))
    return texts


def assert_round_trip(tok: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        ids = tok.encode(text, add_special=False, parse_special=False)
        assert tok.decode(ids) == text, (text, ids)
        assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8") in (text, " " + text)


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "qwen35", "gpt-2", "falcon", "deepseek-llm", "command-r",
                                  "starcoder", "mpt"])
def test_byte_level_bpe_round_trip(llama_cpp_dir: Path, name: str) -> None:
    assert_round_trip(load_tokenizer(vocab_path(llama_cpp_dir, name)), random_texts(1, 150))


@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "gemma-4"])
def test_byte_fallback_round_trip(llama_cpp_dir: Path, name: str) -> None:
    # U+2581 is how these vocabularies spell a space, so a literal one cannot survive the trip
    assert_round_trip(load_tokenizer(vocab_path(llama_cpp_dir, name)), random_texts(2, 150, exclude="\u2581"))


def test_gemma3_round_trip(gemma3_path: Path) -> None:
    assert_round_trip(load_tokenizer(gemma3_path), random_texts(3, 150, exclude="\u2581"))


def test_smollm2_round_trip(smollm2_path: Path) -> None:
    assert_round_trip(load_tokenizer(smollm2_path), random_texts(4, 150))
