"""Shared test fixtures: where the real models and the llama.cpp sdist files live (caches outside git)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

CACHE_DIR = Path(os.environ.get("OLLAMA_PYRUNNER_CACHE", Path.home() / ".cache" / "ollama-pyrunner"))
MODELS_DIR = Path(os.environ.get("MODELS_DIR", CACHE_DIR / "models"))
LLAMA_CPP_DIR = CACHE_DIR / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
SHARED_DIR = Path(__file__).resolve().parent.parent.parent / "shared"


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (run `make models` / `make build`)")
    return path


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    """The unpacked llama.cpp tree from the pinned llama-cpp-python sdist (vocab files, templates)."""
    return _need(LLAMA_CPP_DIR, "llama.cpp sdist tree")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _need(MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2 model")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _need(MODELS_DIR / "gemma-3-270m-q4_k_m.gguf", "Gemma 3 model")


@pytest.fixture(scope="session")
def qwen25_coder_path() -> Path:
    return _need(MODELS_DIR / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "Qwen2.5-Coder-0.5B model")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _need(MODELS_DIR / "all-MiniLM-L6-v2", "all-MiniLM-L6-v2 safetensors folder")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED_DIR, "../shared")
