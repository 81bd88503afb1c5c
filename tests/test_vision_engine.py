"""Images through the engine with a tiny random-weight Gemma 3 vision GGUF: the prompt's markers become
"\\n\\n<start_of_image>", the image's soft tokens, "<end_of_image>\\n\\n"; image tokens see their whole image
(exact masks, window and global layers) and are never split across forward passes whatever the batch size; the
same image reuses the cache and another does not; bad images and unknown markers fail their request alone."""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kvcache.masks import build_mask
from ml.batch import Batch
from ml.dtype import DType
import runner.engine as engine_mod
from runner import images
from runner.cli import Loaded
from runner.engine import Engine
from runner.forward import ForwardRunner
from runner.scheduling import common_prefix_len
from runner.protocol import CompletionRequest, ImageData
from runner.sampling import Sampler, SamplerParams
from test_engine_survives import Collector, run_all
from test_vision_gemma3 import VS, write_vision_gguf
from tiny_gguf import gemma3_spec


def png(seed: int, size: int = 24) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    path = tmp_path_factory.mktemp("vision-engine") / "gemma3-vision.gguf"
    write_vision_gguf(path, text=gemma3_spec(image_tokens=True))
    m = Loaded(str(path), 1)
    yield m
    m.backend.close()


def request(prompt: str, imgs: dict[int, bytes], n: int = 8) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, images=tuple(ImageData(k, v) for k, v in imgs.items()),
                             sampling=SamplerParams(temperature=0.0), num_predict=n, num_keep=0, stop=())


def run(m: Loaded, reqs: list[CompletionRequest], n_batch: int = 64, parallel: int = 1) -> list[Collector]:
    e = Engine(m.backend, m.model, m.tokenizer, n_ctx=128 * parallel, n_batch=n_batch, parallel=parallel)
    e.start()
    try:
        return run_all(e, reqs)
    finally:
        e.close()


def ok(c: Collector) -> str:
    assert c.final is not None and c.final.error is None, c.final
    return c.text


def test_prompt_layout(loaded: Loaded) -> None:
    tokens, rows = images.prompt_inputs(loaded.model, loaded.backend, loaded.tokenizer,
                                        request("the [img-0] a", {0: png(1)}))
    tok = loaded.tokenizer
    start, end = tok.encode("<start_of_image>", False, True), tok.encode("<end_of_image>", False, True)
    assert len(start) == len(end) == 1 and start[0] != end[0]
    i = tokens.index(start[0])
    assert all(t < 0 for t in tokens[i + 1:i + 1 + VS.tokens_per_image]) and tokens[i + 1 + VS.tokens_per_image] == end[0]
    assert tokens[0] == tok.bos_id and len(rows) == VS.tokens_per_image
    assert sorted(r.index for r in rows.values()) == list(range(VS.tokens_per_image))


@pytest.mark.parametrize("prompt,imgs", [("the [img-0] a", {0: png(1)}), ("[img-0]", {0: png(1)}),
                                         ("[img-1] the [img-0][img-1] a b", {0: png(1), 1: png(2)}),
                                         ("the a", {})])
def test_prompt_length_counts_without_encoding(loaded: Loaded, prompt: str, imgs: dict[int, bytes]) -> None:
    req = request(prompt, imgs)
    tokens, _ = images.prompt_inputs(loaded.model, loaded.backend, loaded.tokenizer, req)
    assert images.prompt_length(loaded.model, loaded.tokenizer, req) == len(tokens)


def test_prompt_length_decodes_every_image(loaded: Loaded) -> None:
    with pytest.raises(ValueError, match="failed to process inputs: failed to decode image"):
        images.prompt_length(loaded.model, loaded.tokenizer, request("[img-0] [img-1]", {0: png(1), 1: b"GIF89a"}))
    with pytest.raises(ValueError, match="invalid image index: 2"):
        images.prompt_length(loaded.model, loaded.tokenizer, request("[img-2]", {0: png(1)}))


class RecordingSampler(Sampler):
    """Keeps the logits of every step (the tiny model's text is too degenerate to tell runs apart)."""

    def sample(self, logits: Any) -> int:
        self.rows = getattr(self, "rows", []) + [np.array(logits, dtype=np.float64)]
        RECORDED.append(self.rows[-1])
        return super().sample(logits)


RECORDED: list[np.ndarray] = []


def first_logits(m: Loaded, req: CompletionRequest, monkeypatch: pytest.MonkeyPatch, n_batch: int = 64) -> np.ndarray:
    monkeypatch.setattr(engine_mod, "Sampler", RecordingSampler)
    RECORDED.clear()
    ok(run(m, [req], n_batch=n_batch)[0])
    return RECORDED[0]


def test_an_image_changes_the_output(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = "the a [img-0] the [img-1] a"
    base = first_logits(loaded, request(prompt, {0: png(1), 1: png(2)}, n=1), monkeypatch)
    other = first_logits(loaded, request(prompt, {0: png(3), 1: png(2)}, n=1), monkeypatch)
    plain = first_logits(loaded, request("the a the a", {}, n=1), monkeypatch)
    assert np.max(np.abs(other - base)) > 1e-2 and np.max(np.abs(plain - base)) > 1e-2


@pytest.mark.parametrize("n_batch", [1, 3, 6])
def test_an_image_is_never_split(loaded: Loaded, monkeypatch: pytest.MonkeyPatch, n_batch: int) -> None:
    batches: list[Batch] = []
    forward = ForwardRunner.logits

    def recording(self: ForwardRunner, batch: Batch, **kw: Any) -> Any:
        batches.append(batch)
        return forward(self, batch, **kw)

    monkeypatch.setattr(ForwardRunner, "logits", recording)
    reqs = [request("the a [img-0] the [img-1] a", {0: png(1), 1: png(2)}, n=2), request("a the a", {}, n=3)]
    for c in run(loaded, reqs, n_batch=n_batch, parallel=2):
        ok(c)
    seen = 0
    for b in batches:
        if b.is_embed is None or b.spans is None:
            continue
        for i in np.flatnonzero(b.is_embed):
            lo, hi = b.spans[i]
            here = b.positions[b.is_embed & (b.seqs == b.seqs[i])]
            assert hi - lo + 1 == VS.tokens_per_image and set(range(lo, hi + 1)) <= set(here.tolist())
            seen += 1
    assert seen == 2 * VS.tokens_per_image


def test_engine_equals_a_direct_forward(loaded: Loaded) -> None:
    req = request("the [img-0] a", {0: png(5)}, n=6)
    tokens, rows = images.prompt_inputs(loaded.model, loaded.backend, loaded.tokenizer, req)
    cache = loaded.model.new_cache(flash=True)
    cache.init(loaded.backend, DType.F32, 1, 128, 64)
    out: list[int] = []
    try:
        inputs, pos = tokens, 0
        for _ in range(6):
            n = len(inputs)
            b = images.batch(inputs, np.arange(pos, pos + n, dtype=np.int32), np.zeros(n, np.int32),
                             np.array([n - 1], np.int32), rows)
            ctx = loaded.backend.new_context()
            try:
                logits = loaded.model.forward(ctx, b, cache)
                ctx.forward(logits).compute(logits)
                out.append(int(np.argmax(logits.numpy().reshape(-1))))
            finally:
                ctx.close()
            pos, inputs = pos + n, [out[-1]]
    finally:
        cache.close()
    c = run(loaded, [req])[0]
    assert ok(c) == "".join(loaded.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in out
                            if not loaded.tokenizer.is_eog(t))


def test_inputs_identify_the_image(loaded: Loaded) -> None:
    """The slot's prefix matching compares inputs: the same image gives the same inputs (cache reuse), another
    image differs from its first row on (the tiny model's window of 3 keeps the engine itself from resuming)."""
    def inputs(data: bytes) -> list[int]:
        return images.prompt_inputs(loaded.model, loaded.backend, loaded.tokenizer,
                                    request("the [img-0] a", {0: data}))[0]
    same, again, other = inputs(png(1)), inputs(png(1)), inputs(png(9))
    assert same == again
    first_row = next(i for i, t in enumerate(same) if t < 0)
    assert other[:first_row] == same[:first_row] and other[first_row] != same[first_row]
    assert common_prefix_len(same, other) == first_row


@pytest.mark.parametrize("imgs,prompt,message", [
    ({0: b"not an image"}, "[img-0] the", "failed to process inputs: failed to decode image: unknown"),
    ({0: png(1)[:60]}, "[img-0] the", "failed to process inputs: failed to decode image"),
    ({0: png(1)}, "[img-0] [img-7]", "failed to process inputs: invalid image index: 7"),
])
def test_bad_image_fails_alone(loaded: Loaded, imgs: dict[int, bytes], prompt: str, message: str) -> None:
    bad, good = run(loaded, [request(prompt, imgs), request("the a", {})], parallel=2)
    assert bad.final is not None and bad.final.error is not None and bad.final.error.startswith(message)
    ok(good)


def _mask_ref(pos: list[int], spans: list[tuple[int, int]], window: int | None) -> np.ndarray:
    """Row t sees cell position q iff q in its span, or (q <= p and, with a window, p - q <= window)."""
    n = len(pos)
    m = np.full((n, n), -np.inf, np.float32)
    for t, p in enumerate(pos):
        for c, q in enumerate(pos):
            causal = q <= p and (window is None or p - q <= window)
            if causal or spans[t][0] <= q <= spans[t][1]:
                m[t, c] = 0.0
    return m


@pytest.mark.parametrize("window", [None, 1, 2])
def test_masks_for_two_images(window: int | None) -> None:
    # text 0-1, image A 2-5, text 6, image B 7-9, text 10-11: longer than the window
    pos = list(range(12))
    spans = [(p, p) for p in pos]
    for lo, hi in ((2, 5), (7, 9)):
        for p in range(lo, hi + 1):
            spans[p] = (lo, hi)
    got = build_mask(np.array(pos, np.int32), np.ones((12, 12), bool), np.array(pos, np.int32), window=window,
                     spans=np.array(spans, np.int32))
    np.testing.assert_array_equal(got, _mask_ref(pos, spans, window))
    assert got[2, 5] == 0 and got[5, 2] == 0 and got[4, 7] == -np.inf and got[6, 7] == -np.inf



def test_an_image_batch_never_reuses_a_text_graph(loaded: Loaded) -> None:
    """runner.forward keeps a graph for the next batch of the same shape; one with image rows must not run it."""
    tokens, rows = images.prompt_inputs(loaded.model, loaded.backend, loaded.tokenizer,
                                        request("[img-0]", {0: png(4)}))
    n = len(tokens)
    pos, seqs, out = np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.array([n - 1], np.int32)
    image_batch = images.batch(tokens, pos, seqs, out, rows)
    text_batch = Batch(np.full(n, 5, np.int32), pos, seqs, out)

    def logits(*batches: Batch) -> np.ndarray:
        cache = loaded.model.new_cache(flash=True)
        cache.init(loaded.backend, DType.F16, 2, 128, 64)
        fr = ForwardRunner(loaded.backend, loaded.model, cache)
        try:
            for b in batches[:-1]:
                fr.logits(b)
                cache.remove(0, 0, None)
            return np.array(fr.logits(batches[-1]))
        finally:
            fr.close()
            cache.close()

    np.testing.assert_array_equal(logits(text_batch, image_batch), logits(image_batch))
    assert np.max(np.abs(logits(text_batch) - logits(image_batch))) > 1e-2


def test_the_same_image_reuses_the_cache_and_another_does_not(tmp_path: Path) -> None:
    """A window wide enough to resume (the module's tiny model has 3): the same prompt and image again evaluate only
    the last input; another image reuses exactly the inputs before its first soft token."""
    path = tmp_path / "gemma3-vision-wide.gguf"
    write_vision_gguf(path, text=gemma3_spec(image_tokens=True, window=64))
    m = Loaded(str(path), 1)
    e = Engine(m.backend, m.model, m.tokenizer, n_ctx=256, n_batch=64, parallel=1)
    e.start()
    try:
        prompt = "the a [img-0] the a"
        seqs, outs = [], []
        for img in (png(1), png(1), png(2)):
            out = Collector()
            seqs.append(e.submit(request(prompt, {0: img}), out))
            assert out.done.wait(60) and out.final is not None and out.final.error is None
            outs.append(out.text)
        first, again, other = seqs
        assert first.n_cached == 0
        assert again.n_cached == again.n_prompt - 1 and outs[1] == outs[0]
        shared = common_prefix_len(first.tokens, other.tokens)
        assert 0 < shared < first.n_prompt - VS.tokens_per_image and other.n_cached == shared
    finally:
        e.close()
        m.backend.close()


def test_a_context_shift_never_cuts_an_image(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generation past a small context shifts it: every shift keeps or discards each cached image whole (Ollama's
    ShiftDiscard), for context sizes and num_keep values that put the plain half-discard's end inside an image
    (the prompt is 34 inputs, the images at 5-8 and 24-27) or num_keep inside one."""
    import dataclasses
    from runner.scheduling import context_shift_plan
    base = request("[img-0] the a [img-1] a", {0: png(1), 1: png(2)}, n=40)
    tokens, _ = images.prompt_inputs(loaded.model, loaded.backend, loaded.tokenizer, base)
    shifts: list[tuple[list[int], int, int]] = []
    shift = Engine._shift

    def recording(self: Engine, slot: Any, keep: int, discard: int) -> None:
        shifts.append((list(slot.inputs), keep, discard))
        shift(self, slot, keep, discard)

    monkeypatch.setattr(Engine, "_shift", recording)
    plain_would_cut = 0
    for n_ctx, num_keep in [(n, k) for n in range(len(tokens) + 1, len(tokens) + 7) for k in (0, 6, 14)]:
        req = dataclasses.replace(base, num_keep=num_keep)
        shifts.clear()
        e = Engine(loaded.backend, loaded.model, loaded.tokenizer, n_ctx=n_ctx, n_batch=64, parallel=1)
        e.start()
        try:
            ok(run_all(e, [req])[0])
        finally:
            e.close()
        assert shifts, n_ctx
        for inputs, keep, discard in shifts:
            gone = set(range(keep, keep + discard))
            plain = context_shift_plan(len(inputs), n_ctx, num_keep)
            plain_gone = set(range(plain.keep, plain.keep + plain.discard))
            starts = [i for i, t in enumerate(inputs) if t < 0 and (i == 0 or inputs[i - 1] >= 0)]
            for first in starts:
                rows = set(range(first, first + VS.tokens_per_image))
                assert rows <= gone or not rows & gone, (n_ctx, keep, discard, first)
                plain_would_cut += bool(rows & plain_gone) and not rows <= plain_gone
    assert plain_would_cut > 0
