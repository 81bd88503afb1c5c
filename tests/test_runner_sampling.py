"""runner.sampling: the sampler pipeline on hand-made logits (runner-protocol.md §4.11; penalties as llama.cpp)."""
from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from ggml.host import sample_top_k
from runner.errors import SamplingError
from runner.sampling import (Sampler, SamplerParams, apply_penalties, candidates, draw, min_p_mask, softmax,
                             top_k_sorted, top_p_cut)


def arr(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


@pytest.mark.parametrize(("logits", "k", "expected"), [
    pytest.param([1, 3, 3, 2, 0], 2, [1, 2], id="k2"),
    pytest.param([1, 3, 3, 2, 0], 3, [1, 2, 3], id="k3"),
    pytest.param([1, 3, 3, 2, 0], 0, [1, 2, 3, 0, 4], id="k0-all-sorted"),
    pytest.param([1, 3, 3, 2, 0], -1, [1, 2, 3, 0, 4], id="negative-all"),
    pytest.param([1, 3, 3, 2, 0], 5, [1, 2, 3, 0, 4], id="k-equals-vocab"),
    pytest.param([1, 3, 3, 2, 0], 99, [1, 2, 3, 0, 4], id="k-above-vocab"),
    pytest.param([5, 1, 1, 1], 2, [0, 1], id="ties-at-cut-lowest-id"),
    pytest.param([-np.inf, 0, -np.inf], 2, [1, 0], id="neg-inf"),
])
def test_top_k_sorted(logits: list[float], k: int, expected: list[int]) -> None:
    assert top_k_sorted(arr(*logits), k).tolist() == expected


def test_top_k_of_a_large_vocabulary_equals_a_full_sort() -> None:
    """On vocabulary-sized rows top_k_sorted takes its cut from a strided sample; whatever the row (smooth, heavy
    ties, coarse values, mostly -inf as under a grammar, a pattern aligned with the stride), its ids equal those of
    a full stable sort by value descending."""
    g = np.random.default_rng(3)
    n = 49152
    rows = {
        "normal": g.standard_normal(n),
        "coarse": np.round(g.standard_normal(n) * 2),  # thousands of ties everywhere
        "few-allowed": np.where(g.random(n) < 0.002, g.standard_normal(n), -np.inf),
        "all-equal": np.zeros(n),
        "stride-pattern": np.where(np.arange(n) % 8 == 0, -1.0, g.standard_normal(n)),
        "one-spike": np.where(np.arange(n) == 777, 50.0, g.standard_normal(n) * 0.01),
    }
    for name, values in rows.items():
        row = values.astype(np.float32)
        full = np.lexsort((np.arange(n), -row))
        for k in (1, 2, 40, 100, 1000):
            assert top_k_sorted(row, k).tolist() == full[:k].tolist(), (name, k)


def test_softmax() -> None:
    np.testing.assert_allclose(softmax(arr(0, 0)), [0.5, 0.5])
    np.testing.assert_allclose(softmax(arr(math.log(3), 0, 1000 - 1000)), [0.6, 0.2, 0.2], rtol=1e-6)
    np.testing.assert_allclose(softmax(arr(1000, 1000)), [0.5, 0.5])  # max-subtracted: no overflow
    assert softmax(arr(1, 2)).dtype == np.float32


@pytest.mark.parametrize(("p", "expected"), [
    pytest.param(0.5, 2, id="sum-equal-p-not-exceeding-includes-next"),
    pytest.param(0.49, 1, id="first-exceeds"),
    pytest.param(0.74, 2, id="second-exceeds"),
    pytest.param(0.75, 3, id="equal-then-third"),
    pytest.param(0.0, 1, id="zero-top-token-only"),
    pytest.param(1.0, 3, id="one-no-op"),
    pytest.param(0.99, 3, id="all"),
])
def test_top_p_cut(p: float, expected: int) -> None:
    # §4.11 step 5: keep up to and including the token where the running sum first exceeds p
    assert top_p_cut(arr(0.5, 0.25, 0.25), p) == expected


def test_top_p_never_exceeded_keeps_all() -> None:
    assert top_p_cut(arr(0.25, 0.25), 0.9) == 2  # sums to 0.5 only (not renormalised)


@pytest.mark.parametrize(("p", "expected"), [
    (0.5, [True, True, False, False]), (0.25, [True, True, True, True]), (0.0, [True] * 4),
    (1.0, [True, False, False, False]), (0.51, [True, False, False, False]),
])
def test_min_p_mask(p: float, expected: list[bool]) -> None:
    # §4.11 step 6: drop tokens with probability < p × top probability (equal survives)
    assert min_p_mask(arr(0.5, 0.25, 0.125, 0.125), p).tolist() == expected


@pytest.mark.parametrize(("probs", "r", "expected"), [
    ([0.5, 0.25, 0.25], 0.0, 0), ([0.5, 0.25, 0.25], 0.5, 0), ([0.5, 0.25, 0.25], 0.6, 1),
    ([0.5, 0.25, 0.25], 0.75, 1), ([0.5, 0.25, 0.25], 0.99, 2),
    ([0.25, 0.25], 0.5, 0), ([0.25, 0.25], 0.75, 1),  # r scales by the remaining sum (0.5), §4.11 step 7
])
def test_draw(probs: list[float], r: float, expected: int) -> None:
    assert draw(arr(*probs), r) == expected


def test_apply_penalties_math() -> None:
    # llama.cpp: seen tokens: logit > 0 divided by repeat, else multiplied; then - count*freq - presence
    logits = arr(2, -2, 1, 0.5, 0)
    history = np.array([0, 1, 0, 3, 4, 10, -1], dtype=np.int64)  # 10 and -1 are outside the vocabulary
    apply_penalties(logits, history, repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    np.testing.assert_allclose(logits, [2 / 2 - (2 * 0.25 + 0.5), -2 * 2 - 0.75, 1.0, 0.5 / 2 - 0.75, 0 - 0.75])


def test_apply_penalties_empty_history() -> None:
    logits = arr(1, 2)
    apply_penalties(logits, np.array([], dtype=np.int64), 2.0, 1.0, 1.0)
    assert logits.tolist() == [1, 2]


@pytest.mark.parametrize(("logits", "temperature", "expected"), [
    pytest.param([1, 3, 3, 2], 0.0, 1, id="first-max-wins"),
    pytest.param([1, 3, 3, 2], -1.0, 1, id="negative-temperature-is-greedy"),
    pytest.param([-np.inf, -np.inf], 0.0, 0, id="all-neg-inf-greedy"),
])
def test_greedy(logits: list[float], temperature: float, expected: int) -> None:
    assert Sampler(SamplerParams(temperature=temperature, seed=1)).sample(arr(*logits)) == expected


@pytest.mark.parametrize(("params", "history", "n_ctx", "expected"), [
    pytest.param(SamplerParams(repeat_last_n=64, repeat_penalty=2.0), [0], 0, 2, id="penalty-flips-greedy"),
    pytest.param(SamplerParams(repeat_last_n=1, repeat_penalty=2.0), [0, 1], 0, 0, id="window-1"),
    pytest.param(SamplerParams(repeat_last_n=2, repeat_penalty=2.0), [0, 1], 0, 2, id="window-2"),
    pytest.param(SamplerParams(repeat_last_n=0, repeat_penalty=2.0), [0, 1], 0, 0, id="last-n-0-off"),
    pytest.param(SamplerParams(repeat_last_n=-1, repeat_penalty=2.0), [0, 1], 2, 2, id="last-n-minus-1-is-n-ctx"),
    pytest.param(SamplerParams(repeat_last_n=-2, repeat_penalty=2.0), [0, 1], 2, 0, id="other-negative-off"),
    pytest.param(SamplerParams(repeat_last_n=64, repeat_penalty=0.0), [0], 0, 0, id="repeat-0-is-off"),
    pytest.param(SamplerParams(repeat_last_n=64, presence_penalty=0.1), [0], 0, 2, id="presence"),
    pytest.param(SamplerParams(repeat_last_n=64, frequency_penalty=0.04), [0, 0], 0, 2, id="frequency-count"),
    pytest.param(SamplerParams(repeat_last_n=64, frequency_penalty=0.04), [0], 0, 0, id="frequency-once"),
])
def test_penalties_before_greedy(params: SamplerParams, history: list[int], n_ctx: int, expected: int) -> None:
    # logits [1.0, 0.9, 0.95]: a penalty on token 0 (and 1) makes token 2 the argmax
    sampler = Sampler(params, n_ctx=n_ctx, history=history)
    assert sampler.sample(arr(1.0, 0.9, 0.95)) == expected


def test_history_window_and_accept() -> None:
    s = Sampler(SamplerParams(repeat_last_n=2, repeat_penalty=1.5), history=[1, 2, 3])
    assert s.history == (2, 3)
    s.accept(4)
    assert s.history == (3, 4)
    off = Sampler(SamplerParams(repeat_last_n=64))  # repeat 1, no presence/frequency: penalties off
    off.accept(1)
    assert off.history == ()


def test_sample_does_not_modify_input() -> None:
    logits = arr(1.0, 0.9)
    Sampler(SamplerParams(repeat_last_n=4, repeat_penalty=2.0), history=[0]).sample(logits)
    assert logits.tolist() == [1.0, pytest.approx(0.9)]


def test_seeded_draw_follows_generator() -> None:
    # top_k 2 over [0, ln 3, -50] keeps ids [1, 0] (sorted) with probs [0.75, 0.25]; r <= 0.75 picks 1
    seed = 7
    rng = np.random.default_rng(seed)
    s = Sampler(SamplerParams(temperature=1.0, top_k=2, seed=seed))
    logits = arr(0.0, math.log(3.0), -50.0)
    for _ in range(50):
        r = float(rng.random(dtype=np.float32))
        assert s.sample(logits) == (1 if r <= 0.75 else 0)


def test_same_seed_same_tokens() -> None:
    logits = np.random.default_rng(0).normal(size=(40, 1000)).astype(np.float32)
    params = SamplerParams(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=42)
    a, b = Sampler(params), Sampler(params)
    assert [a.sample(row) for row in logits] == [b.sample(row) for row in logits]
    c = Sampler(SamplerParams(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=43))
    assert [c.sample(row) for row in logits] != [Sampler(params).sample(row) for row in logits]


@pytest.mark.parametrize("seed", [None, -1, 0, -5, 2**63 - 1])
def test_seed_forms(seed: int | None) -> None:
    assert Sampler(SamplerParams(temperature=1.0, seed=seed)).sample(arr(0, 0, 0)) in (0, 1, 2)


@pytest.mark.parametrize(("temperature", "expected"), [
    pytest.param(1.0, [0.7, 0.2, 0.1], id="t1"),
    pytest.param(0.5, [0.49 / 0.54, 0.04 / 0.54, 0.01 / 0.54], id="t0.5-squares"),
])
def test_distribution(temperature: float, expected: list[float]) -> None:
    s = Sampler(SamplerParams(temperature=temperature, seed=0))
    logits = np.log(arr(0.7, 0.2, 0.1))
    counts = np.bincount([s.sample(logits) for _ in range(20000)], minlength=3) / 20000
    np.testing.assert_allclose(counts, expected, atol=0.015)


@pytest.mark.parametrize(("params", "allowed"), [
    pytest.param(SamplerParams(temperature=1.0, top_p=0.0, seed=0), {1}, id="top-p-0"),
    pytest.param(SamplerParams(temperature=1.0, top_k=1, seed=0), {1}, id="top-k-1"),
    pytest.param(SamplerParams(temperature=1.0, min_p=1.0, seed=0), {1}, id="min-p-1"),
    pytest.param(SamplerParams(temperature=1.0, top_p=0.5, seed=0), {1}, id="top-p-half"),  # 0.52 > 0.5
    pytest.param(SamplerParams(temperature=1.0, top_p=0.6, seed=0), {1, 2}, id="top-p-two"),
    pytest.param(SamplerParams(temperature=1.0, min_p=0.5, seed=0), {1, 2}, id="min-p-half"),
])
def test_filters(params: SamplerParams, allowed: set[int]) -> None:
    logits = np.log(arr(0.08, 0.52, 0.3, 0.1))
    s = Sampler(params)
    assert {s.sample(logits) for _ in range(300)} == allowed


@pytest.mark.parametrize(("logits", "temperature"), [
    pytest.param([np.nan, 1.0], 1.0, id="nan-logit"),
    pytest.param([np.nan, 1.0], 0.0, id="nan-logit-greedy"),
    pytest.param([-np.inf, -np.inf], 1.0, id="all-neg-inf"),
])
def test_nan_is_an_error(logits: list[float], temperature: float) -> None:
    with pytest.raises(SamplingError):
        Sampler(SamplerParams(temperature=temperature, seed=0)).sample(arr(*logits))


def _reference_candidates(row: npt.NDArray[np.float32], temperature: float, top_p: float,
                          min_p: float) -> tuple[list[int], npt.NDArray[np.float32]]:
    """§4.11 without a top-k, the plain way: sort the whole vocabulary, then cut."""
    ids = np.lexsort((np.arange(row.size), -row))
    probs = softmax(row / np.float32(temperature))[ids]
    n = top_p_cut(probs, top_p)
    ids, probs = ids[:n], probs[:n]
    keep = min_p_mask(probs, min_p)
    return ids[keep].tolist(), probs[keep]


@pytest.mark.parametrize(("temperature", "top_p", "min_p"), [
    (1.0, 0.9, 0.0), (0.7, 0.999, 0.0), (2.0, 0.99, 0.0), (1.0, 1.0, 0.05), (1.0, 0.95, 1e-4), (0.3, 0.5, 0.0),
    (5.0, 0.9999, 0.0),
])
def test_windowed_sort_matches_full_sort(temperature: float, top_p: float, min_p: float) -> None:
    row = np.random.default_rng(5).normal(scale=2.0, size=5000).astype(np.float32)
    row[[10, 20, 30]] = row.max()  # ties among the best tokens
    ids, probs = candidates(row, 0, temperature, top_p, min_p)
    ref_ids, ref_probs = _reference_candidates(row, temperature, top_p, min_p)
    assert ids.tolist() == ref_ids
    np.testing.assert_array_equal(probs, ref_probs)


def test_no_filter_keeps_every_token() -> None:
    ids, probs = candidates(arr(0.0, 1.0, 2.0), 0, 1.0, 1.0, 0.0)
    assert ids.tolist() == [0, 1, 2]  # nothing filters: unsorted, id order
    assert probs.sum() == pytest.approx(1.0)


def test_large_vocabulary() -> None:
    logits = np.random.default_rng(1).normal(size=128_256).astype(np.float32)
    s = Sampler(SamplerParams(temperature=0.8, top_k=40, top_p=0.9, seed=3, repeat_last_n=64, repeat_penalty=1.1),
                history=range(100))
    top40 = set(np.argsort(-logits)[:40].tolist())
    assert all(s.sample(logits) in top40 for _ in range(20))


# ---- hostile but well-typed values (issue 10): every case must give a valid token, never an exception ----
_F32_MAX = float(np.finfo(np.float32).max)
_EXTREMES = [0.0, 1e-45, -1e-45, 1e-7, 1.0, -1.0, 1e30, -1e30, _F32_MAX, -_F32_MAX]


@pytest.mark.parametrize("repeat_penalty", _EXTREMES)
@pytest.mark.parametrize("presence", [0.0, _F32_MAX, -_F32_MAX, 1e-45])
@pytest.mark.parametrize("frequency", [0.0, _F32_MAX, -_F32_MAX])
@pytest.mark.parametrize("temperature", [0.0, 1e-45, 0.8, _F32_MAX])
def test_extreme_penalties_and_temperature_still_sample(repeat_penalty: float, presence: float, frequency: float,
                                                         temperature: float) -> None:
    row = arr(5.0, -3.0, 0.0, 2.5, -_F32_MAX, _F32_MAX / 2)
    params = SamplerParams(temperature=temperature, seed=3, top_k=3 if temperature == 0.8 else 0, top_p=0.95,
                           repeat_last_n=64, repeat_penalty=repeat_penalty, presence_penalty=presence,
                           frequency_penalty=frequency)
    token = Sampler(params, history=[0, 0, 3, 5]).sample(row)
    assert 0 <= token < row.size


def test_tiny_repeat_penalty_keeps_the_order_of_penalised_logits() -> None:
    # 5/1e-45 and 2.5/1e-45 both overflow float32; float64 keeps 5 above 2.5 before clipping, and clipping
    # makes them tie at the float32 maximum, where the lower id wins greedily.
    s = Sampler(SamplerParams(repeat_last_n=64, repeat_penalty=1e-45), history=[3, 0])
    assert s.sample(arr(5.0, 9.0, 0.0, 2.5)) == 0


def test_huge_presence_penalty_bans_seen_tokens() -> None:
    s = Sampler(SamplerParams(repeat_last_n=64, presence_penalty=_F32_MAX, frequency_penalty=_F32_MAX),
                history=[1, 1])
    assert s.sample(arr(0.0, 9.0, 1.0)) == 2


def test_tiny_temperature_is_almost_greedy() -> None:
    # 30 / 1e-7 fits float32 but 1e33 / 1e-7 does not: the clipped path still picks the best token.
    row = arr(1e33, 3e33, -1e33)
    assert all(Sampler(SamplerParams(temperature=1e-45, seed=k)).sample(row) == 1 for k in range(5))


def test_positive_infinity_is_the_largest_logit() -> None:
    assert Sampler(SamplerParams(temperature=1.0, seed=0)).sample(arr(1.0, np.inf, 2.0)) == 1


def test_sample_top_k_in_c_equals_penalising_a_copy_then_top_k() -> None:
    """The sampler's pass in C (ggml/host.py sample_top_k) gives, bit for bit, what apply_penalties on a copy of the
    row and top_k_sorted give: the same ids in the same order and the same penalised logits, over random rows
    (ties, -inf entries), histories (repeats, ids outside the vocabulary) and penalties, the overflowing ones too;
    a NaN or +inf in the row gives None; the scratch marks are cleared."""
    g = np.random.default_rng(41)
    penalties = [(1.1, 0.0, 0.0), (1.5, 0.5, 0.25), (0.7, -2.0, -0.5), (1e-45, 0.0, 0.0), (1.1, 3.4e38, 0.0),
                 (1.1, 0.0, -3.4e38), (30.0, 0.0, 1.0)]
    for trial in range(400):
        n = int(g.choice([7, 300, 5000, 49152]))
        row = (g.standard_normal(n) * g.uniform(0.1, 8)).astype(np.float32)
        if trial % 4 == 0:
            row = np.round(row).astype(np.float32)  # ties
        if trial % 7 == 0:
            row[g.integers(0, n, size=3)] = -np.inf
        history = g.integers(-3, n + 3, size=int(g.integers(0, 100)))
        history = np.concatenate([history, np.argsort(-row)[: int(g.integers(0, 20))]])  # the best seen too
        repeat, presence, frequency = penalties[trial % len(penalties)]
        k = int(min(n, g.choice([1, 2, 40, 256])))
        seen = np.zeros(n, dtype=np.uint8)
        got = sample_top_k(row, history.astype(np.int64), repeat, presence, frequency, k, seen)
        copy = row.copy()
        with np.errstate(all="ignore"):
            apply_penalties(copy, history.astype(np.int64), repeat, presence, frequency)
        want = top_k_sorted(copy, k)
        assert got is not None and not seen.any()
        assert got[0].tolist() == want.tolist()
        assert np.array_equal(got[1].view(np.uint32), copy[want].view(np.uint32))
    for bad in (np.nan, np.inf):
        row = np.zeros(100, dtype=np.float32)
        row[50] = bad
        seen = np.zeros(100, dtype=np.uint8)
        assert sample_top_k(row, np.array([50, 3], dtype=np.int64), 1.1, 0.0, 0.0, 5, seen) is None
        assert not seen.any()
    with pytest.raises(ValueError):
        sample_top_k(np.zeros(10, np.float32), np.zeros(0, np.int64), 1.1, 0.0, 0.0, 11, np.zeros(10, np.uint8))
    with pytest.raises(ValueError):
        sample_top_k(np.zeros(10, np.float32), np.zeros(0, np.int64), 1.1, 0.0, 0.0, 3, np.zeros(9, np.uint8))


def test_sampler_with_a_top_k_draws_what_the_general_path_draws() -> None:
    """A request with a top-k (and penalties) samples through the C pass; its tokens are those of the numpy path
    (penalise a copy, candidates, draw) with the same generator, and greedy with penalties picks the penalised
    row's first maximum."""
    g = np.random.default_rng(43)
    for trial in range(60):
        n = int(g.choice([1000, 49152]))
        row = (g.standard_normal(n) * 4).astype(np.float32)
        history = g.integers(0, n, size=50).tolist() + np.argsort(-row)[:10].tolist()
        temperature = 0.0 if trial % 3 == 0 else 0.8
        params = SamplerParams(temperature=temperature, top_k=40, top_p=0.9, repeat_penalty=1.3, repeat_last_n=-1,
                               presence_penalty=0.2, seed=trial)
        sampler, reference = Sampler(params, n_ctx=4096, history=history), Sampler(params, n_ctx=4096)
        copy = row.copy()
        apply_penalties(copy, np.array(history, dtype=np.int64), 1.3, 0.2, 0.0)
        for _ in range(3):
            token = sampler.sample(row)
            if temperature == 0.0:
                assert token == int(np.argmax(copy))
                continue
            ids, probs = candidates(copy, 40, temperature, 0.9, 0.0)
            assert token == int(ids[draw(probs, float(reference._rng.random(dtype=np.float32)))])
