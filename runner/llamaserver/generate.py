"""Driving the shared engine from the event loop: submit a CompletionRequest, then read its events as an async
iterator (the engine's loop thread hands them over with call_soon_threadsafe). Leaving the iterator early, or the
client going away, cancels the sequence so its slot is freed."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request

from runner.engine import Engine, Event
from runner.grammar import Constraint
from runner.http_common import next_event
from runner.protocol import CompletionRequest
from runner.sampling import TokenProbs


class EngineError(RuntimeError):
    """The engine failed the request before producing output (answered as a 500)."""


class Generation:
    """One request in flight on the engine."""

    def __init__(self, engine: Engine, request: CompletionRequest, grammar: Constraint | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, ev)

        self._seq = engine.submit(request, sink, grammar)

    def cancel(self) -> None:
        self._seq.cancel()

    @property
    def n_prompt(self) -> int:
        """Prompt tokens after the engine's truncation (known once the first event came)."""
        return self._seq.n_prompt

    async def next(self, request: Request) -> Event | None:
        """The next event, or None if the client disconnects first (the sequence is then cancelled)."""
        ev = await next_event(request, self._queue)
        if ev is None:
            self.cancel()
        return ev

    async def first(self, request: Request) -> Event | None:
        """The first event (None if the client went away). Raises EngineError when it is a failure."""
        ev = await self.next(request)
        if ev is not None and ev.error is not None:
            raise EngineError(ev.error)
        return ev

    async def events(self, first: Event) -> AsyncIterator[Event]:
        """`first` and every later event up to and including the final one."""
        ev = first
        try:
            while True:
                yield ev
                if ev.done is not None:
                    return
                ev = await self._queue.get()
        finally:
            self.cancel()  # a no-op once finished; frees the slot when the consumer stopped early


@dataclass(frozen=True, slots=True)
class Collected:
    """A whole generation: its text, the final event, and the generated tokens with their probabilities."""

    text: str
    final: Event
    tokens: tuple[int, ...]
    probs: tuple[TokenProbs, ...]


async def collect(gen: Generation, request: Request) -> Collected | None:
    """The whole generation, or None if the client went away (the sequence is then cancelled, so an abandoned
    non-streaming request stops generating). Raises EngineError."""
    parts: list[str] = []
    tokens: list[int] = []
    probs: list[TokenProbs] = []
    while True:
        ev = await gen.next(request)
        if ev is None:
            return None
        if ev.error is not None:
            gen.cancel()
            raise EngineError(ev.error)
        parts.append(ev.text)
        tokens += ev.tokens
        probs += ev.probs
        if ev.done is not None:
            return Collected("".join(parts), ev, tuple(tokens), tuple(probs))
