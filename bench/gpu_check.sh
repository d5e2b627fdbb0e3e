#!/usr/bin/env bash
# GPU check of the training path (bench/gpu_check.py): attention backends against fp32, the kernels
# alone (FlexAttention as a candidate), ViT-B forward+backward eager and compiled (ms, memory,
# TFLOP/s, MFU), host syncs and a profile of one step, then 50 hlip-train steps (ct-rate preset,
# synthetic shards written here): today's eager sdpa path against the compiled auto path.
# One prepared run, under 5 minutes on an H100/H200; prints one markdown block.
#   bash bench/gpu_check.sh [OUT_FILE]     (default: $OUT/gpu_check.md, else ./gpu_check.md)
# Wheels in .whl/ (xformers built for this torch, hlip's dependencies, ...) are installed into
# /tmp/site first when present; the machine's own CUDA torch (>= 2.10) is used.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${1:-${OUT:-.}/gpu_check.md}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || true
timeout 290 python3 bench/gpu_check.py --budget-s 270 --out "$out"
