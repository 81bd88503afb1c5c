"""mllama through the engine, with a tiny random-weight GGUF and real PNG files: the image becomes one `<|image|>`
input carrying the tiled image (the server's `[img-N]<|image|>` and a bare marker give the same inputs); greedy
text matches the float64 reference; the tower runs once per image, and a later request with the same image reuses
the cached cross-attention keys and values while another image is encoded anew; a request without an image equals
the text-only model; --parallel is capped at 1 with a log line; bad input fails its request alone."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import mllama_reference as ref
from ml.dtype import DType
from models.vision.tiles import TiledImage
from mllama_tiny import IMAGE_TOKEN, TEXT, VS, write_mllama
from runner import images
from runner.cli import Loaded
from runner.engine import Engine
from runner.protocol import CompletionRequest, ImageData
from runner.sampling import SamplerParams
from test_engine_survives import Collector, run_all
from test_vision_engine import png

PROMPT = "the [img-0]<|image|> a the"


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mllama-engine")
    out = {"vision": d / "mllama.gguf", "text": d / "mllama-text.gguf"}
    write_mllama(out["vision"])
    write_mllama(out["text"], vision=False)
    return out


@pytest.fixture(scope="module")
def loaded(paths: dict[str, Path]) -> Iterator[Loaded]:
    m = Loaded(str(paths["vision"]), 1)
    yield m
    m.backend.close()


def request(prompt: str, imgs: dict[int, bytes], n: int = 8) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, images=tuple(ImageData(k, v) for k, v in imgs.items()),
                             sampling=SamplerParams(temperature=0.0), num_predict=n, num_keep=0, stop=())


def engine(m: Loaded, parallel: int = 1, n_batch: int = 64) -> Engine:
    e = Engine(m.backend, m.model, m.tokenizer, n_ctx=128, n_batch=n_batch, parallel=parallel,
               kv_type=DType.F32)
    e.start()
    return e


def ok(c: Collector) -> str:
    assert c.final is not None and c.final.error is None, c.final
    return c.text


def test_the_image_is_one_input_carried_by_the_image_token(loaded: Loaded) -> None:
    tok = loaded.tokenizer
    tokens, rows = images.prompt_inputs(loaded.model, loaded.backend, tok, request(PROMPT, {0: png(1, 20)}))
    bare, _ = images.prompt_inputs(loaded.model, loaded.backend, tok, request("the [img-0] a the", {0: png(1, 20)}))
    carriers = [t for t in tokens if t < 0]
    assert len(carriers) == 1 and IMAGE_TOKEN not in tokens
    i = tokens.index(carriers[0])
    assert tokens[:i] == tok.encode("the ", add_special=True, parse_special=True)
    assert tokens[i + 1:] == tok.encode(" a the", add_special=False, parse_special=True)
    row = rows[carriers[0]]
    assert row.embedding is None and row.token == IMAGE_TOKEN and isinstance(row.encoder_input, TiledImage)
    assert row.encoder_input.n_tiles == 4 and row.encoder_input.ratio_id == 6  # 20 x 20 on 8-pixel tiles: 2x2
    assert bare == tokens  # the bare marker gets the token put in
    other, _ = images.prompt_inputs(loaded.model, loaded.backend, tok, request(PROMPT, {0: png(2, 20)}))
    assert other != tokens and [t for t in other if t >= 0] == [t for t in tokens if t >= 0]
    batch = images.batch(tokens, np.arange(len(tokens), dtype=np.int32), np.zeros(len(tokens), np.int32),
                         np.array([len(tokens) - 1], np.int32), rows)
    assert batch.embeds is None and int(batch.tokens[i]) == IMAGE_TOKEN
    assert [(mm.index, mm.data) for mm in batch.multimodal] == [(i, row.encoder_input)]


def test_prompt_length_counts_without_tiling(loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """The llama-server mode's pre-queue count: the same length as the inputs, each image decoded (a broken one
    fails here) but not tiled (the engine does that once, when the request runs)."""
    req = request(PROMPT, {0: png(1, 20)})
    tokens, _ = images.prompt_inputs(loaded.model, loaded.backend, loaded.tokenizer, req)
    tiled: list[bytes] = []
    real = loaded.model.prepare_image
    monkeypatch.setattr(loaded.model, "prepare_image", lambda data: tiled.append(data) or real(data))
    assert images.prompt_length(loaded.model, loaded.tokenizer, req) == len(tokens)
    assert images.prompt_length(loaded.model, loaded.tokenizer, request("a the", {})) == len(
        loaded.tokenizer.encode("a the", add_special=True, parse_special=True))
    assert not tiled
    with pytest.raises(ValueError, match="failed to process inputs: failed to decode image"):
        images.prompt_length(loaded.model, loaded.tokenizer, request("[img-0] the", {0: b"\x89PNG\r\n\x1a\n broken"}))


def _reference_greedy(loaded: Loaded, w: dict[str, np.ndarray], prompt: str, data: bytes | None, n: int) -> list[int]:
    tokens, rows = images.prompt_inputs(loaded.model, loaded.backend, loaded.tokenizer,
                                        request(prompt, {0: data} if data is not None else {}))
    states, at = None, 0
    for i, t in enumerate(tokens):
        if t < 0:
            tiled = rows[t].encoder_input
            states, at = ref.project(w, ref.tower(VS, w, tiled.pixels, tiled.ratio_id)), i
            tokens[i] = IMAGE_TOKEN
    out: list[int] = []
    for _ in range(n):
        row = ref.text_logits(TEXT, w, tokens, states, at)[-1]
        top = np.sort(row)[-2:]
        assert top[1] - top[0] > 1e-3  # no near-tie that rounding could flip
        out.append(int(np.argmax(row)))
        tokens.append(out[-1])
    return out


def test_greedy_text_matches_reference(loaded: Loaded, paths: dict[str, Path]) -> None:
    import gguf
    reader = gguf.GGUFReader(paths["vision"])
    w = {t.name: np.asarray(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
         for t in reader.tensors}
    e = engine(loaded)
    try:
        with_image, without = run_all(e, [request(PROMPT, {0: png(3, 20)}), request("the a the", {})])
    finally:
        e.close()
    for c, prompt, data in ((with_image, PROMPT, png(3, 20)), (without, "the a the", None)):
        want = _reference_greedy(loaded, w, prompt, data, 8)
        assert ok(c) == loaded.tokenizer.decode(want), prompt


def test_the_tower_runs_once_per_image(loaded: Loaded) -> None:
    model = loaded.model
    e = engine(loaded)
    try:
        start = model.images_encoded
        first = ok(run_all(e, [request(PROMPT, {0: png(4, 20)})])[0])
        assert model.images_encoded == start + 1
        # the same image and prompt: the slot's cache holds it (keys and values in the encoder cache)
        again = ok(run_all(e, [request(PROMPT, {0: png(4, 20)})])[0])
        assert model.images_encoded == start + 1 and again == first
        longer = ok(run_all(e, [request(PROMPT + " a", {0: png(4, 20)})])[0])
        assert model.images_encoded == start + 1 and longer != first
        other = ok(run_all(e, [request(PROMPT, {0: png(5, 20)})])[0])
        assert model.images_encoded == start + 2 and other != first
        plain = ok(run_all(e, [request("the a the", {})])[0])
        assert model.images_encoded == start + 2
    finally:
        e.close()
    fresh = engine(loaded)
    try:
        assert ok(run_all(fresh, [request("the a the", {})])[0]) == plain
    finally:
        fresh.close()


def test_without_an_image_equals_the_text_only_model(loaded: Loaded, paths: dict[str, Path]) -> None:
    text_only = Loaded(str(paths["text"]), 1)
    try:
        assert text_only.model.vision is None
        outs = []
        for m in (loaded, text_only):
            e = engine(m)
            try:
                outs.append(ok(run_all(e, [request("the a the a", {}, 12)])[0]))
            finally:
                e.close()
        assert outs[0] == outs[1] and outs[0]
    finally:
        text_only.backend.close()


def test_parallel_is_capped_with_a_log_line(loaded: Loaded, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="runner.engine"):
        e = engine(loaded, parallel=3)
    try:
        assert e.parallel == 1 and len(e.slots) == 1 and e.n_ctx_slot == 128
        assert any("--parallel 3 reduced to 1" in r.getMessage() for r in caplog.records)
        outs = run_all(e, [request(PROMPT, {0: png(6, 20)}), request("the a the", {})])  # queued, one at a time
        assert all(ok(c) for c in outs)
    finally:
        e.close()


@pytest.mark.parametrize("imgs,prompt,message", [
    ({0: png(1, 20), 1: png(2, 20)}, "[img-0] a [img-1] the", "takes one image per request, not 2"),
    ({0: b"\x89PNG\r\n\x1a\n broken"}, "[img-0] the", "failed to process inputs: failed to decode image"),
    ({0: png(1, 20)}, "[img-0] [img-4]", "invalid image index: 4"),
])
def test_bad_input_fails_alone(loaded: Loaded, imgs: dict[int, bytes], prompt: str, message: str) -> None:
    e = engine(loaded)
    try:
        bad, good = run_all(e, [request(prompt, imgs), request(PROMPT, {0: png(7, 20)})])
    finally:
        e.close()
    assert bad.final is not None and bad.final.error is not None and message in bad.final.error, bad.final
    assert ok(good)


