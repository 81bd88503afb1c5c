"""Request side of the llama-server mode: turn `/completion`, `/v1/completions` and `/v1/chat/completions` bodies
into the engine's CompletionRequest.

Defaults are llama-server's (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, repeat_last_n 64, repeat_penalty
1.0, n_predict -1 = unlimited, cache_prompt true). A wrong JSON type for a known field is a 400, as llama-server's
json_value() would reject it. `grammar`, `json_schema` and OpenAI's `response_format` are passed through to
CompletionRequest.grammar / .format (Ollama's convention: `"json"` for JSON mode, a schema object otherwise); the
grammar-constrained sampler lives with the engine.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runner.errors import RequestError
from runner.grammar import Constraint
from runner.protocol import CompletionRequest, ImageData
from runner.sampling import SamplerParams


@dataclass(frozen=True, slots=True)
class Decoded:
    """A completion request plus what only the HTTP layer needs."""

    request: CompletionRequest
    stream: bool
    include_usage: bool  # OpenAI stream_options.include_usage
    model: str  # the request's `model` (echoed back), "" when absent
    n_predict: int  # as sent: -1 unlimited, 0 evaluates nothing and answers at once
    grammar: Constraint | None = None  # the request's grammar/format, compiled before submission


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body. Raises RequestError for anything else."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("the request body is not valid JSON: nesting too deep") from None
    if not isinstance(doc, dict):
        raise RequestError("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body):  # a \uD800-\uDFFF escape: valid JSON, but alone it is no character
        try:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError("the request body is not valid JSON: a lone UTF-16 surrogate escape") from None
    return doc


def _get(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = doc.get(key)
    if value is None:
        return default
    # bool is an int in Python; JSON keeps them apart
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise RequestError(f"'{key}' has the wrong type")
    if not isinstance(value, kind):
        raise RequestError(f"'{key}' has the wrong type")
    return value


def _int(doc: Mapping[str, Any], key: str, default: int) -> int:
    value = _get(doc, key, (int, float), default)
    if isinstance(value, float) and not value.is_integer():
        raise RequestError(f"'{key}' must be an integer")
    return int(value)


def _float(doc: Mapping[str, Any], key: str, default: float) -> float:
    return float(_get(doc, key, (int, float), default))


def _stops(doc: Mapping[str, Any]) -> tuple[str, ...]:
    value = doc.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):  # OpenAI allows a single string
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise RequestError("'stop' must be a string or an array of strings")
    return tuple(s for s in value if s)


def _format(doc: Mapping[str, Any]) -> tuple[str, str | None]:
    """(grammar, format) from grammar / json_schema / response_format."""
    grammar = _get(doc, "grammar", str, "")
    schema = doc.get("json_schema")
    fmt: str | None = None
    if schema is not None:
        if not isinstance(schema, dict):
            raise RequestError("'json_schema' must be an object")
        fmt = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    rf = doc.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise RequestError("'response_format' must be an object with a string 'type'")
        kind = rf["type"]
        if kind == "json_object":
            inner = rf.get("schema")
            fmt = json.dumps(inner, separators=(",", ":"), ensure_ascii=False) if isinstance(inner, dict) else '"json"'
        elif kind == "json_schema":
            wrapper = rf.get("json_schema")
            inner = wrapper.get("schema") if isinstance(wrapper, dict) else None
            if not isinstance(inner, dict):
                raise RequestError("response_format json_schema needs 'json_schema': {'schema': {...}}")
            fmt = json.dumps(inner, separators=(",", ":"), ensure_ascii=False)
        elif kind != "text":
            raise RequestError(f"response_format type {kind!r} is not supported: use text, json_object or "
                               "json_schema")
    return grammar, fmt


def decode_prompt(value: object, tokenizer: Any) -> tuple[str, tuple[int, ...] | None]:
    """llama-server's `prompt`: a string, token ids, token ids mixed with strings, a one-element array of one of
    those, or {"prompt_string": …}. Returns (text, None) for text the engine tokenizes, or ("", ids). A string
    that comes first gets the model's BOS as a text prompt would; later strings are tokenized without it."""
    if isinstance(value, dict):
        if value.get("multimodal_data"):  # the routes take these apart first (media.split_multimodal_prompt)
            raise RequestError("a multimodal prompt cannot be given here")
        value = value.get("prompt_string")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (list, dict, str)):
        return decode_prompt(value[0], tokenizer)  # one prompt given as a batch of one
    if isinstance(value, str):
        return value, None
    if not isinstance(value, list) or not value:
        raise RequestError("'prompt' must be a string or a non-empty array of token ids and strings")
    if all(isinstance(v, str) for v in value):
        raise RequestError("several prompts in one request are not supported; send one request per prompt")
    ids: list[int] = []
    n_vocab = int(tokenizer.n_vocab)
    for i, v in enumerate(value):
        if isinstance(v, str):
            ids.extend(tokenizer.encode(v, add_special=i == 0, parse_special=True))
        elif isinstance(v, int) and not isinstance(v, bool):
            if not 0 <= v < n_vocab:
                raise RequestError(f"token id {v} is outside the vocabulary (0..{n_vocab - 1})")
            ids.append(v)
        else:
            raise RequestError("'prompt' arrays may hold only token ids and strings")
    return "", tuple(ids)


def decode_completion(doc: Mapping[str, Any], prompt: str, tokens: tuple[int, ...] | None,
                      default_keep: int = 0, default_n_predict: int = -1,
                      images: tuple[ImageData, ...] = ()) -> Decoded:
    """The generation settings of any completion route, with the prompt (and its images, `[img-N]` markers in
    it) already resolved; the defaults of n_keep and n_predict come from --keep and -n."""
    n_predict = _int(doc, "max_tokens", default_n_predict)
    n_predict = _int(doc, "max_completion_tokens", n_predict)
    n_predict = _int(doc, "n_predict", n_predict)
    seed = _int(doc, "seed", -1)
    sampling = SamplerParams(
        temperature=_float(doc, "temperature", 0.8), top_k=_int(doc, "top_k", 40), top_p=_float(doc, "top_p", 0.95),
        min_p=_float(doc, "min_p", 0.05), seed=None if seed < 0 else seed,
        repeat_last_n=_int(doc, "repeat_last_n", 64), repeat_penalty=_float(doc, "repeat_penalty", 1.0),
        presence_penalty=_float(doc, "presence_penalty", 0.0),
        frequency_penalty=_float(doc, "frequency_penalty", 0.0))
    if _int(doc, "n", 1) != 1 or _int(doc, "n_cmpl", 1) != 1:
        raise RequestError("only one completion per request is supported ('n' must be 1)")
    if doc.get("multimodal_data"):
        raise RequestError("multimodal_data belongs in the prompt: {\"prompt_string\": ..., \"multimodal_data\": "
                           "[...]}")
    grammar, fmt = _format(doc)
    stream_options = _get(doc, "stream_options", dict, {})
    request = CompletionRequest(
        prompt=prompt, images=images, sampling=sampling, num_predict=max(n_predict, 0),
        num_keep=_int(doc, "n_keep", default_keep), stop=_stops(doc), grammar=grammar, format=fmt,
        cache_prompt=bool(_get(doc, "cache_prompt", bool, True)), tokens=tokens)
    return Decoded(request=request, stream=bool(_get(doc, "stream", bool, False)),
                   include_usage=bool(_get(stream_options, "include_usage", bool, False)),
                   model=str(_get(doc, "model", str, "")), n_predict=n_predict)
