#!/usr/bin/env bash
# The one-command GPU check (issue 24), about 8 minutes on one H100 or H200:
#   1. bench.bench_moe_layer --device cuda: bf16 forward + backward of one MoE layer at three shapes against
#      transformers' grouped_mm / batched_mm (and deepgemm / sonicmoe where their kernels load) and cuBLAS
#      dense matmuls -> bench/results/moe_layer_cuda.{json,md}
#   2. bench.bench_gpu_step --device cuda: a stage-3 step of a ~1B-shaped upcycled decoder, STGC off / on,
#      torch.compile off / on: tokens/s, peak memory, STGC overhead, host syncs in the forward
#      -> bench/results/gpu_step.{json,md}
# CPU mode (tiny shapes; the smoke test the tests run): bench/gpu.sh --cpu [results folder]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ "${1:-}" == "--cpu" ]]; then
  # torch.compile with the eager backend: the graph capture is exercised, not minutes of C++ compilation
  exec "$PY" -m bench.bench_gpu_step --device cpu --quick --compile-backend eager --results "${2:-bench/results}"
fi
"$PY" -m bench.bench_moe_layer --device cuda --quick
"$PY" -m bench.bench_gpu_step --device cuda
