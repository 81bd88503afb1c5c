"""What both HTTP front ends (the Ollama runner protocol and the llama-server mode) need so that no client can stall
them: bodies read with a size limit, decoded off the event loop (in a helper process when Python's JSON scanner
would hold the GIL too long), and a sequence's next event awaited while watching for the client leaving."""
from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import anyio.to_thread
from starlette.requests import Request

from runner.engine import Event

T = TypeVar("T")

# Bodies up to this size are decoded on the event loop (microseconds); larger ones on a worker thread.
INLINE_DECODE_BYTES = 64 << 10
# Python's JSON scanner holds the GIL while it builds a long array, so a body of a million small objects would
# stall every thread for a third of a second at a time. Bodies that may hold more JSON containers than this
# (counting brackets, strings included: an upper bound) are decoded in a helper process instead; no request
# Ollama or an OpenAI client sends comes near it.
THREAD_DECODE_CONTAINERS = 20_000


class BodyTooLarge(Exception):
    """The request body exceeds the front end's limit."""


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` bytes (before it is all in memory).

    Raises:
        BodyTooLarge: over the limit. starlette's ClientDisconnect: the client went away mid-upload.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        parts.append(chunk)
    return b"".join(parts)


def _exit_with_parent(parent: int) -> None:
    """In the helper process: leave as soon as the runner is gone (Ollama stops runners with SIGKILL, which
    gives the runner no chance to stop its helpers)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class BodyDecoder:
    """Runs a body decoder where it cannot stall the event loop; one helper process, started on first use."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _helper(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_exit_with_parent, initargs=(os.getpid(),))
            return self._pool

    async def decode(self, decode: Callable[[bytes], T], body: bytes) -> T:
        """decode(body): inline when small, on a thread when large, in the helper process when it may hold many
        JSON containers. `decode` must be picklable (a module-level function or a partial of one)."""
        if len(body) <= INLINE_DECODE_BYTES:
            return decode(body)
        if body.count(b"{") + body.count(b"[") > THREAD_DECODE_CONTAINERS:
            return await asyncio.get_running_loop().run_in_executor(self._helper(), decode, body)
        return await anyio.to_thread.run_sync(decode, body)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: object) -> AsyncIterator[None]:
        """A starlette lifespan that stops the helper process when the app shuts down."""
        yield
        self.close()


async def next_event(request: Request, queue: asyncio.Queue[Event]) -> Event | None:
    """The sequence's next event, or None if the client disconnects before it comes."""
    getter = asyncio.ensure_future(queue.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.1)
            if done:
                return getter.result()
            if await request.is_disconnected():
                return None
    finally:
        getter.cancel()  # a no-op when it finished
