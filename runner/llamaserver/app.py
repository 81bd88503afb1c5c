"""The llama-server HTTP API over the shared engine (starlette): the routes newer Ollama calls (/health,
/completion, /tokenize, /detokenize, /apply-template, /v1/chat/completions, /v1/embeddings) and the rest of
llama-server's everyday surface (/v1/completions, /embedding, /v1/models, /props).

Every route but /health answers 503 while the model loads (/health too, with llama-server's error object).
Request bodies over `max_body` bytes get 413. Errors are llama-server's `{"error": {code, message, type}}`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from runner.engine import Engine, Event
from runner.errors import GrammarError, RequestError
from runner.http_common import BodyDecoder, BodyTooLarge, read_body
from runner.llamaserver import shapes
from runner.llamaserver.decode import Decoded, decode_completion, decode_prompt, parse_body
from runner.llamaserver.generate import EngineError, Generation, collect
from runner.llamaserver.media import images as image_data, split_multimodal_prompt, with_markers
from runner.llamaserver.template import RESERVED, ChatTemplate, TemplateError, chat_prompt, normalize_messages
from runner import images as engine_images
from runner.protocol import ImageData
from runner.responses import DoneReason, Metrics

log = logging.getLogger(__name__)
MAX_BODY = 32 << 20  # llama-server has no limit; ours keeps a stray upload from filling memory


@dataclass
class ServeState:
    """Written once by the loader thread (engine, template, facts), read by the event loop."""

    model_path: str
    model_name: str
    n_ctx_slot_cap: bool = True  # no context shift: an unlimited request stops when its slot is full
    keep: int = 0
    n_predict: int = -1
    api_key: str = ""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    engine: Engine | None = None
    template: ChatTemplate | None = None
    meta: dict[str, int] = field(default_factory=dict)  # n_vocab, n_ctx_train, n_embd for /v1/models
    error: str = ""


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _json(obj: Any, status: int = 200) -> Response:
    return Response(shapes.dumps(obj), status_code=status, media_type=shapes.JSON_CONTENT_TYPE)


def _error(status: int, message: str, kind: str = "") -> Response:
    return _json(shapes.error_object(status, message, kind), status)


async def _body(request: Request, limit: int, decoder: BodyDecoder) -> dict[str, Any]:
    try:
        raw = await read_body(request, limit)
    except BodyTooLarge:
        raise HttpError(413, f"the request body is larger than {limit} bytes") from None
    try:
        return await decoder.decode(parse_body, raw)
    except RequestError as e:
        raise HttpError(400, str(e)) from None


Handler = Callable[[Request, dict[str, Any], Engine], Awaitable[Response]]


def build_app(state: ServeState, max_body: int = MAX_BODY) -> Starlette:
    decoder = BodyDecoder()

    def ready() -> Engine:
        if state.engine is None:
            if state.error:
                raise HttpError(500, f"model failed to load: {state.error}")
            raise HttpError(503, "Loading model")
        return state.engine

    def authorize(request: Request) -> None:
        if not state.api_key:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or request.headers.get("x-api-key", "")
        if not secrets.compare_digest(given.encode(), state.api_key.encode()):
            raise HttpError(401, "Invalid API Key")

    def route(path: str, handler: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                authorize(request)
                engine = ready()
                body = await _body(request, max_body, decoder)
                return await handler(request, body, engine)
            except HttpError as e:
                if e.status >= 500:
                    log.warning("%s: %s", path, e.message)
                return _error(e.status, e.message, e.kind)
            except (RequestError, TemplateError, GrammarError) as e:  # llama-server: 400 invalid request
                return _error(400, str(e))
            except Exception as e:  # a bug or an engine failure answers this request only
                log.exception("%s failed", path)
                return _error(500, f"{type(e).__name__}: {e}")
        return Route(path, endpoint, methods=["POST"])

    def get(path: str, handler: Callable[[Engine], Response], public: bool = False) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                if not public:
                    authorize(request)
                return handler(ready())
            except HttpError as e:
                return _error(e.status, e.message)
        return Route(path, endpoint, methods=["GET"])

    async def health(_: Request) -> Response:
        engine = state.engine
        if engine is None:
            if state.error:
                return _error(500, f"model failed to load: {state.error}")
            return _error(503, "Loading model")
        if engine.error:
            return _error(500, engine.error)
        return _json({"status": "ok"})

    # ---- generation -------------------------------------------------------------------------------------
    def settings(d: Decoded, engine: Engine) -> dict[str, Any]:
        s, r = d.request.sampling, d.request
        return {"n_ctx": engine.n_ctx_slot, "seed": -1 if s.seed is None else s.seed, "temperature": s.temperature,
                "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p, "repeat_last_n": s.repeat_last_n,
                "repeat_penalty": s.repeat_penalty, "presence_penalty": s.presence_penalty,
                "frequency_penalty": s.frequency_penalty, "stop": list(r.stop), "max_tokens": d.n_predict,
                "n_predict": d.n_predict, "n_keep": r.num_keep, "stream": d.stream, "grammar": r.grammar}

    async def prepare(body: dict[str, Any], engine: Engine, prompt: str, tokens: tuple[int, ...] | None,
                      imgs: tuple[ImageData, ...] = ()) -> Decoded:
        """The request with its prompt tokenized (off the event loop, so /health never waits on a long prompt).
        Without --context-shift llama-server refuses a prompt that fills the slot and ends a generation when the
        slot is full; the engine would truncate and shift, so the request is checked and capped here. A prompt
        with images is counted as the engine will lay it out (its images are encoded only once it is placed)."""
        if imgs:
            if not engine_images.can_see(engine.model):
                raise HttpError(400, "image input is not supported by this model (it has no vision projector: "
                                     "start the server with --mmproj)")
            n_prompt = await asyncio.to_thread(engine_images.count_inputs, engine.model, engine.tokenizer, prompt,
                                               [im.id for im in imgs])
        else:
            if tokens is None:
                tokens = tuple(await asyncio.to_thread(engine.tokenizer.encode, prompt, True, True))
            if not tokens:
                raise HttpError(400, "the prompt is empty")
            n_prompt = len(tokens)
        d = decode_completion(body, prompt, tokens, state.keep, state.n_predict, imgs)
        if d.request.grammar or d.request.format:  # a bad grammar is the request's fault: 400 before it queues
            d = replace(d, grammar=await asyncio.to_thread(engine.grammars.compile, d.request))
        if not state.n_ctx_slot_cap:
            return d
        room = engine.n_ctx_slot - n_prompt
        if room <= 0:
            raise HttpError(400, f"the request exceeds the available context size: {n_prompt} prompt tokens, "
                                 f"{engine.n_ctx_slot} per slot", "exceed_context_size_error")
        if 0 < d.request.num_predict <= room:
            return d
        return replace(d, request=replace(d.request, num_predict=room))

    async def resolve_prompt(value: object, engine: Engine) -> tuple[str, tuple[int, ...] | None,
                                                                      tuple[ImageData, ...]]:
        """A completion route's `prompt`: text or token ids (decode_prompt), or a multimodal object."""
        multimodal = split_multimodal_prompt(value)
        if multimodal is not None:
            return multimodal[0], None, multimodal[1]
        prompt, tokens = await asyncio.to_thread(decode_prompt, value, engine.tokenizer)
        return prompt, tokens, ()

    def model_name(d: Decoded) -> str:
        return d.model or state.model_name

    def empty_outcome(d: Decoded) -> shapes.Outcome:
        """n_predict 0: nothing is generated (llama-server would still fill the cache; we answer at once)."""
        return shapes.Outcome(DoneReason.LENGTH, Metrics(prompt_eval_count=len(d.request.tokens or ())))

    async def native_completion(request: Request, body: dict[str, Any], engine: Engine) -> Response:
        if "prompt" not in body:
            raise HttpError(400, "'prompt' is required")
        prompt, tokens, imgs = await resolve_prompt(body["prompt"], engine)
        echo = prompt if tokens is None else await asyncio.to_thread(engine.tokenizer.decode, tokens)
        d = await prepare(body, engine, prompt, tokens, imgs)
        if d.n_predict == 0:
            out = empty_outcome(d)
            final = shapes.completion_final("", out, model_name(d), echo, settings(d, engine))
            return _sse_once(final) if d.stream else _json(final)
        gen = Generation(engine, d.request, d.grammar)
        if not d.stream:
            text, ev = await _collect(gen, request)
            out = _outcome(ev)
            return _json(shapes.completion_final(text, out, model_name(d), echo, settings(d, engine)))
        first = await _first(gen, request)
        n_prompt = gen.n_prompt

        async def stream() -> AsyncIterator[bytes]:
            n = 0
            async for ev in gen.events(first):
                if ev.error is not None:
                    yield shapes.sse(shapes.error_object(500, ev.error))
                    return
                if ev.text:
                    n += 1
                    yield shapes.sse(shapes.completion_partial(ev.text, n, n_prompt))
                if ev.done is not None:
                    yield shapes.sse(shapes.completion_final("", _outcome(ev), model_name(d), echo,
                                                             settings(d, engine)))
        return StreamingResponse(stream(), media_type=shapes.SSE_CONTENT_TYPE)

    async def oai_completion(request: Request, body: dict[str, Any], engine: Engine) -> Response:
        if "prompt" not in body:
            raise HttpError(400, "'prompt' is required")
        prompt, tokens, imgs = await resolve_prompt(body["prompt"], engine)
        d = await prepare(body, engine, prompt, tokens, imgs)
        cid, created, model = "cmpl-" + secrets.token_hex(16), int(time.time()), model_name(d)
        if d.n_predict == 0:
            m = empty_outcome(d).metrics
            res = shapes.text_completion("", "length", cid, created, model, m)
            return _sse_done([res]) if d.stream else _json(res)
        gen = Generation(engine, d.request, d.grammar)
        if not d.stream:
            text, ev = await _collect(gen, request)
            out = _outcome(ev)
            return _json(shapes.text_completion(text, out.finish_reason, cid, created, model, out.metrics))
        first = await _first(gen, request)

        async def stream() -> AsyncIterator[bytes]:
            async for ev in gen.events(first):
                if ev.error is not None:
                    yield shapes.sse(shapes.error_object(500, ev.error))
                    return
                if ev.text:
                    yield shapes.sse(shapes.text_completion(ev.text, None, cid, created, model, None))
                if ev.done is not None:
                    out = _outcome(ev)
                    yield shapes.sse(shapes.text_completion("", out.finish_reason, cid, created, model, out.metrics))
            yield shapes.SSE_DONE
        return StreamingResponse(stream(), media_type=shapes.SSE_CONTENT_TYPE)

    def render(body: dict[str, Any], media: list[bytes] | None = None) -> str:
        """The conversation's prompt text; image parts become media markers, their bytes go to `media`."""
        if state.template is None:
            raise HttpError(500, "no chat template")
        messages = normalize_messages(body.get("messages"), media if media is not None else [])
        tools = body.get("tools")
        add_gen = body.get("add_generation_prompt", True)
        extra = body.get("chat_template_kwargs")
        if extra is not None and not isinstance(extra, dict):
            raise HttpError(400, "'chat_template_kwargs' must be an object")
        kwargs = {k: v for k, v in {**state.template_kwargs, **(extra or {})}.items() if k not in RESERVED}
        return state.template.render(messages, add_generation_prompt=add_gen is not False,
                                     tools=tools if isinstance(tools, list) else None, **kwargs)

    async def apply_template(_: Request, body: dict[str, Any], engine: Engine) -> Response:
        try:
            return _json({"prompt": render(body)})
        except ValueError as e:
            raise HttpError(400, str(e)) from None

    async def chat(request: Request, body: dict[str, Any], engine: Engine) -> Response:
        media: list[bytes] = []
        try:
            text = render(body, media)
            prompt, tokens = await asyncio.to_thread(chat_prompt, text, state.template, engine.tokenizer,
                                                     bool(media))
            if media:
                prompt = with_markers(prompt, len(media))
        except ValueError as e:  # bad messages, or the template refused them (or dropped an image)
            raise HttpError(400, str(e)) from None
        d = await prepare(body, engine, prompt, tokens, image_data(media))
        cid, created, model = "chatcmpl-" + secrets.token_hex(16), int(time.time()), model_name(d)
        if d.n_predict == 0:
            out = empty_outcome(d)
            if d.stream:
                return _sse_done([shapes.chat_chunk({"role": "assistant", "content": None}, None, cid, created, model),
                                  {**shapes.chat_chunk({}, "length", cid, created, model),
                                   "timings": shapes.timings(out.metrics)}])
            return _json(shapes.chat_completion("", out, cid, created, model))
        gen = Generation(engine, d.request, d.grammar)
        if not d.stream:
            text, ev = await _collect(gen, request)
            return _json(shapes.chat_completion(text, _outcome(ev), cid, created, model))
        first = await _first(gen, request)

        async def stream() -> AsyncIterator[bytes]:
            yield shapes.sse(shapes.chat_chunk({"role": "assistant", "content": None}, None, cid, created, model))
            async for ev in gen.events(first):
                if ev.error is not None:
                    yield shapes.sse(shapes.error_object(500, ev.error))
                    return
                if ev.text:
                    yield shapes.sse(shapes.chat_chunk({"content": ev.text}, None, cid, created, model))
                if ev.done is not None:
                    out = _outcome(ev)
                    last = shapes.chat_chunk({}, out.finish_reason, cid, created, model)
                    usage = shapes.chat_usage_chunk(out.metrics, cid, created, model) if d.include_usage else None
                    (usage if usage is not None else last)["timings"] = shapes.timings(out.metrics)
                    yield shapes.sse(last)
                    if usage is not None:
                        yield shapes.sse(usage)
            yield shapes.SSE_DONE
        return StreamingResponse(stream(), media_type=shapes.SSE_CONTENT_TYPE)

    # ---- tokens -----------------------------------------------------------------------------------------
    async def tokenize(_: Request, body: dict[str, Any], engine: Engine) -> Response:
        content = body.get("content")
        if not isinstance(content, str):
            raise HttpError(400, "'content' must be a string")
        tok = engine.tokenizer
        ids = await asyncio.to_thread(tok.encode, content, body.get("add_special") is True,
                                      body.get("parse_special") is not False)
        if body.get("with_pieces") is not True:
            return _json({"tokens": ids})
        pieces: list[dict[str, Any]] = []
        for i in ids:
            raw = tok.token_bytes(i)
            try:
                piece: Any = raw.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(raw)
            pieces.append({"id": i, "piece": piece})
        return _json({"tokens": pieces})

    async def detokenize(_: Request, body: dict[str, Any], engine: Engine) -> Response:
        ids = body.get("tokens", [])
        n = engine.tokenizer.n_vocab
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n
                                                for i in ids):
            raise HttpError(400, f"'tokens' must be an array of token ids in 0..{n - 1}")
        return _json({"content": await asyncio.to_thread(engine.tokenizer.decode, ids)})

    # ---- embeddings -------------------------------------------------------------------------------------
    async def embed_all(engine: Engine, texts: list[str]) -> tuple[list[list[float]], int]:
        if not engine.can_embed:
            raise HttpError(501, "this model does not support embeddings")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[list[float] | str]] = []
        for text in texts:
            fut: asyncio.Future[list[float] | str] = loop.create_future()

            def reply(r: list[float] | str, fut: asyncio.Future[list[float] | str] = fut) -> None:
                loop.call_soon_threadsafe(fut.set_result, r)

            engine.submit_embedding(text, reply)
            futures.append(fut)
        vectors, n_tokens = [], 0
        for text, fut in zip(texts, futures):
            result = await fut
            if isinstance(result, str):
                raise HttpError(500 if text else 400, f"failed to embed: {result}")
            vectors.append(shapes.l2_normalize(result))
            ids = await asyncio.to_thread(engine.tokenizer.encode, text, True, False)
            n_tokens += min(len(ids), engine.n_ctx_embed)
        return vectors, n_tokens

    def texts_of(value: object, key: str) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return list(value)
        raise HttpError(400, f"'{key}' must be a string or a non-empty array of strings")

    async def oai_embeddings(_: Request, body: dict[str, Any], engine: Engine) -> Response:
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise HttpError(400, "'encoding_format' must be float or base64")
        vectors, n = await embed_all(engine, texts_of(body.get("input"), "input"))
        model = body.get("model") if isinstance(body.get("model"), str) else state.model_name
        return _json(shapes.embeddings_oai(vectors, n, str(model), str(encoding)))

    async def native_embedding(_: Request, body: dict[str, Any], engine: Engine) -> Response:
        key = "content" if "content" in body else "input"
        vectors, _n = await embed_all(engine, texts_of(body.get(key), key))
        return _json(shapes.embeddings_native(vectors))

    # ---- facts ------------------------------------------------------------------------------------------
    def models(_: Engine) -> Response:
        return _json({"object": "list", "data": [{"id": state.model_name, "object": "model",
                                                   "created": int(os.path.getmtime(state.model_path)),
                                                   "owned_by": "llamacpp", "meta": state.meta}]})

    def props(engine: Engine) -> Response:
        params = {"n_predict": -1, "seed": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                  "repeat_last_n": 64, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                  "stop": [], "max_tokens": -1, "n_keep": state.keep, "stream": False, "grammar": ""}
        return _json({"default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": engine.n_ctx_slot,
                                                      "speculative": False, "is_processing": False,
                                                      "params": params},
                      "total_slots": engine.parallel, "model_path": state.model_path,
                      "chat_template": state.template.source if state.template is not None else "",
                      "modalities": {"vision": engine_images.can_see(engine.model), "audio": False},
                      "build_info": shapes.SYSTEM_FINGERPRINT})

    routes = [Route("/health", health, methods=["GET"]), Route("/v1/health", health, methods=["GET"]),
              route("/completion", native_completion), route("/completions", native_completion),
              route("/v1/completions", oai_completion), route("/v1/chat/completions", chat),
              route("/chat/completions", chat), route("/apply-template", apply_template),
              route("/tokenize", tokenize), route("/detokenize", detokenize),
              route("/v1/embeddings", oai_embeddings), route("/embeddings", native_embedding),
              route("/embedding", native_embedding), get("/v1/models", models, public=True),
              get("/models", models, public=True), get("/props", props)]
    return Starlette(routes=routes, lifespan=decoder.lifespan)


def _outcome(ev: Event) -> shapes.Outcome:
    assert ev.done is not None and ev.metrics is not None
    return shapes.Outcome(ev.done, ev.metrics, ev.stop_word)


async def _first(gen: Generation, request: Request) -> Event:
    try:
        ev = await gen.first(request)
    except EngineError as e:
        raise HttpError(500, str(e)) from None
    if ev is None:
        raise HttpError(499, "client closed the request")  # nobody reads it
    return ev


async def _collect(gen: Generation, request: Request) -> tuple[str, Event]:
    try:
        got = await collect(gen, request)
    except EngineError as e:
        raise HttpError(500, str(e)) from None
    if got is None:
        raise HttpError(499, "client closed the request")
    return got


def _sse_once(obj: Any) -> Response:
    return Response(shapes.sse(obj), media_type=shapes.SSE_CONTENT_TYPE)


def _sse_done(objs: list[Any]) -> Response:
    return Response(b"".join(shapes.sse(o) for o in objs) + shapes.SSE_DONE, media_type=shapes.SSE_CONTENT_TYPE)
