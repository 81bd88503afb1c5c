"""Response side of the llama-server mode: the JSON objects llama-server sends, field for field and in its order
(tools/server/server-task.cpp: result_timings, the final and partial completion results, their OpenAI forms), the
error object, and the server-sent-event framing. Serialization is compact with raw UTF-8, as nlohmann's dump().
No HTTP here: these are pure functions of what the engine reported.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from runner.responses import DoneReason, Metrics
from runner.sampling import TokenProbs

SSE_CONTENT_TYPE: Final = "text/event-stream"
JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
SSE_DONE: Final = b"data: [DONE]\n\n"
SYSTEM_FINGERPRINT: Final = "ollama-pyrunner-0.1.0"

# llama-server's error types by status (format_error_response)
_ERROR_TYPES: Final = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                       404: "not_found_error", 413: "invalid_request_error", 500: "server_error",
                       501: "not_supported_error", 503: "unavailable_error"}


def dumps(obj: Any) -> bytes:
    """Compact JSON with non-ASCII kept as UTF-8."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse(obj: Any) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    return b"data: " + dumps(obj) + b"\n\n"


def error_object(status: int, message: str, kind: str = "") -> dict[str, Any]:
    """`{"error": {"code", "message", "type"}}`; the type follows the status unless `kind` names one."""
    return {"error": {"code": status, "message": message, "type": kind or _ERROR_TYPES.get(status, "server_error")}}


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a finished completion ended, in llama-server's terms."""

    reason: DoneReason
    metrics: Metrics
    stop_word: str = ""

    @property
    def stop_type(self) -> str:
        if self.reason is DoneReason.LENGTH:
            return "limit"
        return "word" if self.stop_word else "eos"

    @property
    def finish_reason(self) -> str:
        return "length" if self.reason is DoneReason.LENGTH else "stop"


def _rate(n: int, ms: float) -> tuple[float, float]:
    """(ms per token, tokens per second); 0 where there is nothing to divide (llama.cpp would print inf/null)."""
    per_token = ms / n if n > 0 else 0.0
    per_second = 1e3 * n / ms if ms > 0 else 0.0
    return per_token, per_second


def timings(m: Metrics) -> dict[str, Any]:
    """result_timings: prompt_n counts the prompt tokens evaluated (those not reused from the cache, cache_n)."""
    prompt_n = max(m.prompt_eval_count - m.cache_n, 0)
    prompt_ms = m.prompt_eval_duration_ns / 1e6
    predicted_ms = m.eval_duration_ns / 1e6
    p_tok, p_sec = _rate(prompt_n, prompt_ms)
    g_tok, g_sec = _rate(m.eval_count, predicted_ms)
    return {"cache_n": m.cache_n, "prompt_n": prompt_n, "prompt_ms": prompt_ms, "prompt_per_token_ms": p_tok,
            "prompt_per_second": p_sec, "predicted_n": m.eval_count, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": g_tok, "predicted_per_second": g_sec}


def _usage(m: Metrics) -> dict[str, int]:
    return {"completion_tokens": m.eval_count, "prompt_tokens": m.prompt_eval_count,
            "total_tokens": m.eval_count + m.prompt_eval_count}


# ---- native /completion ------------------------------------------------------------------------------------

def token_probs(probs: Sequence[TokenProbs], piece: Callable[[int], bytes]) -> list[dict[str, Any]]:
    """llama-server's per-token probabilities (`completion_probabilities`, and OpenAI's `logprobs.content`)."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = piece(token)
        return {"id": token, "token": raw.decode("utf-8", "replace"), "bytes": list(raw), "logprob": logprob}
    return [{**one(p.token, p.logprob), "top_logprobs": [one(t, lp) for t, lp in p.top]} for p in probs]


def completion_partial(content: str, n_decoded: int, n_prompt: int, tokens: Sequence[int] = (),
                       probs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A streamed piece, with the ids of the tokens it holds (and their probabilities when asked for)."""
    res: dict[str, Any] = {"index": 0, "content": content, "tokens": list(tokens), "stop": False, "id_slot": -1,
                           "tokens_predicted": n_decoded, "tokens_evaluated": n_prompt}
    if probs is not None:
        res["completion_probabilities"] = probs
    return res


def completion_final(content: str, out: Outcome, model: str, prompt: str, settings: dict[str, Any],
                     tokens: Sequence[int] = (), probs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The last (or only) object of a native completion; `content` is "" when the text was streamed; `tokens`
    only with return_tokens, `probs` only for n_probs (and not after a stream, whose pieces carried them)."""
    res = _final(content, out, model, prompt, settings, tokens)
    if probs is not None:
        res["completion_probabilities"] = probs
    return res


def _final(content: str, out: Outcome, model: str, prompt: str, settings: dict[str, Any],
           tokens: Sequence[int]) -> dict[str, Any]:
    m = out.metrics
    return {"index": 0, "content": content, "tokens": list(tokens), "id_slot": -1, "stop": True, "model": model,
            "tokens_predicted": m.eval_count, "tokens_evaluated": m.prompt_eval_count,
            "generation_settings": settings, "prompt": prompt, "has_new_line": "\n" in content,
            "truncated": False, "stop_type": out.stop_type, "stopping_word": out.stop_word,
            "tokens_cached": m.prompt_eval_count + max(m.eval_count - 1, 0), "timings": timings(m)}


# ---- OpenAI /v1/completions ---------------------------------------------------------------------------------

def _head(cmpl_id: str, created: int, model: str, obj: str) -> dict[str, Any]:
    return {"created": created, "model": model, "system_fingerprint": SYSTEM_FINGERPRINT, "object": obj,
            "id": cmpl_id}


def text_completion(text: str, finish: str | None, cmpl_id: str, created: int, model: str,
                    metrics: Metrics | None, probs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A whole /v1/completions answer (metrics given) or one streamed chunk (finish None unless last)."""
    logprobs = None if probs is None else {"content": probs}
    res: dict[str, Any] = {"choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}],
                           **_head(cmpl_id, created, model, "text_completion")}
    if metrics is not None:
        res["usage"] = _usage(metrics)
        res["id"] = res.pop("id")  # llama-server puts the id after usage
        res["timings"] = timings(metrics)
    return res


# ---- OpenAI /v1/chat/completions ----------------------------------------------------------------------------

def chat_completion(content: str, out: Outcome, cmpl_id: str, created: int, model: str,
                    probs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A whole chat answer (`logprobs` in its choice when the request asked for them)."""
    choice: dict[str, Any] = {"finish_reason": out.finish_reason, "index": 0,
                              "message": {"role": "assistant", "content": content}}
    if probs is not None:
        choice["logprobs"] = {"content": probs}
    return {"choices": [choice],
            "created": created, "model": model, "system_fingerprint": SYSTEM_FINGERPRINT,
            "object": "chat.completion", "usage": _usage(out.metrics), "id": cmpl_id,
            "timings": timings(out.metrics)}


def chat_chunk(delta: dict[str, Any], finish: str | None, cmpl_id: str, created: int, model: str,
               probs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One chat.completion.chunk (llama-server orders created before id in chunks)."""
    choice: dict[str, Any] = {"finish_reason": finish, "index": 0, "delta": delta}
    if probs is not None:
        choice["logprobs"] = {"content": probs}
    return {"choices": [choice], "created": created, "id": cmpl_id,
            "model": model, "system_fingerprint": SYSTEM_FINGERPRINT, "object": "chat.completion.chunk"}


def chat_usage_chunk(m: Metrics, cmpl_id: str, created: int, model: str) -> dict[str, Any]:
    """The extra last chunk of stream_options.include_usage: no choices, the usage."""
    return {"choices": [], "created": created, "id": cmpl_id, "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "object": "chat.completion.chunk", "usage": _usage(m)}


# ---- embeddings ---------------------------------------------------------------------------------------------

def l2_normalize(vector: Sequence[float]) -> list[float]:
    """Euclidean normalisation (llama-server's default embd_normalize=2), computed in float64."""
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.sqrt(np.sum(v * v)))
    return [float(x) for x in (v / norm if norm > 0 else v).astype(np.float32)]


def embeddings_oai(vectors: Sequence[Sequence[float]], n_tokens: int, model: str,
                   encoding: str = "float") -> dict[str, Any]:
    """The /v1/embeddings answer; base64 encoding packs little-endian float32 as OpenAI's client expects."""
    data = []
    for i, v in enumerate(vectors):
        emb: Any = (base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
                    if encoding == "base64" else list(v))
        data.append({"embedding": emb, "index": i, "object": "embedding"})
    return {"model": model, "object": "list", "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            "data": data}


def embeddings_native(vectors: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """The non-OpenAI /embedding answer: one entry per input, the pooled vector wrapped in an array."""
    return [{"index": i, "embedding": [list(v)]} for i, v in enumerate(vectors)]
