"""BPE pre-tokenizers: which regexes split text into words for each `tokenizer.ggml.pre` value.

A pre-tokenizer is a list of regexes applied in turn, as llama.cpp's unicode_regex_split does: each regex cuts
every current piece into its matches *and* the unmatched gaps between them (gaps are kept as pieces, not
dropped). The regexes are llama.cpp's adapted forms (explicit `'[sS]` instead of `(?i:'s)`, lookaheads instead of
`\\p{Lu}`-style classes), which behave the same on real text as llama.cpp's category-collapsed matching does.

One llama.cpp detail is reproduced on purpose: non-ASCII whitespace is seen by the regexes as a plain `\\s`
character (llama.cpp replaces it with U+000B), so a literal range such as `[\\u3000-\\u3002]` does not match
U+3000 IDEOGRAPHIC SPACE. Matching runs on such a view of each piece and the original text is cut at the same
offsets.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import regex

# --- llama.cpp's regexes (Python `regex` syntax) ---------------------------------------------------------------
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
JAIS2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
         r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}")
# cased letters of HF's deepseek-llm pre-tokenizer
_DEEPSEEK_LETTERS = (
    r"A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377"
    r"\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    r"\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    r"\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    r"\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    r"\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    r"\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    r"\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    r"\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    r"\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_CJK_HANGUL = r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK3_MAIN = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                   r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# "letters that are not a-z" / "not A-Z", written with lookaheads as llama.cpp does for tekken and gpt-4o
_UP = r"(?:(?=\p{L})[^a-z])"
_LO = r"(?:(?=\p{L})[^A-Z])"
_UPM = r"(?:(?=[\p{L}\p{M}])[^a-z])"
_LOM = r"(?:(?=[\p{L}\p{M}])[^A-Z])"
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*|\p{{N}}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*{_CONTRACTIONS}?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GRANITE_MULTI = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPM}*{_LOM}+{_CONTRACTIONS}?"
                 rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPM}+{_LOM}*{_CONTRACTIONS}?"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NEWLINE_RUNS = r"[^\n]+|\n+"


@dataclass(frozen=True, slots=True)
class PreTokenizerSpec:
    """How one `tokenizer.ggml.pre` family splits and treats words."""

    patterns: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is emitted whole
    add_bos: bool = False  # llama.cpp's default for add_bos_token when the metadata is silent
    byte_encode: bool = True  # GPT-2 byte alphabet; False: raw UTF-8 with <0xXX> byte tokens
    escape_whitespace: bool = False  # spaces become U+2581 before splitting (SentencePiece-style BPE)


_DEFAULT = PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_LLAMA3 = PreTokenizerSpec((LLAMA3,), ignore_merges=True, add_bos=True)
_STARCODER = PreTokenizerSpec((r"\p{N}", GPT2))
_GPT2 = PreTokenizerSpec((GPT2,))
_QWEN2 = PreTokenizerSpec((QWEN2,))
_DEEPSEEK3 = PreTokenizerSpec((r"\p{N}{1,3}", r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK3_MAIN))
_PORO = PreTokenizerSpec((r" ?[^(\s|.,!?…。，、।۔،)]+",))
_GEMMA4 = PreTokenizerSpec((NEWLINE_RUNS,), byte_encode=False, escape_whitespace=True)
_BAILING = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]|\s+(?!\S)|\s+")
_SEED_CODER = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)"
               r"|\s+")
_EXAONE_MOE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+")
_MINICPM5_MAIN = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                  r"|\s+(?!\S)|\s+")
# youtu's \p{Lu}/\p{Ll}-style classes mean "any letter or mark" in llama.cpp's category-collapsed matcher
_YOUTU = (r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
          rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]*[\p{{L}}\p{{M}}]+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+[\p{{L}}\p{{M}}]*{_CONTRACTIONS}?"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _spec_table() -> Mapping[str, PreTokenizerSpec]:
    groups: list[tuple[tuple[str, ...], PreTokenizerSpec]] = [
        (("default",), _DEFAULT),
        (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
          "jina-v5-nano"), _LLAMA3),
        (("dbrx", "smaug-bpe"), PreTokenizerSpec((LLAMA3,))),
        (("deepseek-llm",), PreTokenizerSpec((r"[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+",
                                              r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                                              r"\s+\Z", _CJK_HANGUL, r"\p{N}+"))),
        (("deepseek-coder",), PreTokenizerSpec((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"))),
        (("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _DEEPSEEK3),
        (("spark2_5",), PreTokenizerSpec((
            r"\p{N}{1,3}", r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
            r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
            r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"))),
        (("youtu",), PreTokenizerSpec(_YOUTU, ignore_merges=True)),
        (("falcon",), PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"))),
        (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
         _STARCODER),
        (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
          "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "jina-v1-en",
          "jina-v2-code", "roberta-bpe"), _GPT2),
        (("jais-2",), PreTokenizerSpec((JAIS2,))),
        (("gemma4", "granite-embed-multi-311m", "sarvam-moe"), _GEMMA4),
        (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "megrez", "hunyuan", "solar-open"),
         _QWEN2),
        (("qwen35",), PreTokenizerSpec((QWEN35,))),
        (("poro-chat", "bloom", "gpt3-finnish"), _PORO),
        (("viking",), PreTokenizerSpec((r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"))),
        (("chatglm-bpe",), PreTokenizerSpec((LLAMA3,))),
        (("glm4", "glm5"), PreTokenizerSpec((LLAMA3,), ignore_merges=True)),
        (("tekken",), PreTokenizerSpec((TEKKEN,), ignore_merges=True, add_bos=True)),
        (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), PreTokenizerSpec((GPT4O,))),
        (("granite-embed-multi-97m",), PreTokenizerSpec((GRANITE_MULTI,), ignore_merges=True)),
        (("bailingmoe", "bailingmoe2", "llada-moe"), PreTokenizerSpec((_BAILING,))),
        (("seed-coder",), PreTokenizerSpec((_SEED_CODER,))),
        (("ufakzeka",), PreTokenizerSpec((QWEN2.removeprefix(_CONTRACTIONS + "|"),))),
        (("grok-2",), _QWEN2),
        (("laguna",), PreTokenizerSpec((NEWLINE_RUNS, QWEN2))),
        (("exaone-moe",), PreTokenizerSpec((_EXAONE_MOE,))),
        (("minicpm5",), PreTokenizerSpec((r"\p{N}{1,3}", _MINICPM5_MAIN), ignore_merges=True)),
    ]
    return MappingProxyType({name: spec for names, spec in groups for name in names})


PRE_TOKENIZERS: Mapping[str, PreTokenizerSpec] = _spec_table()

# Non-ASCII White_Space characters: llama.cpp's regexes see them as U+000B.
_WIDE_SPACE = regex.compile(r"[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")


def spec_for(pre: str) -> PreTokenizerSpec:
    """The spec for a `tokenizer.ggml.pre` value ('' means llama.cpp's default); ValueError when unknown."""
    if not pre:
        return _DEFAULT
    try:
        return PRE_TOKENIZERS[pre]
    except KeyError:
        raise ValueError(f"unsupported BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre)") from None


class PreTokenizer:
    """Splits text into words with a spec's regexes."""

    def __init__(self, spec: PreTokenizerSpec) -> None:
        # one capture group around the whole regex: split() then returns gaps and matches interleaved
        self._patterns = tuple(regex.compile(f"({p})") for p in spec.patterns)

    def split(self, text: str) -> list[str]:
        """The words of `text`, covering it exactly."""
        view = _WIDE_SPACE.sub("\v", text) if _WIDE_SPACE.search(text) else text  # same length as text
        pieces = [view] if view else []
        for pattern in self._patterns:
            split = pattern.split
            out: list[str] = []
            extend = out.extend
            for piece in pieces:
                extend(filter(None, split(piece)))
            pieces = out
        if view is text:
            return pieces
        words = []
        pos = 0
        for piece in pieces:
            words.append(text[pos:pos + len(piece)])
            pos += len(piece)
        return words
