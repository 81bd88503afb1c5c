"""llama.cpp's split layout: a text-only Gemma 3 GGUF plus a projector file (`--mmproj`, `general.architecture =
clip`, `clip.*` keys, clip.cpp's tensor names) loads into the same model code as Ollama's single file; the same
tiny random weights written both ways give bit-identical soft tokens and logits. Bad projector files fail to load
with a ModelLoadError that names the problem."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.errors import ModelLoadError
from runner import images
from runner.cli import Loaded
from test_vision_engine import first_logits, png, request
from test_vision_gemma3 import VS
from test_vision_server import REPO
from tiny_gguf import gemma3_spec, llama_spec, make_vision_weights, write_gguf, write_projector_gguf

TEXT = gemma3_spec(image_tokens=True)
SEED = 3


def write_single(path: Path) -> None:
    """Ollama's layout: the text model with `v.*`, `mm.*` and `gemma3.vision.*` in one file."""
    write_gguf(path, TEXT.with_(extra_kv=VS.kv()), add=make_vision_weights(VS, TEXT.n_embd, SEED), seed=SEED)


def write_split(dir_: Path, **projector_edits: Any) -> tuple[Path, Path]:
    text, proj = dir_ / "text.gguf", dir_ / "mmproj.gguf"
    write_gguf(text, TEXT, seed=SEED)
    write_projector_gguf(proj, VS, make_vision_weights(VS, TEXT.n_embd, SEED), TEXT.n_embd, **projector_edits)
    return text, proj


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Loaded, Loaded]]:
    d = tmp_path_factory.mktemp("mmproj")
    write_single(d / "single.gguf")
    text, proj = write_split(d)
    single, split = Loaded(str(d / "single.gguf"), 1), Loaded(str(text), 1, mmproj=str(proj))
    yield single, split
    single.backend.close()
    split.backend.close()


def _soft_tokens(m: Loaded, data: bytes) -> np.ndarray:
    tokens, rows = images.prompt_inputs(m.model, m.backend, m.tokenizer, request("[img-0]", {0: data}))
    return np.stack([rows[t].embedding for t in tokens if t < 0])


def test_split_files_load_as_a_vision_model(both: tuple[Loaded, Loaded]) -> None:
    single, split = both
    assert split.model.vision == single.model.vision is not None
    assert split.model.image_spec() == single.model.image_spec()
    assert "v.blk.0.ffn_up.weight" in split.backend.tensor_names()
    assert "v.blk.0.mlp.fc1.weight" in single.backend.tensor_names()


def test_same_soft_tokens_in_both_layouts(both: tuple[Loaded, Loaded]) -> None:
    single, split = both
    for seed in (1, 2):
        a, b = _soft_tokens(single, png(seed)), _soft_tokens(split, png(seed))
        assert a.shape == (VS.tokens_per_image, TEXT.n_embd)
        np.testing.assert_array_equal(a, b)


def test_same_logits_in_both_layouts(both: tuple[Loaded, Loaded], monkeypatch: pytest.MonkeyPatch) -> None:
    single, split = both
    req = request("the a [img-0] the [img-1] a", {0: png(1), 1: png(2)}, n=1)
    got, want = first_logits(split, req, monkeypatch), first_logits(single, req, monkeypatch)
    np.testing.assert_array_equal(got, want)
    # and the images matter: another image changes them
    other = first_logits(split, request("the a [img-0] the [img-1] a", {0: png(3), 1: png(2)}, n=1), monkeypatch)
    assert np.max(np.abs(other - got)) > 1e-2


def test_image_mean_and_std_come_from_the_projector(tmp_path: Path) -> None:
    text, proj = write_split(tmp_path, kv={"clip.vision.image_mean": [0.25, 0.5, 0.75],
                                           "clip.vision.image_std": [0.5, 0.25, 2.0]})
    m = Loaded(str(text), 1, mmproj=str(proj))
    try:
        spec = m.model.image_spec()
        assert (spec.mean, spec.std) == ((0.25, 0.5, 0.75), (0.5, 0.25, 2.0))
    finally:
        m.backend.close()


V0 = "v.blk.0."


@pytest.mark.parametrize("edits,message", [
    ({"kv": {"clip.projector_type": "mlp"}}, r"projector type 'mlp' is not supported with a gemma3 model"),
    ({"kv": {"clip.projector_type": None}}, r"projector type None is not supported"),
    ({"kv": {"clip.has_vision_encoder": False}}, r"has no vision encoder"),
    ({"drop": (V0 + "ffn_down.weight",)}, r"required tensor missing; tried .*v\.blk\.0\.ffn_down\.weight"),
    ({"drop": ("mm.input_projection.weight",)}, r"mm\.input_projection\.weight"),
    ({"drop": ("v.post_ln.weight",)}, r"v\.post_ln\.weight"),
    ({"kv": {"clip.vision.projection_dim": 48}},
     r"projector's output width \(clip\.vision\.projection_dim 48\) does not match the model's embedding_length 32"),
    # a projector made for a wider text model, without projection_dim: the matrix's own shape is checked
    ({"kv": {"clip.vision.projection_dim": None},
      "add": {"mm.input_projection.weight": np.zeros((VS.n_embd, 48), np.float32)}},
     r"mm\.input_projection\.weight has shape \[48, 16\], expected \[32, 16\]"),
    ({"add": {V0 + "ffn_up.weight": np.zeros((VS.n_embd, VS.n_ff), np.float32)}},  # up and down swapped
     r"v\.blk\.0\.ffn_up\.weight has shape \[40, 16\], expected \[16, 40\]"),
    ({"kv": {"clip.vision.projector.scale_factor": 3}}, r"scale_factor 3 does not divide the 4 patches per side"),
    ({"kv": {"clip.vision.projector.scale_factor": 0}}, r"scale_factor 0 does not divide"),
    ({"kv": {"clip.vision.image_std": [0.5, 0.0, 0.5]}}, r"invalid image_mean"),
    ({"kv": {"clip.vision.block_count": "two"}}, r"clip\.vision\.block_count is str, expected an integer"),
])
def test_bad_projector_files_fail_to_load(tmp_path: Path, edits: dict[str, Any], message: str) -> None:
    text, proj = write_split(tmp_path, **edits)
    with pytest.raises(ModelLoadError, match=message):
        Loaded(str(text), 1, mmproj=str(proj)).backend.close()


def test_a_model_file_is_not_a_projector(tmp_path: Path) -> None:
    text, _ = write_split(tmp_path)
    with pytest.raises(ModelLoadError, match=r"not a projector file \(general\.architecture is 'gemma3'"):
        Loaded(str(text), 1, mmproj=str(text))


def test_a_missing_projector_file(tmp_path: Path) -> None:
    text, _ = write_split(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot open model file"):
        Loaded(str(text), 1, mmproj=str(tmp_path / "absent.gguf"))


def test_a_single_file_model_takes_no_projector(tmp_path: Path) -> None:
    write_single(tmp_path / "single.gguf")
    _, proj = write_split(tmp_path)
    with pytest.raises(ModelLoadError, match=r"already holds a vision tower \(mm\."):
        Loaded(str(tmp_path / "single.gguf"), 1, mmproj=str(proj))


def test_a_text_architecture_ignores_a_projector(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Ollama v0.5.12 could pass --mmproj to the new engine: a model that cannot see serves text, with a warning
    (the projector is not even read)."""
    write_gguf(tmp_path / "llama.gguf", llama_spec())
    with caplog.at_level("WARNING"):
        m = Loaded(str(tmp_path / "llama.gguf"), 1, mmproj=str(tmp_path / "absent.gguf"))
    try:
        assert not images.can_see(m.model) and not any(n.startswith("v.") for n in m.backend.tensor_names())
        assert "ignoring --mmproj" in caplog.text and "llama models take no projector" in caplog.text
    finally:
        m.backend.close()


def test_generate_takes_mmproj(tmp_path: Path) -> None:
    """`generate --mmproj P --image I`: the same sampled text and prompt-token count as the single file gives (a
    different image would change the text: test_vision_server), and a file that is not a projector is a load
    error (status 1) with the reason on stderr."""
    write_single(tmp_path / "single.gguf")
    text, proj = write_split(tmp_path)
    (tmp_path / "a.png").write_bytes(png(1))

    def generate(model: Path, *flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runner.cli", "generate", "--model", str(model), "--prompt",
                               "the [img-0] a", "-n", "12", "--temperature", "1.0", "--seed", "7", "--threads", "1",
                               "--image", str(tmp_path / "a.png"), *flags], capture_output=True, text=True,
                              timeout=120, cwd=REPO)

    split, single = generate(text, "--mmproj", str(proj)), generate(tmp_path / "single.gguf")
    assert split.returncode == 0 and single.returncode == 0, split.stderr[-2000:] + single.stderr[-2000:]
    assert split.stdout == single.stdout and len(split.stdout) > 1

    def prompt_count(err: str) -> str:
        return err[err.index("prompt eval: "):].split(" tokens")[0]

    assert prompt_count(split.stderr) == prompt_count(single.stderr) != "prompt eval: 0"
    assert int(prompt_count(split.stderr).split()[-1]) > VS.tokens_per_image
    bad = generate(text, "--mmproj", str(text))
    assert bad.returncode == 1 and "not a projector file" in bad.stderr
