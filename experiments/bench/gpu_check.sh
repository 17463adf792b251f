#!/usr/bin/env bash
# One command that checks the GPU path on a machine with an NVIDIA GPU (about 2-4 minutes):
#   1. tests/test_kernels.py with the Triton kernels compiled for the GPU (not interpreted),
#      including the IEEE-float32 selection test that only runs on CUDA;
#   2. experiments/bench/bench_kernels_gpu.py: fused encoder+TopK vs the bare matmul, sparse vs dense decoder.
# Usage: bash experiments/bench/gpu_check.sh    (PYTHON=... to use another interpreter than .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device: gpu_check.sh compiles and times the Triton kernels on an NVIDIA GPU, and torch sees none here" >&2
  exit 1
fi
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
start=$SECONDS
timeout 240 "$PYTHON" -m pytest -q tests/test_kernels.py
timeout 120 "$PYTHON" experiments/bench/bench_kernels_gpu.py
echo "gpu_check: kernel tests and GPU benchmark passed in $((SECONDS - start)) s"
