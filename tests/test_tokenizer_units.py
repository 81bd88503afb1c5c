"""Tokenizer behaviour on small hand-built vocabularies (no model files needed)."""
from __future__ import annotations

import numpy as np
import pytest

from models.tokenizer import BpeTokenizer, SpmTokenizer, Tokenizer, TokenType, WpmTokenizer, tokenizer_from_metadata
from models.tokenizer.byte_level import BYTE_TO_CHAR, decode_chars, encode_bytes
from models.tokenizer.merge import merge_symbols
from models.tokenizer.pretokenizers import PreTokenizer, spec_for

N, C, U, B, UNUSED = TokenType.NORMAL, TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.BYTE, TokenType.UNUSED


def bpe_meta(extra: list[tuple[str, int]], merges: list[str], **keys: object) -> dict[str, object]:
    """A byte-level BPE vocabulary: the 256 alphabet characters, then `extra` (text, type) tokens."""
    tokens = list(BYTE_TO_CHAR) + [t for t, _ in extra]
    types = [int(N)] * 256 + [int(t) for _, t in extra]
    meta: dict[str, object] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32), "tokenizer.ggml.merges": merges,
    }
    meta.update({f"tokenizer.ggml.{k}": v for k, v in keys.items()})
    return meta


def ids_of(tok: Tokenizer, *texts: str) -> list[int]:
    out = [tok.token_id(encode_bytes(t)) for t in texts]
    assert None not in out
    return [i for i in out if i is not None]


# --- factory and metadata ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["t5", "rwkv", "no_vocab", "plamo2"])
def test_unsupported_model(model: str) -> None:
    with pytest.raises(ValueError, match=f"unsupported tokenizer model '{model}'"):
        tokenizer_from_metadata({"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["a"]})


def test_missing_model_and_unknown_pre() -> None:
    with pytest.raises(ValueError, match="no tokenizer.ggml.model"):
        tokenizer_from_metadata({"tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="pre-tokenizer 'nonesuch'"):
        tokenizer_from_metadata(bpe_meta([], [], pre="nonesuch"))
    with pytest.raises(ValueError, match="merges"):
        meta = bpe_meta([], [])
        del meta["tokenizer.ggml.merges"]
        tokenizer_from_metadata(meta)


def test_eog_is_exactly_the_metadata_end_ids() -> None:
    extra = [(f"<t{i}>", C) for i in range(12)]
    tok = tokenizer_from_metadata(bpe_meta(extra, [], eos_token_id=np.uint32(256), eos_token_ids=[258, 259],
                                           eot_token_id=260, eom_token_id=999_999, bos_token_id=np.int64(261)))
    assert tok.eog_ids == frozenset({256, 258, 259, 260})  # the out-of-range eom is ignored
    assert tok.is_eog(259) and not tok.is_eog(0) and not tok.is_eog(257)
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (261, 256, 260)
    none = tokenizer_from_metadata(bpe_meta(extra, []))
    assert none.eog_ids == frozenset() and none.eos_id is None and not none.is_eog(0)


def test_add_bos_eos_flags() -> None:
    extra = [("<s>", C), ("</s>", C)]
    meta = bpe_meta(extra, [], bos_token_id=256, eos_token_id=257, add_bos_token=np.bool_(True),
                    add_eos_token=True)
    tok = tokenizer_from_metadata(meta)
    assert tok.add_bos and tok.add_eos
    assert tok.encode("a") == [256, *ids_of(tok, "a"), 257]
    assert tok.encode("a", add_special=False) == ids_of(tok, "a")
    assert tok.encode("") == [256, 257]
    # llama3-style pre-tokenizers add BOS unless the metadata says otherwise
    assert tokenizer_from_metadata(bpe_meta(extra, [], pre="llama-bpe", bos_token_id=256)).add_bos
    assert not tokenizer_from_metadata(bpe_meta(extra, [], pre="llama-bpe", bos_token_id=256,
                                                add_bos_token=False)).add_bos


# --- BPE -------------------------------------------------------------------------------------------------------
def test_merge_order_follows_rank() -> None:
    extra = [(encode_bytes("ab"), N), (encode_bytes("bc"), N)]
    first_bc = tokenizer_from_metadata(bpe_meta(extra, ["b c", "a b"]))
    first_ab = tokenizer_from_metadata(bpe_meta(extra, ["a b", "b c"]))
    assert isinstance(first_bc, BpeTokenizer) and isinstance(first_ab, BpeTokenizer)
    assert first_bc.encode("abc") == ids_of(first_bc, "a", "bc")
    assert first_ab.encode("abc") == ids_of(first_ab, "ab", "c")


def test_merge_ties_go_leftmost() -> None:
    rank = {("a", "a"): 0}
    assert merge_symbols("aaa", lambda left, right: rank.get((left, right))) == ["aa", "a"]
    assert merge_symbols("", lambda left, right: 0) == []
    assert merge_symbols("x", lambda left, right: 0) == ["x"]


def test_byte_level_alphabet_round_trip() -> None:
    assert len(set(BYTE_TO_CHAR)) == 256 and BYTE_TO_CHAR[ord(" ")] == "\u0120" and BYTE_TO_CHAR[ord("a")] == "a"
    text = "héllo \U0001F999\n\x00"
    assert decode_chars(encode_bytes(text)) == text.encode("utf-8")
    assert decode_chars("é\u4e2d") == "é".encode("latin-1") + "\u4e2d".encode("utf-8")  # non-alphabet kept


def test_user_defined_split_even_without_parse_special() -> None:
    extra = [("<ctrl>", C), ("<ud>", U)]
    tok = tokenizer_from_metadata(bpe_meta(extra, []))
    assert tok.encode("x<ud>y<ctrl>", parse_special=False) == [
        *ids_of(tok, "x"), 257, *ids_of(tok, "y", "<", "c", "t", "r", "l", ">")]
    assert tok.encode("x<ud>y<ctrl>") == ids_of(tok, "x") + [257] + ids_of(tok, "y") + [256]


def test_special_tokens_longest_first_not_leftmost() -> None:
    # llama.cpp cuts "bcd" (longer) before "ab", although "ab" starts earlier
    tok = tokenizer_from_metadata(bpe_meta([("ab", U), ("bcd", U)], []))
    assert tok.encode("abcd") == ids_of(tok, "a") + [257]
    assert tok.encode("abab") == [256, 256]


def test_special_prefix_inside_longer_token() -> None:
    # "<a" is a prefix of "<ab>"; where "<ab>" occurs it wins, elsewhere "<a" still splits
    tok = tokenizer_from_metadata(bpe_meta([("<a", U), ("<ab>", U)], []))
    assert tok.encode("<ab><a") == [257, 256]


def test_phi3_rstrip_after_special() -> None:
    meta = bpe_meta([("<|end|>", C), ("<x>", U), ("</s>", U)], [])
    meta["general.name"] = "Phi3"
    tok = tokenizer_from_metadata(meta)
    space = ids_of(tok, " ")
    assert tok.encode("a<|end|>  \n b") == ids_of(tok, "a") + [256] + ids_of(tok, "b")
    assert tok.encode("a <x>  b", parse_special=False) == ids_of(tok, "a") + space + [257] + ids_of(tok, "b")
    # "</s>" ends generation by name, so llama.cpp makes it CONTROL: plain text without parse_special
    assert 258 not in tok.encode("a</s>b", parse_special=False)
    meta["general.name"] = "other"
    plain = tokenizer_from_metadata(meta)
    assert plain.encode("a<x> b") == ids_of(tok, "a") + [257] + space + ids_of(tok, "b")


def test_end_markers_become_control() -> None:
    # a NORMAL-typed "<|im_end|>" is promoted to CONTROL, as llama.cpp does: hidden from parse_special=False
    tok = tokenizer_from_metadata(bpe_meta([("<|im_end|>", N)], []))
    assert tok.is_control(256)
    assert tok.encode("<|im_end|>") == [256]
    assert 256 not in tok.encode("<|im_end|>", parse_special=False)


def test_token_bytes_by_type() -> None:
    tok = tokenizer_from_metadata(bpe_meta([("<c>", C), ("<u>", U), ("<unused>", UNUSED)], []))
    assert tok.token_bytes(tok.token_id("\u0120") or 0) == b" "
    assert tok.token_bytes(256) == b"<c>" and tok.token_bytes(257) == b"<u>" and tok.token_bytes(258) == b""
    assert tok.decode([256, tok.token_id("a") or 0, 257], special=False) == "a<u>"
    with pytest.raises(ValueError):
        tok.token_bytes(10_000)


def test_lone_surrogates_do_not_crash() -> None:
    tok = tokenizer_from_metadata(bpe_meta([], []))
    assert tok.decode(tok.encode("a\ud800b\udfff")) == "a\ufffdb\ufffd"


def test_ignore_merges_emits_whole_word_tokens() -> None:
    extra = [(encode_bytes("hello"), N)]
    meta = bpe_meta(extra, [], pre="llama-bpe")
    assert tokenizer_from_metadata(meta).encode("hello", add_special=False) == [256]
    meta["tokenizer.ggml.pre"] = "qwen2"  # no ignore_merges: without merges the word stays in bytes
    assert len(tokenizer_from_metadata(meta).encode("hello", add_special=False)) == 5


def test_wide_whitespace_is_plain_whitespace_to_regexes() -> None:
    # deepseek-llm: its literal ranges [\u3000-\u3002] and [\u0800-\u4e00] must not match U+3000, which
    # llama.cpp's matcher sees as \s; matching it would keep the three characters together
    pre = PreTokenizer(spec_for("deepseek-llm"))
    assert pre.split("\u3001\u3000\u3001") == ["\u3001", "\u3000", "\u3001"]
    assert pre.split("ab  \n") == ["ab", "  ", "\n"]  # gaps between matches stay whole


def test_gpt2_pretokenizer_words() -> None:
    pre = PreTokenizer(spec_for("gpt-2"))
    assert pre.split("Hello world's  3.5!\n\n") == ["Hello", " world", "'s", " ", " 3", ".", "5", "!", "\n\n"]
    llama3 = PreTokenizer(spec_for("llama3"))
    assert llama3.split("I'VE 12345 ok\n\n x") == ["I", "'VE", " ", "123", "45", " ok", "\n\n", " x"]


# --- SentencePiece ---------------------------------------------------------------------------------------------
def spm_meta(pieces: list[tuple[str, float, int]], **keys: object) -> dict[str, object]:
    base = [("<unk>", 0.0, TokenType.UNKNOWN), ("<s>", 0.0, C), ("</s>", 0.0, C)]
    base += [(f"<0x{b:02X}>", 0.0, B) for b in range(256)]
    allp = base + pieces
    meta: dict[str, object] = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [p for p, _, _ in allp],
        "tokenizer.ggml.scores": np.array([s for _, s, _ in allp], dtype=np.float32),
        "tokenizer.ggml.token_type": [int(t) for _, _, t in allp],
    }
    meta.update({f"tokenizer.ggml.{k}": v for k, v in keys.items()})
    return meta


def test_gemma_end_of_turn_default() -> None:
    """Ollama's gemma3/gemma4 add eot_token_id (default 106) to the end set; only where 106 is `<end_of_turn>`."""
    def meta(arch: str, text: str, **keys: object) -> dict[str, object]:
        # 3 specials + 256 bytes come first, so pad the pieces until index 106 falls among them by token text
        m = spm_meta([], eos_token_id=1, **keys)
        tokens = list(m["tokenizer.ggml.tokens"])  # type: ignore[call-overload]
        tokens[106] = text
        m["tokenizer.ggml.tokens"] = tokens
        m["general.architecture"] = arch
        return m

    assert tokenizer_from_metadata(meta("gemma3", "<end_of_turn>")).eog_ids == frozenset({1, 106})
    assert tokenizer_from_metadata(meta("gemma4", "<end_of_turn>")).eog_ids == frozenset({1, 106})
    assert tokenizer_from_metadata(meta("gemma3", "<0x67>")).eog_ids == frozenset({1})  # another token at 106
    assert tokenizer_from_metadata(meta("llama", "<end_of_turn>")).eog_ids == frozenset({1})  # other models: no
    assert tokenizer_from_metadata(meta("gemma3", "<end_of_turn>", eot_token_id=2)).eog_ids == frozenset({1, 2})


def test_spm_scores_space_prefix_and_byte_fallback() -> None:
    pieces = [("\u2581", -1.0, N), ("a", -1.0, N), ("b", -1.0, N), ("\u2581a", -0.5, N), ("ab", -0.1, N),
              ("\u2581ab", -5.0, N)]
    tok = tokenizer_from_metadata(spm_meta(pieces, eos_token_id=2))
    assert isinstance(tok, SpmTokenizer)
    ids = {p: tok.token_id(p) for p, _, _ in pieces}
    # "ab" (score -0.1) merges before "\u2581a" (-0.5); "\u2581ab" is then reachable from "\u2581"+"ab"
    assert tok.encode("ab") == [1, ids["\u2581ab"]]
    assert tok.encode("ab", add_special=False) == [ids["\u2581ab"]]
    # a character with no piece falls back to its UTF-8 bytes
    assert tok.encode("é", add_special=False) == [ids["\u2581"], 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode("é ab", add_special=False)) == "é ab"
    # the space prefix is added again after a special token
    assert tok.encode("a<s>a", add_special=False) == [ids["\u2581a"], 1, ids["\u2581a"]]
    # defaults: BOS 1, add_bos, no EOS unless the metadata names one
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    assert tokenizer_from_metadata(spm_meta(pieces)).eog_ids == frozenset()


def test_spm_without_space_prefix() -> None:
    pieces = [("\u2581", -1.0, N), ("a", -1.0, N), ("\u2581a", -0.5, N)]
    tok = tokenizer_from_metadata(spm_meta(pieces, add_space_prefix=False))
    assert tok.encode("a a", add_special=False) == [tok.token_id("a"), tok.token_id("\u2581a")]
    assert tok.decode(tok.encode(" a", add_special=False)) == " a"


# --- WordPiece -------------------------------------------------------------------------------------------------
def wpm_meta(tokens: list[str], **keys: object) -> dict[str, object]:
    meta: dict[str, object] = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": tokens}
    meta.update({f"tokenizer.ggml.{k}": v for k, v in keys.items()})
    return meta


@pytest.mark.parametrize("style", ["hash", "phantom"])
def test_wordpiece(style: str) -> None:
    words = ["play", "##ing", "##ed", ",", "hello", "cafe", "\u4e2d"]
    if style == "phantom":  # llama.cpp's converted spelling
        words = [w[2:] if w.startswith("##") else "\u2581" + w for w in words]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words]
    tok = tokenizer_from_metadata(wpm_meta(tokens, unknown_token_id=1, cls_token_id=2, seperator_token_id=3))
    assert isinstance(tok, WpmTokenizer)
    assert (tok.cls_id, tok.sep_id, tok.bos_id) == (2, 3, 2)
    # lower-cased, accents stripped, punctuation and CJK split off, unknown words -> [UNK]
    assert tok.encode("Playing, HELLO Café\u4e2dxyz!") == [2, 4, 5, 7, 8, 9, 10, 1, 1, 3]
    assert tok.encode("played", add_special=False) == [4, 6]
    assert tok.decode([4, 5, 7, 8]) == " playing , hello"


def test_wordpiece_defaults() -> None:
    tokens = [f"[unused{i}]" for i in range(110)]
    tokens[100:104] = ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens.append("\u2581hi")
    tok = tokenizer_from_metadata(wpm_meta(tokens, token_type=[int(C)] * 110 + [int(N)]))
    assert (tok.cls_id, tok.sep_id, tok.unk_id, tok.bos_id) == (101, 102, 100, 101)
    assert tok.add_bos and not tok.add_eos
    assert tok.encode("hi there") == [101, 110, 100, 102]
    assert tok.encode("[CLS] hi", add_special=False) == [101, 110]
    assert tok.encode("[CLS] hi", add_special=False, parse_special=False) == [100, 100, 100, 110]


def test_wordpiece_keeps_case_when_told() -> None:
    tokens = ["[UNK]", "[CLS]", "[SEP]", "\u2581Hello", "\u2581hello"]
    meta = wpm_meta(tokens, unknown_token_id=0, cls_token_id=1, seperator_token_id=2)
    assert tokenizer_from_metadata(meta).encode("Hello", add_special=False) == [4]
    meta["tokenizer.ggml.normalizer.lowercase"] = False
    assert tokenizer_from_metadata(meta).encode("Hello", add_special=False) == [3]


# --- special-token splitting against a direct transcription of llama.cpp's algorithm ----------------------------
def reference_split(text: str, specials: list[tuple[int, str, bool, bool]]) -> list[str | int]:
    """llama.cpp's st_partition, literally: every special token in turn (longest first), re-splitting the list."""
    seen: dict[str, tuple[int, bool, bool]] = {}
    for token_id, special, lstrip, rstrip in sorted(specials):
        seen.setdefault(special, (token_id, lstrip, rstrip))
    order = sorted(seen.items(), key=lambda kv: (-len(kv[0].encode()), kv[1][0]))
    fragments: list[str | int] = [text] if text else []
    for special, (token_id, lstrip, rstrip) in order:
        out: list[str | int] = []
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                continue
            base, length = 0, len(frag)
            while True:
                hit = frag[:base + length].find(special, base)
                if hit < 0:
                    out.append(frag[base:base + length]) if length else None
                    break
                left_len = hit - base
                if lstrip:
                    while left_len > 0 and frag[base + left_len - 1] in " \t\n\v\f\r":
                        left_len -= 1
                if left_len > 0:
                    out.append(frag[base:base + left_len])
                out.append(token_id)
                if hit + len(special) < base + length:
                    right = hit + len(special)
                    right_len = length - (hit - base) - len(special)
                    if rstrip:
                        while right_len > 0 and frag[right] in " \t\n\v\f\r":
                            right += 1
                            right_len -= 1
                    base, length = right, right_len
                else:
                    break
        fragments = out
    return fragments


def test_special_splitter_matches_reference() -> None:
    from models.tokenizer.attrs import TokenAttr
    from models.tokenizer.special import SpecialSplitter

    rng = np.random.default_rng(7)
    alphabet = list("ab< \n")
    for case in range(3000):
        n_special = int(rng.integers(1, 7))
        specials = []
        tokens: list[str] = []
        attrs: list[int] = []
        for i in range(n_special):
            text = "".join(rng.choice(alphabet, int(rng.integers(1, 5))))
            lstrip, rstrip = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
            tokens.append(text)
            attrs.append(int(TokenAttr.USER_DEFINED) | (int(TokenAttr.LSTRIP) if lstrip else 0)
                         | (int(TokenAttr.RSTRIP) if rstrip else 0))
            specials.append((i, text, lstrip, rstrip))
        splitter = SpecialSplitter(tokens, attrs, range(n_special))
        for _ in range(5):
            text = "".join(rng.choice(alphabet, int(rng.integers(0, 25))))
            assert splitter.split(text, parse_special=False) == reference_split(text, specials), (case, text, tokens)


def naive_merge(word: str, priority: dict[str, float]) -> list[str]:
    """Repeatedly merge the best adjacent pair (leftmost on ties) until none may merge."""
    symbols = list(word)
    while True:
        best = None
        for i in range(len(symbols) - 1):
            p = priority.get(symbols[i] + symbols[i + 1])
            if p is not None and (best is None or p < best[0]):
                best = (p, i)
        if best is None:
            return symbols
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]


def test_merge_engine_matches_naive_loop() -> None:
    rng = np.random.default_rng(11)
    for _ in range(500):
        pieces = {"".join(rng.choice(list("abc"), int(rng.integers(2, 5)))) for _ in range(int(rng.integers(1, 12)))}
        priority = {p: float(rng.integers(0, 4)) for p in pieces}  # few distinct values: many ties
        word = "".join(rng.choice(list("abc"), int(rng.integers(0, 20))))
        got = merge_symbols(word, lambda left, right: priority.get(left + right))
        assert got == naive_merge(word, priority), (word, priority)


def test_spm_chunking_changes_nothing() -> None:
    # pieces spanning "X\u2581" (like Gemma's ">\u2581</") must keep their text together
    rng = np.random.default_rng(5)
    alphabet = list("ab>\u2581")
    for case in range(60):
        pieces = {"".join(rng.choice(alphabet, int(rng.integers(1, 5)))) for _ in range(40)}
        pieces |= set(alphabet)
        scored = [(p, float(rng.normal()), N) for p in sorted(pieces)]
        tok = tokenizer_from_metadata(spm_meta(scored, add_space_prefix=False))
        score = {p: s for p, s, _ in scored}
        for _ in range(10):
            text = "".join(rng.choice(list("ab> "), int(rng.integers(0, 30))))
            whole = naive_merge(text.replace(" ", "\u2581"), {p: -s for p, s in score.items()})
            assert tok.encode(text, add_special=False) == [tok.token_id(p) for p in whole], (case, text)
