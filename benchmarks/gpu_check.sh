#!/usr/bin/env bash
# The GPU checks in one call, for a machine with CUDA (run from anywhere; about 10 minutes):
#   1. the gpu-marked tests (CUDA matches the CPU, pinned band transfer, automatic precision);
#   2. bench_gpu.py: predict_tiled in Mpx/s (fp32, automatic bf16, torch.compile) and a bare
#      training step in steps/s (fp32, bf16 + channels-last, compiled), each as a fraction of the
#      measured bf16 matmul peak;
#   3. bench_training.py: unetseg-train (Lightning, data pipeline, automatic precision) against a
#      bare fp32 loop, in steps/s with the split of a step; DSB2018 if DATA exists, else the
#      embedded synthetic nuclei.
# Prints everything; exits non-zero if a test or a benchmark fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA=${DATA:-../shared/data/dsb2018}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
"$PYTHON" -m pytest -q -m gpu tests
"$PYTHON" benchmarks/bench_gpu.py
"$PYTHON" benchmarks/bench_training.py --data "$DATA" --steps 20 --warmup 5 --batch-size 32
