"""Loads GGUF files the way the runner does, one path per stdin line (or "model<TAB>projector" for llama.cpp's
split layout, `--mmproj`), and prints one JSON line per file:
{"path": ..., "result": "ok" | "ModelLoadError" | "<other exception type>", "message": ...}. A model that can
see also encodes one small image (a projector that loads must also run).

Run as a subprocess by test_fuzz_gguf.py, so that a file which aborts or hangs the process is caught by the
parent (exit status, timeout) and named by the last path it was given. Not a test module.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ml.errors import ModelLoadError  # noqa: E402
from runner.cli import Loaded  # noqa: E402
from runner import images  # noqa: E402
from runner.engine import Engine  # noqa: E402
from runner.protocol import CompletionRequest, ImageData  # noqa: E402
from runner.sampling import SamplerParams  # noqa: E402


def _png() -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buf, "PNG")
    return buf.getvalue()


def load_once(line: str) -> tuple[str, str]:
    path, _, mmproj = line.partition("\t")
    try:
        loaded = Loaded(path, 1, mmproj=mmproj)
    except ModelLoadError as e:
        return "ModelLoadError", str(e)
    try:
        engine = Engine(loaded.backend, loaded.model, loaded.tokenizer, n_ctx=64, n_batch=16, parallel=1)
        try:
            engine.warm_up()
        finally:
            engine.close()
        if images.can_see(loaded.model):
            images.prompt_inputs(loaded.model, loaded.backend, loaded.tokenizer,
                                 CompletionRequest(prompt="[img-0]", images=(ImageData(0, _png()),),
                                                   sampling=SamplerParams(), num_predict=1, num_keep=0, stop=()))
    except ModelLoadError as e:
        return "ModelLoadError", str(e)
    finally:
        loaded.backend.close()
    return "ok", ""


def main() -> None:
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        print(json.dumps({"path": path, "started": True}), flush=True)
        try:
            result, message = load_once(path)
        except Exception as e:  # reported, not raised: the parent decides what is acceptable
            result, message = type(e).__name__, str(e)
        print(json.dumps({"path": path, "result": result, "message": message[:300]}), flush=True)


if __name__ == "__main__":
    main()
