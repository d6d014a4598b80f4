#!/usr/bin/env bash
# One command for a machine with one GPU (issue 14): both engines, random bf16 weights of the
# real dimensions, 64-token captions, side by side. Needs vLLM installed in the Python used:
#   pip install torch==<your CUDA build> && pip install -e '.[vllm]'   (then)  bash bench/gpu_check.sh
# `bash bench/gpu_check.sh --cpu` runs the same check on CPU with the tiny checkpoint, in
# .venv-vllm (./dev.sh setup makes it). Written and CPU-tested only: not yet run on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ "${1:-}" = "--cpu" ] && [ -x .venv-vllm/bin/python ] && [ -z "${PYTHON:-}" ]; then
    PY=.venv-vllm/bin/python
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
fi
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
exec timeout 480 "$PY" bench/gpu_check.py "$@"
