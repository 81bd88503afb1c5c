"""The CUDA decision of the build (cmake/detect_cuda.cmake) on fake toolchains: CUDA only with an nvcc that runs
and a GPU that nvidia-smi lists, and otherwise a message that says which of the two is missing."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CMAKE = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
NVCC_OK = ("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
           "echo 'Cuda compilation tools, release 13.0, V13.0.88'\n")
SMI_GPU = "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0000)'\n"
SMI_NONE = "#!/bin/sh\necho 'No devices were found'\nexit 6\n"


def detect(tmp_path: Path, tools: dict[str, str]) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in tools.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    r = subprocess.run([CMAKE, "-P", str(REPO / "cmake" / "detect_cuda.cmake")], env={"PATH": str(bin_dir)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stderr.strip()


@pytest.fixture(autouse=True)
def _need_cmake() -> None:
    if not Path(CMAKE).exists():
        pytest.skip("no cmake")


def test_no_nvcc(tmp_path: Path) -> None:
    assert detect(tmp_path, {"nvidia-smi": SMI_GPU}) == "CUDA=OFF: no nvcc on PATH"


@pytest.mark.parametrize("stub", ["#!/bin/sh\nexit 1\n", "#!/bin/sh\necho hello\n"])
def test_stub_nvcc(tmp_path: Path, stub: str) -> None:
    out = detect(tmp_path, {"nvcc": stub, "nvidia-smi": SMI_GPU})
    assert out.startswith("CUDA=OFF: ") and out.endswith("does not run as a CUDA compiler (a stub?)")


def test_nvcc_without_driver(tmp_path: Path) -> None:
    assert detect(tmp_path, {"nvcc": NVCC_OK}) == \
        "CUDA=OFF: nvcc found but no nvidia-smi, so no NVIDIA driver to see a GPU"


def test_nvcc_without_gpu(tmp_path: Path) -> None:
    out = detect(tmp_path, {"nvcc": NVCC_OK, "nvidia-smi": SMI_NONE})
    assert out == "CUDA=OFF: nvcc found but nvidia-smi sees no GPU"


def test_nvcc_and_gpu(tmp_path: Path) -> None:
    assert detect(tmp_path, {"nvcc": NVCC_OK, "nvidia-smi": SMI_GPU}) == "CUDA=ON"
