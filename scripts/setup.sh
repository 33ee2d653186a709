#!/usr/bin/env bash
# Creates .venv (if missing) with a CPU build of torch on machines without an NVIDIA GPU, then
# installs flowrl (editable) with its test extras. Safe to run again; it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install "torch==2.13.0"
  else
    # A plain `torch` from PyPI is a multi-GB CUDA build: take the CPU build instead.
    $PIP install "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu --timeout 30 --retries 1
  fi
fi
$PIP install -q -e ".[test,rewards]"
