#!/usr/bin/env bash
# The packaging as a user meets it: `pip wheel .` (pip's isolated build, scikit-build-core driving CMakeLists.txt),
# the wheel installed into a fresh venv outside the source tree, then started through the README's Ollama launcher
# (a `llama-server` script in a lib/ollama folder). Checks that the installed package (not the source tree) is what
# runs, that `llama-server --help` works, and that /health and a greedy /completion answer with the same text as
# the source-tree build in llama-server mode. Run after `make build` (CI: after `make test`).
#   scripts/check_wheel.sh [--wheel FILE]   (--wheel: check a wheel built before instead of building one)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
CACHE=${OLLAMA_PYRUNNER_CACHE:-$HOME/.cache/ollama-pyrunner}
MODEL=${MODEL:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}
SRC_PY=${SRC_PY:-$ROOT/.venv/bin/python}
WHEEL=""
if [[ ${1:-} == --wheel ]]; then WHEEL=$(realpath "$2"); fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-wheel.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
say() { printf 'check_wheel: %s\n' "$*"; }
fail() { say "FAIL: $*"; exit 1; }

[[ -f $MODEL ]] || fail "no model at $MODEL (make models)"
[[ -x $SRC_PY ]] || fail "no source-tree venv at $SRC_PY (make build)"

if [[ -z $WHEEL ]]; then
  say "building the wheel (pip wheel ., isolated build)"
  start=$SECONDS
  "$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
  WHEEL=$(ls "$WORK"/dist/ollama_pyrunner-*.whl)
  say "built $(basename "$WHEEL") in $((SECONDS - start)) s"
fi

say "what the wheel holds"
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
modules = [n for n in names if n.startswith("ggml/_ggml_api.") and n.endswith(".so")]
assert len(modules) == 1, f"want one compiled ggml/_ggml_api module, got {modules}"
for pkg in ("ggml", "ml", "models", "kvcache", "runner", "runner/llamaserver"):
    assert f"{pkg}/__init__.py" in names, f"package {pkg} missing"
stray = [n for n in names if n.startswith(("tests/", "bench/", "build/", "scripts/"))]
assert not stray, f"not part of the package: {stray[:5]}"
entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
scripts = zipfile.ZipFile(sys.argv[1]).read(entry).decode()
for line in ("ollama-pyrunner = runner.cli:main", "llama-server = runner.llamaserver.main:main"):
    assert line in scripts, f"console script missing: {line}"
print(f"  {len(names)} files, module {modules[0]}")
EOF

say "installing it into a fresh venv"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"
cd "$WORK"  # nothing below may import from the source tree
unset PYTHONPATH

"$WORK/venv/bin/python" - "$WORK/venv" <<'EOF'
import os, sys
import ggml._ggml_api as api, runner
venv = os.path.realpath(sys.argv[1])
for mod in (api, runner):
    assert os.path.realpath(mod.__file__).startswith(venv), f"{mod.__name__} from {mod.__file__}, not the venv"
print(f"  imports from {os.path.dirname(os.path.dirname(api.__file__))}")
EOF
"$WORK/venv/bin/llama-server" --help > "$WORK/help.txt" || fail "llama-server --help exited $?"
grep -q -- "--model" "$WORK/help.txt" || fail "llama-server --help does not list --model"

# The README's launcher, as Ollama (v0.30+) finds it: lib/ollama/llama-server execs our entry point.
mkdir -p "$WORK/lib/ollama"
printf '#!/bin/sh\nexec %s serve "$@"\n' "$WORK/venv/bin/ollama-pyrunner" > "$WORK/lib/ollama/llama-server"
chmod +x "$WORK/lib/ollama/llama-server"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Starts a server, waits for /health, sends one greedy /completion, prints its content, stops the server.
complete() {  # name port cmd...
  local name=$1 port=$2 pid rc=0; shift 2
  "$@" --model "$MODEL" --port "$port" -t 2 -c 1024 --no-webui --offline > "$WORK/$name.log" 2>&1 &
  pid=$!
  "$PY" - "$port" "$name" <<'EOF' || rc=$?
import json, sys, time, urllib.error, urllib.request
port, name = int(sys.argv[1]), sys.argv[2]
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 180
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            body = json.load(r)
            assert body == {"status": "ok"}, body
            break
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        if time.monotonic() > deadline:
            sys.exit(f"{name}: /health not ok after 180 s ({e})")
        time.sleep(0.5)
req = {"prompt": "The capital of France is", "n_predict": 24, "temperature": 0, "cache_prompt": False}
r = urllib.request.urlopen(urllib.request.Request(base + "/completion", json.dumps(req).encode(),
                                                  {"Content-Type": "application/json"}), timeout=120)
out = json.load(r)
assert out["content"] and out["tokens_predicted"] > 0, out
print(json.dumps(out["content"]))
EOF
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [[ $rc != 0 ]]; then sed 's/^/    /' "$WORK/$name.log" | tail -20 >&2; return 1; fi
}

say "the installed wheel through the launcher, and the source tree, both in llama-server mode"
got=$(complete wheel "$(free_port)" "$WORK/lib/ollama/llama-server")
want=$(cd "$ROOT" && export PYTHONPATH=$ROOT && complete source "$(free_port)" "$SRC_PY" -m runner.cli serve)
say "wheel:  $got"
say "source: $want"
[[ $got == "$want" ]] || fail "the installed wheel's greedy text differs from the source tree's"
say "OK"
