"""HTTP only (starlette): parse, hand to the engine, stream its events. /health never waits on the model: loading
and compute run on other threads, and request bodies are read with a size limit and decoded off the event loop
(runner.http_common), so it answers at once in every state, whatever a client sends."""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from runner.engine import Engine, Event
from runner.errors import GrammarError, RequestError
from runner.http_common import BodyDecoder, BodyTooLarge, next_event, read_body
from runner.protocol import Dialect, decode_completion, decode_embedding
from runner.responses import (ERROR_HEADERS, JSON_CONTENT_TYPE, ServerStatus, encode_chunk, encode_embedding,
                              encode_final, encode_health, error_body)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bodies above this get 413 before they are parsed. Images travel base64-encoded in /completion bodies, so the
# limit is far above any prompt; it bounds memory and parse time per request.
MAX_BODY_BYTES = 64 << 20


@dataclass
class RunnerState:
    """What /health reports; written by the loader thread, read by the event loop."""

    status: ServerStatus = ServerStatus.LOADING_MODEL
    progress: float = 0.0
    error: str = ""
    engine: Engine | None = None
    ready: threading.Event = field(default_factory=threading.Event)  # set when loading ended (either way)


def _error(status: int, message: str) -> Response:
    return Response(error_body(message), status_code=status, headers=ERROR_HEADERS)


def build_app(state: RunnerState, dialect: Dialect) -> Starlette:
    decoders = BodyDecoder()

    async def health(_: Request) -> Response:
        status = state.status
        if state.engine is not None and state.engine.health_error():
            status = ServerStatus.ERROR
        return Response(encode_health(dialect, status, state.progress), media_type=JSON_CONTENT_TYPE)

    async def wait_ready() -> Response | None:
        # A request that arrives during load waits for the model (the protocol has no 503).
        while not state.ready.is_set():
            await asyncio.sleep(0.02)
        if state.status != ServerStatus.READY or state.engine is None:
            return _error(500, f"model failed to load: {state.error}")
        return None

    async def receive(request: Request, decode: Callable[[bytes], T]) -> T | Response:
        """The decoded body, or the response that refuses it (400, 413, or an empty one for a client that left)."""
        try:
            body = await read_body(request, MAX_BODY_BYTES)
        except BodyTooLarge:
            return _error(413, "request body too large")
        except ClientDisconnect:
            log.debug("client left during the upload of %s", request.url.path)
            return Response(status_code=200)
        try:
            return await decoders.decode(decode, body)
        except RequestError as e:
            log.warning("bad %s request: %s", request.url.path, e)
            return _error(400, "Bad request")

    async def completion(request: Request) -> Response:
        req = await receive(request, functools.partial(decode_completion, dialect=dialect))  # picklable
        if isinstance(req, Response):
            return req
        not_ready = await wait_ready()
        if not_ready is not None:
            return not_ready
        assert state.engine is not None
        if await request.is_disconnected():  # gone already: never spend a prefill on it
            return Response(status_code=200)
        grammar = None
        if req.grammar or req.format:  # compiling takes ms (seconds the first time): off the event and batch loops
            try:
                grammar = await asyncio.to_thread(state.engine.grammars.compile, req)
            except GrammarError as e:
                log.warning("bad grammar: %s", e)
                return _error(500, str(e))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        seq = state.engine.submit(req, sink, grammar)
        first = await next_event(request, queue)
        if first is None:  # the client went away while waiting for a slot or for its prompt: free them
            seq.cancel()
            return Response(status_code=200)  # nobody reads it (the Go runner also answers an empty 200)
        if first.error is not None:
            return _error(500, f"Failed to create new sequence: {first.error}")

        async def stream() -> AsyncIterator[bytes]:
            ev = first
            try:
                while True:
                    if ev.done is not None:
                        if ev.error is None and ev.metrics is not None:
                            yield encode_final(dialect, ev.done, ev.metrics)
                        return
                    yield encode_chunk(dialect, ev.text)
                    ev = await queue.get()
            finally:
                seq.cancel()  # no-op when finished; frees the slot when the client went away

        return StreamingResponse(stream(), media_type=JSON_CONTENT_TYPE)

    async def embedding(request: Request) -> Response:
        req = await receive(request, decode_embedding)
        if isinstance(req, Response):
            return req
        not_ready = await wait_ready()
        if not_ready is not None:
            return not_ready
        engine = state.engine
        assert engine is not None
        if not engine.can_embed:
            return _error(501, "this model does not support embeddings")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[float] | str] = loop.create_future()

        def reply(r: list[float] | str) -> None:
            loop.call_soon_threadsafe(done.set_result, r)

        engine.submit_embedding(req.content, reply)
        result = await done
        if isinstance(result, str):
            return _error(500, f"failed to embed: {result}")
        return Response(encode_embedding(result), media_type=JSON_CONTENT_TYPE)

    routes = [Route("/health", health, methods=["GET"]), Route("/completion", completion, methods=["POST"]),
              Route("/embedding", embedding, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=decoders.lifespan)
    app.router.redirect_slashes = False  # `/completion/` is not ours: 404, as Go's mux answers, not a 307
    return app
