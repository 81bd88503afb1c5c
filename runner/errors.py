"""Errors raised by the runner's pure modules (flags, protocol, text, sampling, scheduling).

These modules must not import `ml`, so they keep their own small hierarchy; the HTTP layer maps them to status
codes (runner-protocol.md §2.2: RequestError -> 400 `Bad request`, the others -> 500 with the Go wording).
"""
from __future__ import annotations


class RequestError(ValueError):
    """A request body could not be decoded (bad JSON, wrong type for a field, bad base64)."""


class SequenceError(ValueError):
    """A sequence cannot be built from a valid request (e.g. the entire prompt removed by truncation)."""


class SlotUnavailableError(RuntimeError):
    """No free KV cache slot is left (the Go runner answers 500 `Failed to load cache: …`)."""


class SamplingError(RuntimeError):
    """The logits cannot be sampled (NaN logits or probabilities, no finite logit): ends that one sequence (the Go
    runner panics; this runner keeps serving the others)."""


class GrammarError(ValueError):
    """A request's grammar or format cannot be used (does not parse, no usable vocabulary), or a constrained
    sequence reached a point where no token is allowed. Fails that request or sequence only."""
