#!/usr/bin/env bash
# The llm-compressor peer (issue: quality table, point 2): prune SmolLM2-135M with llm-compressor's
# SparseGPT and Wanda 2:4 modifiers on the same C4 calibration windows as `armor-prune`, in a throwaway
# venv of its own (the project's .venv is only read, to locate the bundled model).
#
#   bash bench/peers/llmcompressor.sh                                  # 128 x 2048 windows, seed 0
#   bash bench/peers/llmcompressor.sh --n-samples 8 --seqlen 256       # quick check
#
# Arguments are passed on to bench/peers/llmcompressor_prune.py (see its --help).
# Output: bench/results/quality/llmcompressor-{sparsegpt,wanda}/ (dense HF folders, verified 2:4) and
# bench/results/quality/llmcompressor.json, which bench/quality.py evaluates with `armor-eval ppl`.
# Environment: PEERS_VENV (default bench/results/peers-venv), LLMCOMPRESSOR_VERSION, TORCH_VERSION,
# TORCH_CPU_INDEX, MODEL_DIR (an HF folder; default: the bundled smollm2-135m via the project's .venv).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
LLMCOMPRESSOR_VERSION="${LLMCOMPRESSOR_VERSION:-0.14.0.1}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"  # llmcompressor 0.14.0.1 needs torch >=2.10,<=2.14.0
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
PEERS_VENV="${PEERS_VENV:-$REPO/bench/results/peers-venv}"
PY="$PEERS_VENV/bin/python"
STAMP="$PEERS_VENV/.llmcompressor-$LLMCOMPRESSOR_VERSION-torch-$TORCH_VERSION"

# This machine's pip config lists local index folders that may not exist; drop pip's warnings about them.
quiet_pip() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if [[ ! -f "$STAMP" ]]; then
  echo "[peers] creating $PEERS_VENV (llmcompressor==$LLMCOMPRESSOR_VERSION, torch==$TORCH_VERSION+cpu)" >&2
  test -x "$PY" || python3 -m venv "$PEERS_VENV"
  quiet_pip install -q --upgrade pip
  # CPU torch together with llmcompressor, so that the resolver keeps the CPU build: a local wheel or the
  # default index first, else PyTorch's CPU index.
  quiet_pip install -q "torch==$TORCH_VERSION+cpu" "llmcompressor==$LLMCOMPRESSOR_VERSION" || \
    quiet_pip install -q --extra-index-url "$TORCH_CPU_INDEX" \
      "torch==$TORCH_VERSION+cpu" "llmcompressor==$LLMCOMPRESSOR_VERSION"
  # PyPI's torchvision/torchaudio builds do not match CPU torch; llmcompressor's text path needs neither.
  quiet_pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$STAMP"
fi

if [[ -z "${MODEL_DIR:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    echo "[peers] no project .venv to locate the bundled model: run 'make setup' or set MODEL_DIR" >&2
    exit 2
  fi
  MODEL_DIR="$(.venv/bin/python -c "from offline_prune.models import resolve_model; print(resolve_model('smollm2-135m'))")"
fi

# offline_prune.calibration needs only torch + transformers, both in the peers venv.
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" bench/peers/llmcompressor_prune.py \
  --model "$MODEL_DIR" "$@"
