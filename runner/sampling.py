"""Token sampling on numpy: penalties, greedy, top-k, temperature, softmax, top-p, min-p, seeded draw.

Mirrors Ollama's new-engine sampler pipeline (runner-protocol.md §4.11) plus llama.cpp's repetition penalties,
which the llama engine honoured. Everything is vectorised over the vocabulary; probabilities are float32 and the
running sums are sequential (np.cumsum), as in Go, so boundary cases of top-p behave like the Go loop.
Hostile but well-typed values never break it (runner-protocol.md: every option arrives as a finite float32):
penalties that overflow float32 are recomputed in float64 and clipped to the finite float32 range, and a scaled
row whose largest logit overflows is clipped the same way, so softmax never sees inf - inf. NaN logits (a broken
model) and a row with no finite logit raise SamplingError, which ends that one sequence.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ggml.host import SAMPLE_MAX_K, sample_top_k
from runner.errors import SamplingError

_MIN_TEMPERATURE = 1e-7  # Go divides by max(temp, 1e-7) so a tiny temperature is "almost greedy", not a crash
_U64 = (1 << 64) - 1
_FIRST_WINDOW = 64  # tokens sorted first when there is no top-k; grows ×8 until top-p/min-p cut inside it
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True, slots=True)
class SamplerParams:
    """Sampling parameters of one request (already decoded and typed by runner.protocol).

    temperature <= 0 means greedy. top_k <= 0 (or >= vocabulary) keeps every token. top_p >= 1 and min_p <= 0 are
    no-ops. seed None or -1 draws from OS entropy. repeat_last_n: 0 disables penalties, -1 means the whole context
    (n_ctx of the Sampler). repeat_penalty <= 0 is treated as 1 (off): a P2/P3 request that omits it sends 0.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repeat_last_n: int = 0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True, slots=True)
class TokenProbs:
    """A generated token's log-probability and the `n` likeliest tokens' (id, log-probability), likeliest first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


_LOGPROB_FLOOR = -9999.0  # what a token of no probability reports (JSON has no -inf); OpenAI's own floor


def token_probs(logits: npt.NDArray[Any], token: int, n: int) -> TokenProbs:
    """Log-probabilities from the softmax of the raw logits, before penalties, temperature and truncation, as
    llama-server reports n_probs (without post_sampling_probs). float64; ties keep the lower id first."""
    x = np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(x)
    top = float(x[finite].max()) if finite.any() else 0.0
    logp = x - (top + math.log(float(np.exp(x[finite] - top).sum()) or 1.0))
    logp = np.where(np.isnan(logp), -np.inf, logp)
    n = max(0, min(n, logp.size))
    order = np.zeros(0, dtype=np.int64)
    if n:  # the n-th largest value bounds the candidates (every tie included), then only those are sorted
        cut = np.partition(logp, logp.size - n)[logp.size - n]
        cand = np.flatnonzero(logp >= cut)
        order = cand[np.lexsort((cand, -logp[cand]))][:n]

    def value(i: int) -> float:
        v = float(logp[i])
        return v if v > _LOGPROB_FLOOR else _LOGPROB_FLOOR
    return TokenProbs(token, value(token), tuple((int(i), value(int(i))) for i in order))


def _window(repeat_last_n: int, n_ctx: int) -> int:
    # llama.cpp: -1 means n_ctx; any other negative value is clamped to 0 (off).
    if repeat_last_n == -1:
        return max(n_ctx, 0)
    return max(repeat_last_n, 0)


def make_generator(seed: int | None) -> np.random.Generator:
    """A generator for `seed`; None or -1 gives a nondeterministic one. Negative seeds wrap to uint64 as in Go."""
    if seed is None or seed == -1:
        return np.random.default_rng()
    return np.random.default_rng(seed & _U64)


def apply_penalties(logits: npt.NDArray[np.float32], history: npt.NDArray[np.int64], repeat_penalty: float,
                    presence_penalty: float, frequency_penalty: float) -> None:
    """Penalise, in place, the logits of tokens seen in `history` (llama.cpp semantics).

    A seen token's logit is divided by repeat_penalty when positive and multiplied by it otherwise, then
    reduced by count × frequency_penalty + presence_penalty. Token ids outside the vocabulary are ignored.
    """
    if history.size == 0:
        return
    ids, counts = np.unique(history, return_counts=True)
    if ids[0] < 0 or ids[-1] >= logits.shape[0]:  # sorted: the ends tell
        keep = (ids >= 0) & (ids < logits.shape[0])
        ids, counts = ids[keep], counts[keep]
    vals = logits[ids]
    rp = np.float32(repeat_penalty)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        out = np.where(vals <= 0, vals * rp, vals / rp)
        if frequency_penalty != 0.0 or presence_penalty != 0.0:  # the usual request has a repeat penalty only
            out = out - (counts.astype(np.float32) * np.float32(frequency_penalty) + np.float32(presence_penalty))
    if not np.isfinite(out).all():
        # Extreme penalties (e.g. repeat_penalty 1e-45, presence ±3.4e38) overflow float32 and can make inf - inf:
        # redo these few values in float64, where nothing overflows, and clip back into the finite float32 range
        # (a -inf logit stays banned: only finite inputs are clipped).
        wide = vals.astype(np.float64)
        wide = np.where(wide <= 0, wide * float(rp), wide / float(rp))
        wide = wide - (counts * float(np.float32(frequency_penalty)) + float(np.float32(presence_penalty)))
        out = np.where(np.isfinite(vals), np.clip(wide, -_F32_MAX, _F32_MAX), vals)
    logits[ids] = out.astype(np.float32)


def top_k_sorted(logits: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
    """Ids of the k largest logits, sorted by logit descending, ties by ascending id; k <= 0 or >= n: all."""
    n = logits.shape[0]
    if k <= 0 or k >= n:
        return np.lexsort((np.arange(n), -logits))
    cand = _at_least_kth(logits, k)
    if cand is not None:
        # every logit >= the k-th largest is a candidate, so sorting them (value down, id up) and keeping k gives
        # exactly the ids below: the larger ones, then the lowest ids among those tied at the cut
        return cand[np.lexsort((cand, -logits[cand]))][:k]
    return _top_k_by_partition(logits, k)


_STRIDE = 8  # every 8th logit estimates where the top k begin
_SMALL_ROW = 4096  # below this a full partition is as cheap


def _at_least_kth(logits: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64] | None:
    """Ids of a small superset of the k largest logits: every logit at or above a cut taken from a strided sample,
    where about 4k logits are expected; None when the cut let fewer than k through (then nothing is known).
    A full argpartition of a 50k vocabulary costs ~100 µs per sampled token; this ~20 µs."""
    n = logits.shape[0]
    if n < _SMALL_ROW or k * _STRIDE > n:
        return None
    sample = logits[::_STRIDE]
    j = max(1, k // 2)
    cut = np.partition(sample, sample.size - j)[sample.size - j]
    if not np.isfinite(cut):  # a row mostly -inf (a grammar's mask): the cut would let everything through
        return None
    cand = np.flatnonzero(logits >= cut)
    # fewer than k: nothing is known; a quarter of the row or more (massive ties): sorting them costs more than
    # the partition
    return cand if k <= cand.size <= n // 4 else None


def _top_k_by_partition(logits: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
    part = np.argpartition(-logits, k - 1)[:k]
    kth = logits[part].min()
    above = np.flatnonzero(logits > kth)
    ties = np.flatnonzero(logits == kth)[: k - above.size]  # deterministic: lowest ids win ties at the cut
    sel = np.concatenate([above, ties])
    return sel[np.lexsort((sel, -logits[sel]))]


def softmax(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Max-subtracted softmax in float32 with a sequential sum (as the Go loop adds)."""
    with np.errstate(invalid="ignore"):  # inf - inf gives NaN, which the caller reports
        e = np.exp(x.astype(np.float64) - np.max(x)).astype(np.float32)
    total = np.cumsum(e, dtype=np.float32)[-1]
    probs: npt.NDArray[np.float32] = (e / total).astype(np.float32)
    return probs


def top_p_cut(probs: npt.NDArray[np.float32], p: float) -> int:
    """How many of the (descending) probabilities top-p keeps: through the first one where the sum exceeds p.

    p >= 1 keeps everything; if the sum never exceeds p (rounding), everything is kept.
    """
    if p >= 1.0:
        return int(probs.size)
    over = np.cumsum(probs, dtype=np.float32) > np.float32(p)
    return int(np.argmax(over)) + 1 if over.any() else int(probs.size)


def min_p_mask(probs: npt.NDArray[np.float32], p: float) -> npt.NDArray[np.bool_]:
    """Tokens whose probability is at least p × the largest probability."""
    keep: npt.NDArray[np.bool_] = probs >= probs.max() * np.float32(p)
    return keep


def draw(probs: npt.NDArray[np.float32], r: float) -> int:
    """Index of the first cumulative probability >= r × total (probabilities are not renormalised)."""
    cum = np.cumsum(probs, dtype=np.float32)
    target = np.float32(r) * cum[-1]
    return min(int(np.searchsorted(cum, target, side="left")), probs.size - 1)


def _check(probs: npt.NDArray[np.float32], top_k: int, temperature: float) -> None:
    if np.isnan(probs).any():  # all -inf, or +inf logits
        raise SamplingError(f"sampling failed: NaN probabilities (top_k={top_k}, temperature={temperature})")


def _scaled(row: npt.NDArray[np.float32], scale: np.float32, top: np.float32) -> npt.NDArray[np.float32]:
    """row / scale in float32; `top` is the row's largest value, so an overflow (a tiny temperature over a large
    logit) is seen without another pass. Then (row - top) / scale runs in float64, the same distribution after
    softmax, and is clipped to the finite float32 range: the best token stays on top, softmax never meets inf - inf."""
    if float(top) / float(scale) <= _F32_MAX:
        with np.errstate(over="ignore"):  # the smallest logits may still overflow to -inf, which is harmless
            out: npt.NDArray[np.float32] = row / scale
        return out
    return np.clip((row.astype(np.float64) - float(top)) / float(scale), -_F32_MAX, _F32_MAX).astype(np.float32)


def candidates(row: npt.NDArray[np.float32], top_k: int, temperature: float, top_p: float,
               min_p: float) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The tokens that survive top-k -> temperature -> softmax -> top-p -> min-p, with their probabilities,
    in descending order (§4.11 steps 2–6). temperature must be > 0.

    Without a top-k the softmax covers the whole vocabulary, but only a growing window of the best tokens is
    sorted, until top-p or min-p is known to cut inside it: the same result as sorting everything, far cheaper
    for a large vocabulary. When nothing filters at all, the tokens are returned unsorted (in id order).

    Raises:
        SamplingError: NaN probabilities.
    """
    n = row.size
    scale = np.float32(max(temperature, _MIN_TEMPERATURE))
    if 0 < top_k < n:
        ids = top_k_sorted(row, top_k)
        return top_k_candidates(ids, row[ids], temperature, top_p, min_p)
    else:
        all_probs = softmax(_scaled(row, scale, np.max(row)))
        _check(all_probs, top_k, temperature)
        if top_p >= 1.0 and min_p <= 0.0:
            return np.arange(n, dtype=np.int64), all_probs
        m = min(n, _FIRST_WINDOW)
        while True:
            ids = top_k_sorted(row, m)
            probs = all_probs[ids]
            if (m == n or (top_p < 1.0 and np.cumsum(probs, dtype=np.float32)[-1] > np.float32(top_p))
                    or (min_p > 0.0 and probs[-1] < probs[0] * np.float32(min_p))):
                break
            m = min(n, m * 8)
    return _cut(ids, probs, top_p, min_p)


def top_k_candidates(ids: npt.NDArray[np.int64], values: npt.NDArray[np.float32], temperature: float, top_p: float,
                     min_p: float) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """`candidates` from its top-k on: `ids` the k best tokens in order, `values` their logits."""
    probs = softmax(_scaled(values, np.float32(max(temperature, _MIN_TEMPERATURE)), values[0]))
    _check(probs, ids.size, temperature)
    return _cut(ids, probs, top_p, min_p)


def _cut(ids: npt.NDArray[np.int64], probs: npt.NDArray[np.float32], top_p: float,
         min_p: float) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """top-p, then min-p, over candidates in descending order."""
    cut = top_p_cut(probs, top_p)
    ids, probs = ids[:cut], probs[:cut]
    keep = min_p_mask(probs, min_p)
    return ids[keep], probs[keep]


class Sampler:
    """Samples one token per call from a logits row, with a private generator and a penalty history.

    The caller feeds every token that should count for the penalties through `accept` (the prompt too, if
    wanted: the llama engine primed its sampler with the prompt) or passes them as `history`.
    """

    def __init__(self, params: SamplerParams, *, n_ctx: int = 0, history: Iterable[int] = ()) -> None:
        """Args: params: the request's parameters; n_ctx: context length used when repeat_last_n is -1."""
        self._params = params
        self._temperature = max(params.temperature, 0.0)
        self._top_p = min(max(params.top_p, 0.0), 1.0)
        self._min_p = min(max(params.min_p, 0.0), 1.0)
        self._rng = make_generator(params.seed)
        window = _window(params.repeat_last_n, n_ctx)
        repeat = params.repeat_penalty if params.repeat_penalty > 0 else 1.0
        self._repeat_penalty = repeat
        self._use_penalties = window > 0 and (
            repeat != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0)
        self._history: deque[int] = deque(maxlen=window if self._use_penalties else 0)
        self._seen: npt.NDArray[np.uint8] | None = None
        for token in history:
            self.accept(token)

    @property
    def params(self) -> SamplerParams:
        """The parameters this sampler was built with."""
        return self._params

    @property
    def history(self) -> tuple[int, ...]:
        """The tokens the penalties currently look at, oldest first (empty when penalties are off)."""
        return tuple(self._history)

    def _scratch(self, n: int) -> npt.NDArray[np.uint8]:
        """n zero bytes for sample_top_k's marks (kept: a vocabulary's worth, allocated once)."""
        if self._seen is None or self._seen.size < n:
            self._seen = np.zeros(n, dtype=np.uint8)
        return self._seen

    def accept(self, token: int) -> None:
        """Record a token for the repetition penalties (a no-op when they are off)."""
        if self._use_penalties:
            self._history.append(int(token))

    def sample(self, logits: npt.NDArray[Any]) -> int:
        """Pick the next token id from one row of logits (shape [n_vocab]); the input is not modified.

        Raises:
            SamplingError: NaN logits, or NaN probabilities (all -inf, or +inf logits).
        """
        row = np.ascontiguousarray(np.asarray(logits, dtype=np.float32).reshape(-1))
        penalties = bool(self._use_penalties and self._history)
        if self._temperature == 0.0 and not penalties:
            # Greedy: one pass over the row. argmax stops at the first NaN and finds the first +inf, so the value
            # at its index tells whether the row needs the checks below; a plain row's answer is that index.
            best = int(np.argmax(row))
            if math.isfinite(row[best]) or row[best] == -np.inf:
                return best
        k = 1 if self._temperature == 0.0 else self._params.top_k
        if 0 < k < row.size and k <= SAMPLE_MAX_K:
            # The usual request (a top-k, penalties or not; or greedy with penalties): penalties and top-k in one
            # pass in C, the row neither checked nor copied separately. A NaN or +inf takes the general path.
            # (the history is empty when the penalties are off)
            picked = sample_top_k(row, np.fromiter(self._history, dtype=np.int64, count=len(self._history)),
                                  self._repeat_penalty, self._params.presence_penalty,
                                  self._params.frequency_penalty, k, self._scratch(row.size))
            if picked is not None:
                if self._temperature == 0.0:
                    return int(picked[0][0])
                ids, probs = top_k_candidates(*picked, self._temperature, self._top_p, self._min_p)
                return int(ids[draw(probs, float(self._rng.random(dtype=np.float32)))])
        top = row.max()  # NaN if any is (the maximum propagates NaN), +inf if any is: one pass checks both
        if np.isnan(top):
            raise SamplingError(f"sampling failed: NaN in logits ({int(np.isnan(row).sum())} of {row.size})")
        if top == np.inf:  # an overflowing model: treat +inf as the largest finite logit
            row = np.where(np.isposinf(row), np.float32(_F32_MAX), row)
        if penalties:
            row = row.copy()
            apply_penalties(row, np.fromiter(self._history, dtype=np.int64, count=len(self._history)),
                            self._repeat_penalty, self._params.presence_penalty, self._params.frequency_penalty)
        if self._temperature == 0.0:
            return int(np.argmax(row))  # first maximum wins; nothing else applies (all -inf: 0, as in Go)
        ids, probs = candidates(row, self._params.top_k, self._temperature, self._top_p, self._min_p)
        return int(ids[draw(probs, float(self._rng.random(dtype=np.float32)))])
