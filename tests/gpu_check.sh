#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The GPU half of `make gpu-check` (the Makefile builds first): every gpu-marked test, then the GPU
# benchmark, inside what is left of the GPU_CHECK_SECONDS budget counted from GPU_CHECK_START.
# Usage (from the repository root): GPU_CHECK_START=$(date +%s) tests/gpu_check.sh [python]
set -u
PY=${1:-.venv/bin/python}
BUDGET=${GPU_CHECK_SECONDS:-480}
START=${GPU_CHECK_START:-$(date +%s)}
BENCH_RESERVE=${GPU_CHECK_BENCH_SECONDS:-240}   # kept for the benchmark out of the budget

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() { echo "[gpu-check +$(( $(date +%s) - START ))s] $*"; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU visible (nvidia-smi -L failed)" >&2
  exit 2
fi
step "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
"$PY" -c "import torch, lora_kernels; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| backends on cuda:', lora_kernels.available_backends('cuda'))" || exit 1

rc=0
t=$(( $(left) - BENCH_RESERVE ))
if [ "$t" -lt 30 ]; then echo "gpu-check: only $(left)s left after the build, not enough for the tests" >&2; exit 1; fi
step "pytest -m gpu (limit ${t}s)"
timeout --kill-after=10 "$t" "$PY" -m pytest -m gpu -q -rs --durations=10 || rc=$?
[ "$rc" -eq 124 ] && echo "gpu-check: the gpu tests ran out of time (${t}s)" >&2

t=$(( $(left) - 5 ))
if [ "$t" -lt 30 ]; then echo "gpu-check: no time left for the benchmark" >&2; exit 1; fi
step "python -m bench --set gpu --out-dir bench/results --plot (limit ${t}s)"
brc=0
timeout --kill-after=10 "$t" "$PY" -m bench --set gpu --out-dir bench/results --plot || brc=$?
[ "$brc" -eq 124 ] && echo "gpu-check: the benchmark ran out of time (${t}s)" >&2
step "done (tests rc=$rc, bench rc=$brc); results: $(ls -t bench/results/*.json 2>/dev/null | head -3 | tr '\n' ' ')"
[ "$rc" -eq 0 ] && [ "$brc" -eq 0 ]
