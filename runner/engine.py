"""The batch loop: one thread owns the backend, model and KV cache; requests come in through `submit` and leave as
events on each sequence's queue. Scheduling decisions come from runner.scheduling (pure functions); this module only
carries them out."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml.backend import Backend
from ml.batch import Batch
from ml.dtype import DType
from ml.errors import ModelLoadError
from runner import images
from runner.grammar import Constraint, GrammarCompiler
from runner.forward import ForwardRunner
from runner.protocol import CompletionRequest
from runner.responses import DoneReason, Metrics
from runner.sampling import Sampler, TokenProbs, token_probs
from runner.scheduling import SeqState, SlotState, choose_slot, effective_num_keep, schedule, truncate_prompt
from runner.text import Action, check_pending, encode_stops, flush_pending

log = logging.getLogger(__name__)


STALL_FLOOR_S = 120.0  # no forward pass is called stuck before this, however fast the tokens before it were
STALL_FACTOR = 50.0  # ... nor before it took this many times its expected time
MAX_FAILED_FORWARDS = 3
FAILURE_POLL_S = 0.25  # how often the backend is asked whether a device it depends on (an RPC host) has failed


class ComputeWatch:
    """Notices a forward pass that runs far beyond its expected time (a ggml compute that never returns), so
    /health can say error instead of ready forever. The expectation is the slowest seconds-per-token seen so
    far times the pass's tokens; written by the loop thread, read by the HTTP thread (single attribute writes)."""

    def __init__(self, floor_s: float = STALL_FLOOR_S) -> None:
        self.floor_s = floor_s
        self._started: float | None = None
        self._tokens = 0
        self._per_token_s = 0.0

    def begin(self, n_tokens: int) -> None:
        self._tokens = max(1, n_tokens)
        self._started = time.monotonic()

    def end(self) -> None:
        started, self._started = self._started, None
        if started is not None:
            self._per_token_s = max(self._per_token_s, (time.monotonic() - started) / self._tokens)

    def stalled(self, now: float | None = None) -> str | None:
        started = self._started
        if started is None:
            return None
        elapsed = (time.monotonic() if now is None else now) - started
        limit = max(self.floor_s, STALL_FACTOR * self._per_token_s * self._tokens)
        if elapsed <= limit:
            return None
        return f"a forward pass of {self._tokens} tokens has run for {elapsed:.0f}s (limit {limit:.0f}s)"


@dataclass
class Event:
    """A piece of output: text, or the end (`done` set) with its reason and metrics."""

    text: str = ""
    done: DoneReason | None = None
    metrics: Metrics | None = None
    error: str | None = None
    stop_word: str = ""  # the stop string that ended the sequence, if one did
    tokens: tuple[int, ...] = ()  # the generated tokens whose text this event carries (whole pieces)
    probs: tuple[TokenProbs, ...] = ()  # their probabilities, when the request asked for n_probs


EventSink = Callable[[Event], None]


def _tell_error(seq: Sequence, message: str) -> None:
    """End `seq` for its receiver with an error. A receiver that is gone (its event loop closed) must not take the
    loop down with it: nothing is left to tell then."""
    try:
        seq.sink(Event(done=DoneReason.STOP, error=message))
    except Exception:
        log.debug("could not deliver an error: %s", message, exc_info=True)


@dataclass
class Sequence:
    """One request in flight."""

    request: CompletionRequest
    sink: EventSink
    tokens: list[int] = field(default_factory=list)  # prompt after truncation
    slot: int = -1
    pending: list[int] = field(default_factory=list)  # inputs not yet evaluated
    n_past: int = 0
    num_keep: int = 0
    sampler: Sampler | None = None
    grammar: Constraint | None = None  # the request's grammar/format, if any (compiled before or in _place)
    stops: tuple[bytes, ...] = ()
    pieces: list[bytes] = field(default_factory=list)  # generated text not yet sent
    piece_tokens: list[int] = field(default_factory=list)  # the tokens of `pieces`
    piece_probs: list[TokenProbs] = field(default_factory=list)  # and their probabilities (n_probs > 0)
    n_generated: int = 0
    cancelled: bool = False
    t_start: float = 0.0
    t_first: float = 0.0
    n_prompt: int = 0
    n_cached: int = 0  # prompt tokens reused from the slot's cache at placement
    image_rows: dict[int, images.ImageRow] = field(default_factory=dict)  # the prompt's image inputs by id

    def cancel(self) -> None:
        """Client went away: the loop ends this sequence at its next step and frees the slot."""
        self.cancelled = True


@dataclass
class _Slot:
    id: int
    inputs: list[int] = field(default_factory=list)  # what the KV cache holds for this slot, in order
    seq: Sequence | None = None
    last_used: float = 0.0


class Engine:
    """Runs a model over `parallel` slots of `n_ctx // parallel` tokens each."""

    def __init__(self, backend: Backend, model: Any, tokenizer: Any, *, n_ctx: int, n_batch: int, parallel: int,
                 multiuser: bool = False, flash: bool = False, kv_type: DType = DType.F16,
                 stall_after_s: float = STALL_FLOOR_S) -> None:
        self.backend, self.model, self.tokenizer = backend, model, tokenizer
        self.parallel = max(1, parallel)
        limit = int(getattr(model, "max_parallel", 0))
        if limit and self.parallel > limit:  # mllama: its encoder cache holds one sequence's image
            log.warning("%s serves at most %d sequence(s) at a time (its encoder cache holds one image): --parallel "
                        "%d reduced to %d", type(model).__name__, limit, self.parallel, limit)
            self.parallel = limit
        self.n_ctx_slot = max(1, n_ctx // self.parallel)
        self.n_batch = max(1, n_batch)
        self.multiuser = multiuser
        self.n_vocab = int(model.params.n_vocab)
        # Embedding-only models (bert) have no KV cache and cannot generate.
        self.can_generate = callable(getattr(model, "new_cache", None))
        self.can_embed = bool(getattr(model, "can_embed", False))
        self.grammars = GrammarCompiler(tokenizer, self.n_vocab)
        # ggml's fused attention kernel is ~25% faster per decode step on the CPU than the unfused path (measured
        # with SmolLM2), so it is used whenever K and V heads match; --flash-attn only adds quantized KV types.
        fused = flash or getattr(model.params, "head_dim_k", 0) == getattr(model.params, "head_dim_v", -1)
        # n_ctx_seq: LongRoPE models (phi3) choose their long or short factors by the context a sequence gets
        self.cache = model.new_cache(flash=fused, n_ctx_seq=self.n_ctx_slot) if self.can_generate else None
        if self.cache is not None:
            self.cache.init(backend, kv_type, self.parallel, self.n_ctx_slot * self.parallel, self.n_batch)
        # Decode steps of one shape reuse the last built graph (runner/forward.py).
        self._forward = ForwardRunner(backend, model, self.cache)
        # An input to embed gets the runner's context, and never more positions than the model was trained on
        # (bert's position table ends there).
        self.n_ctx_embed = min(n_ctx, int(getattr(model.params, "n_ctx_train", 0) or n_ctx))
        self._embeds: deque[tuple[str, Callable[[list[float] | str], None]]] = deque()
        self.slots = [_Slot(i) for i in range(self.parallel)]
        self._incoming: deque[Sequence] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._rr = 0
        self._thread = threading.Thread(target=self._run, name="batch-loop", daemon=True)
        self.error: str | None = None
        self.watch = ComputeWatch(stall_after_s)
        self._failed_forwards = 0  # consecutive whole-batch failures; a few in a row mean the backend is broken
        self._closed = threading.Event()
        failure = getattr(backend, "failure", None)
        self._backend_failure: Callable[[], str | None] | None = failure if callable(failure) else None

    def start(self) -> None:
        """Warm up (see `warm_up`), then run the batch loop. Raises ModelLoadError before anything runs."""
        self.warm_up()
        self._thread.start()
        if self._backend_failure is not None:
            threading.Thread(target=self._watch_backend, name="backend-watch", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.ident is not None and not self._device_failed():  # started, and not parked in ggml
            self._thread.join(timeout=10)
        if not self._thread.is_alive():  # a step still running would use the kept graph
            self._forward.close()
        if self.cache is not None:
            self.cache.close()

    def submit(self, request: CompletionRequest, sink: EventSink, grammar: Constraint | None = None) -> Sequence:
        """Queue a request; events go to `sink` (called from the loop thread). Waits for a free slot in the loop,
        so at most `parallel` sequences run at once and extra ones wait, as the Go runner's semaphore does.
        `grammar`: the request's constraint when the caller compiled it already (the server does, off the loop)."""
        seq = Sequence(request, sink, t_start=time.monotonic(), grammar=grammar)
        if self._device_failed():  # the loop is parked on a dead device: answer here
            _tell_error(seq, str(self.error))
            return seq
        with self._cv:
            self._incoming.append(seq)
            self._cv.notify_all()
        return seq

    def submit_embedding(self, text: str, reply: Callable[[list[float] | str], None]) -> None:
        """Queue an embedding; `reply` gets the pooled (un-normalized) vector, or an error message."""
        if self._device_failed():
            reply(str(self.error))
            return
        with self._cv:
            self._embeds.append((text, reply))
            self._cv.notify_all()

    def warm_up(self) -> None:
        """One short forward pass before the model is called ready, so a file whose numbers make ggml fail or
        produce NaN fails its load with a clear message instead of its first request. Leaves no trace in the
        cache. `start` runs it first.

        Raises:
            ModelLoadError: the pass failed or gave non-finite values.
        """
        bos = getattr(self.tokenizer, "bos_id", None)
        ids = [bos if isinstance(bos, int) and 0 <= bos < self.n_vocab else 0] + [min(1, self.n_vocab - 1)] * 3
        try:
            if self.cache is not None:
                batch = Batch.single(ids[:min(len(ids), self.n_ctx_slot)])
                try:
                    values = self._run_forward(batch)
                finally:
                    self._kv().remove(0, 0, None)
            else:
                values = self._embed_tokens(ids)
        except Exception as e:
            raise ModelLoadError(f"the model failed its first forward pass: {type(e).__name__}: {e}") from e
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise ModelLoadError(f"the model's first forward pass gave {bad} non-finite values of {values.size}: "
                                 "the file's weights or hyper-parameters are broken")

    def health_error(self) -> str | None:
        """Why /health must say error: the backend failed for good, or a forward pass is stuck."""
        return self.error or self.watch.stalled()

    def _device_failed(self) -> bool:
        return self.error is not None and self._backend_failure is not None and self._backend_failure() is not None

    def _watch_backend(self) -> None:
        """A device the backend relies on failed for good (an RPC host died): the loop thread is parked inside
        ggml and will never return, so the running and waiting requests are ended from here, and /health says
        error from now on (the Go server then restarts the runner)."""
        assert self._backend_failure is not None
        while not self._closed.wait(FAILURE_POLL_S):
            reason = self._backend_failure()
            if reason is None:
                continue
            self.error = error = f"a device failed: {reason}"
            log.error("%s; ending all requests", error)
            with self._cv:
                waiting = list(self._incoming)
                self._incoming.clear()
                embeds = list(self._embeds)
                self._embeds.clear()
            for seq in self._active() + waiting:
                seq.cancelled = True
                _tell_error(seq, error)
            for _, reply in embeds:
                reply(error)
            return

    # ---- the loop ----
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._incoming and not self._embeds and not self._active():
                    self._cv.wait()
                if self._stop:
                    return
            try:
                self._embed_pending()
                self._admit()
                self._step()
            except Exception as e:  # a bug outside any one sequence: end the running ones, keep serving
                log.exception("batch loop step failed")
                for s in self.slots:
                    if s.seq is not None:
                        self._fail(s, s.seq, f"{type(e).__name__}: {e}", drop_cache=True)

    def _active(self) -> list[Sequence]:
        return [s.seq for s in self.slots if s.seq is not None]

    def _admit(self) -> None:
        """Move waiting requests into free slots (longest-prefix or multi-user policy)."""
        while True:
            with self._cv:
                if not self._incoming or all(s.seq is not None for s in self.slots):
                    return
                seq = self._incoming.popleft()
            if seq.cancelled:
                continue
            try:
                self._place(seq)
            except Exception as e:  # a bad request fails alone
                log.warning("request failed: %s", e)
                _tell_error(seq, str(e))

    def _embed_pending(self) -> None:
        """Embeddings run between generation steps, one forward each, so completions keep streaming."""
        while True:
            with self._cv:
                if not self._embeds:
                    return
                text, reply = self._embeds.popleft()
            try:
                tokens = self.tokenizer.encode(text, add_special=True, parse_special=False)
                if not tokens:  # no BOS/CLS to stand in for an empty text: nothing to pool
                    raise ValueError("the input is empty after tokenization")
                if len(tokens) > self.n_ctx_embed:  # too long: keep the head, as llama.cpp truncates
                    tokens = tokens[:self.n_ctx_embed]
                reply([float(v) for v in self._embed_tokens(tokens).reshape(-1)])
            except Exception as e:  # one bad input fails alone
                log.warning("embedding failed: %s", e)
                reply(f"{type(e).__name__}: {e}")

    def _embed_tokens(self, tokens: list[int]) -> np.ndarray[Any, Any]:
        """The model's pooled embedding of one sequence of tokens (one forward, no KV cache)."""
        ctx = self.backend.new_context()
        try:
            out = self.model.embed(ctx, Batch.single(tokens))
            ctx.forward(out).compute(out)
            values: np.ndarray[Any, Any] = out.numpy()
            return values
        finally:
            ctx.close()

    def _place(self, seq: Sequence) -> None:
        req = seq.request
        if self.cache is None:
            raise ValueError("this model does not support generation")
        if req.tokens is None and images.can_see(self.model):
            tokens, seq.image_rows = images.prompt_inputs(self.model, self.backend, self.tokenizer, req)
        else:
            tokens = (list(req.tokens) if req.tokens is not None
                      else self.tokenizer.encode(req.prompt, add_special=True, parse_special=True))
        if not tokens:
            raise ValueError("prompt is empty after tokenization")
        if seq.grammar is None:
            seq.grammar = self.grammars.compile(req)
        seq.num_keep = effective_num_keep(req.num_keep, len(tokens), self.n_ctx_slot)
        tokens = truncate_prompt(tokens, self.n_ctx_slot, seq.num_keep,
                                 dict(images.same_batch(tokens, seq.image_rows)))
        seq.tokens, seq.n_prompt = tokens, len(tokens)
        states = [SlotState(s.id, s.inputs, s.seq is not None, s.last_used) for s in self.slots]
        choice = choose_slot(tokens, states, self.multiuser)
        slot = self.slots[choice.slot]
        n_past = choice.n_past
        if choice.fork_from is not None:
            self._kv().remove(slot.id, 0, None)
            self._kv().copy_prefix(choice.fork_from, slot.id, choice.n_fork)
            slot.inputs = list(self.slots[choice.fork_from].inputs[:choice.n_fork])
        if n_past and not self._kv().can_resume(slot.id, n_past):
            n_past = 0  # the sliding window that resuming needs is gone
        self._kv().remove(slot.id, n_past, None)
        slot.inputs = slot.inputs[:n_past]
        slot.seq, slot.last_used = seq, time.monotonic()
        seq.slot, seq.n_past, seq.n_cached, seq.pending = slot.id, n_past, n_past, tokens[n_past:]
        history = [t for t in tokens if t >= 0] if req.sampling.repeat_last_n else ()
        seq.sampler = Sampler(req.sampling, n_ctx=self.n_ctx_slot, history=history)
        seq.stops = encode_stops(req.stop)
        log.debug("seq placed: slot=%d prompt=%d cached=%d", slot.id, len(tokens), n_past)

    def _step(self) -> None:
        for s in self.slots:  # cancellation frees the slot at once
            if s.seq is not None and s.seq.cancelled:
                s.seq = None
        table: list[SeqState | None] = [self._seq_state(s) if s.seq is not None else None for s in self.slots]
        if not any(table):
            return
        step = schedule(table, self.n_batch, self.n_ctx_slot, self._rr)
        # Rotate the starting sequence so none starves (the scheduler moves it to whoever got nothing).
        self._rr = step.next_start if step.next_start != self._rr else (self._rr + 1) % len(self.slots)
        if not step.chunks:
            return
        tokens: list[int] = []
        rows: dict[int, images.ImageRow] = {}
        for c in step.chunks:
            slot = self.slots[c.slot]
            seq = slot.seq
            assert seq is not None
            if c.shift is not None and c.shift.discard:
                try:
                    self._shift(slot, c.shift.keep, c.shift.discard)
                except Exception as e:  # this sequence's shift failed: end it; the rest are scheduled anew
                    self._fail(slot, seq, f"context shift failed: {e}", drop_cache=True)
                    return
            tokens.extend(seq.pending[:c.n_inputs])
            rows.update(seq.image_rows)
        positions = np.asarray(step.positions(), dtype=np.int32)
        batch = images.batch(tokens, positions, np.asarray(step.slots(), dtype=np.int32),
                             np.asarray(step.outputs, dtype=np.int32), rows)
        try:
            logits = self._run_forward(batch)
        except Exception as e:  # the whole pass failed: its sequences end, the runner keeps serving
            log.exception("forward pass failed")
            self._forward_failed(f"{type(e).__name__}: {e}", {c.slot for c in step.chunks})
            return
        now = time.monotonic()
        for c in step.chunks:
            slot = self.slots[c.slot]
            seq = slot.seq
            assert seq is not None
            slot.inputs.extend(seq.pending[:c.n_inputs])
            seq.n_past += c.n_inputs
            seq.pending = seq.pending[c.n_inputs:]
            slot.last_used = now
            if c.output is not None:
                try:
                    self._sample(slot, seq, logits[c.output], now)
                except Exception as e:  # sampling, stop strings or detokenizing failed: this sequence alone ends
                    log.warning("sequence in slot %d failed: %s", slot.id, e)
                    self._fail(slot, seq, str(e))

    def _seq_state(self, slot: _Slot) -> SeqState:
        seq = slot.seq
        assert seq is not None
        shift_may_come = bool(seq.image_rows) and seq.n_past + len(seq.pending) > self.n_ctx_slot
        return SeqState(slot=slot.id, n_cached=seq.n_past, n_pending=len(seq.pending), num_keep=seq.num_keep,
                        same_batch=images.same_batch(seq.pending, seq.image_rows),
                        cached_groups=images.same_batch(slot.inputs, seq.image_rows) if shift_may_come else ())

    def _run_forward(self, batch: Batch) -> np.ndarray[Any, Any]:
        """Logits [n_outputs, n_vocab] of one forward pass (a kept graph where it fits), timed for the stall
        watch."""
        self.watch.begin(len(batch.tokens))
        try:
            # a view of the backend's output: every row is sampled before the next forward
            logits: np.ndarray[Any, Any] = self._forward.logits(batch, copy=False)
        finally:
            self.watch.end()
        self._failed_forwards = 0
        return logits

    def _forward_failed(self, message: str, slots: set[int]) -> None:
        """End the batch's sequences and forget what they had cached (the failed pass may have written part of
        it). Several failures in a row mean the backend itself is broken: /health then says so, and the Go server
        restarts the runner."""
        self._failed_forwards += 1
        if self._failed_forwards >= MAX_FAILED_FORWARDS:
            self.error = f"{MAX_FAILED_FORWARDS} forward passes failed in a row; last: {message}"
        for i in slots:
            slot = self.slots[i]
            if slot.seq is not None:
                self._fail(slot, slot.seq, message, drop_cache=True)

    def _fail(self, slot: _Slot, seq: Sequence, message: str, drop_cache: bool = False) -> None:
        """End one sequence with an error and free its slot. `drop_cache` also forgets the slot's cached inputs,
        for failures that may have left its KV cells half-written."""
        if slot.seq is seq:
            slot.seq = None
        slot.last_used = time.monotonic()
        if drop_cache:
            slot.inputs = []
            try:
                self._kv().remove(slot.id, 0, None)
            except Exception:  # the cache keeps whatever it had; the empty input list never matches a prefix
                log.exception("could not clear slot %d", slot.id)
        _tell_error(seq, message)

    def _shift(self, slot: _Slot, keep: int, discard: int) -> None:
        """Context shift: drop inputs [keep, keep+discard) and slide the rest down (keys re-rotated)."""
        seq = slot.seq
        assert seq is not None
        self._kv().remove(slot.id, keep, keep + discard)
        slot.inputs = slot.inputs[:keep] + slot.inputs[keep + discard:]
        seq.n_past -= discard
        log.debug("context shift: slot=%d keep=%d discard=%d", slot.id, keep, discard)

    def _kv(self) -> Any:
        assert self.cache is not None, "generation on a model without a KV cache"
        return self.cache

    def _sample(self, slot: _Slot, seq: Sequence, row: np.ndarray[Any, Any], now: float) -> None:
        assert seq.sampler is not None
        if seq.cancelled:
            slot.seq = None
            return
        if seq.n_generated == 0:
            seq.t_first = now
        if seq.grammar is None:
            token = seq.sampler.sample(row)
        else:
            token = seq.grammar.sample(seq.sampler, row)  # a dead end raises GrammarError: _step ends this sequence
        seq.sampler.accept(token)
        seq.n_generated += 1
        if self.tokenizer.is_eog(token):
            self._finish(slot, seq, DoneReason.STOP)
            return
        seq.pieces.append(self.tokenizer.token_bytes(token))
        seq.piece_tokens.append(token)
        if seq.request.n_probs > 0:  # from the same row the sampler saw
            seq.piece_probs.append(token_probs(row, token, seq.request.n_probs))
        decision = check_pending(seq.pieces, seq.stops)
        if decision.action == Action.STOP:
            if decision.text:  # only the pieces sent whole report their tokens
                seq.sink(self._pieces_event(seq, decision.text, decision.n_full))
            # The slot keeps only what was returned: drop the tokens of the cut/stopping pieces.
            n_drop = len(seq.pieces) - decision.n_full - 1  # the newest token is not cached yet
            if n_drop > 0:
                keep = len(slot.inputs) - n_drop
                self._kv().remove(slot.id, keep, None)
                slot.inputs = slot.inputs[:keep]
            seq.pieces, seq.piece_tokens, seq.piece_probs = [], [], []
            self._finish(slot, seq, DoneReason.STOP, decision.stop)
            return
        if decision.action == Action.SEND:
            if decision.text:
                seq.sink(self._pieces_event(seq, decision.text, len(seq.pieces)))
            seq.pieces, seq.piece_tokens, seq.piece_probs = [], [], []
        limit = seq.request.num_predict
        if limit > 0 and seq.n_generated >= limit:
            self._finish(slot, seq, DoneReason.LENGTH)
            return
        seq.pending = [token]

    @staticmethod
    def _pieces_event(seq: Sequence, text: str, n: int) -> Event:
        """The event for `text`, made of the first `n` pending pieces."""
        return Event(text=text, tokens=tuple(seq.piece_tokens[:n]), probs=tuple(seq.piece_probs[:n]))

    def _finish(self, slot: _Slot, seq: Sequence, reason: DoneReason, stop_word: str = "") -> None:
        rest = flush_pending(seq.pieces)
        if rest:
            seq.sink(self._pieces_event(seq, rest, len(seq.pieces)))
        seq.pieces, seq.piece_tokens, seq.piece_probs = [], [], []
        now = time.monotonic()
        metrics = Metrics(prompt_eval_count=seq.n_prompt,
                          prompt_eval_duration_ns=int((seq.t_first - seq.t_start) * 1e9),
                          eval_count=seq.n_generated, eval_duration_ns=int((now - seq.t_first) * 1e9),
                          cache_n=seq.n_cached)
        seq.sink(Event(done=reason, metrics=metrics, stop_word=stop_word))
        slot.seq = None
        slot.last_used = now
