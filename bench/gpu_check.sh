#!/usr/bin/env bash
# GPU check of the vision trunk: xformers vs sdpa (bf16) and ViT-B forward+backward at 4 and 8
# scans (time, peak memory, TFLOP/s, MFU). One prepared run, well under 5 minutes on an H100/H200.
#   bash bench/gpu_check.sh [OUT_FILE]     (default: $OUT/gpu_check.md, else ./gpu_check.md)
# Wheels in .whl/ (torch>=2.10, xformers, ...) are installed into /tmp/site first when present.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${1:-${OUT:-.}/gpu_check.md}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 280 python3 bench/gpu_check.py --out "$out"
