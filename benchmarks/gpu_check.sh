#!/usr/bin/env bash
# One command for a GPU: the real model (SmolLM2-135M-Instruct) in 4-bit with LoRA and
# SECURA (step time, torch.cuda.max_memory_allocated), the shipped recipe
# recipes/smollm2-135m-secura-4bit.yaml with a short forgetting measurement, and the
# 8B-shaped 4-bit memory row of benchmarks/speed.py. Under 8 minutes on one recent GPU.
#
#   benchmarks/gpu_check.sh OUT_DIR        # results: OUT_DIR/gpu_check.json (+ per-section files)
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3),
# GPU_CHECK_BUDGET (seconds before later sections are skipped; default 450).
# Without CUDA it prints why, writes {"status": "skipped"} and exits 0.
set -euo pipefail

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
OUT="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" || true
fi
# the whole check is bounded: 8 minutes, then the python process is stopped
exec timeout --signal=TERM --kill-after=20 480 \
    "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$OUT" --budget "${GPU_CHECK_BUDGET:-450}"
