#!/usr/bin/env bash
# The speed figures of issue 29 on this machine, in one call (about 20 minutes on 2 idle cores).
# Each benchmark prints the machine (CPU, SIMD, native bf16, threads, load) and measures its peer in
# the same run, so the ratios hold for the machine that made them; run it on each CPU kind.
#   1. peak.py: fp32 and bf16 matmul peak;
#   2. bench_inference.py --part speed: 2-D tiled prediction vs MONAI (torch auto/fp32/bf16, ONNX Runtime);
#   3. bench_inference.py --part flops: the forward's fraction of the matmul peak (UNet(32), nuclei net);
#   4. bench_volume.py: 3-D tiled prediction vs MONAI (64 x 256 x 256, patch 64^3);
#   5. bench_training.py: unetseg-train vs a bare fp32 loop; the data pipeline alone;
#   6. profile_predict.py: where prediction's time goes, per stage (torch.profiler);
#   7. profile_training_step.py: a training step per operator, standard layout and channels-last.
# Usage: benchmarks/speed_goals.sh [--isa avx2] [OUT_FOLDER]   (default /tmp/unetseg_speed; one .txt per benchmark)
#   --isa avx2: measure an AVX2-only machine on a newer CPU: oneDNN, MKL and ATen are capped to AVX2, so
#   convolutions and matmuls run their AVX2 kernels and bfloat16 is emulated (unetseg then picks float32).
set -euo pipefail
if [[ ${1:-} == --isa ]]; then
    [[ ${2:-} == avx2 ]] || { echo "speed_goals.sh: --isa takes avx2 (the one older CPU kind it emulates), not '${2:-}'" >&2; exit 2; }
    export ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2
    shift 2
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data/dsb2018}
OUT=${1:-/tmp/unetseg_speed}
mkdir -p "$OUT"
"$PYTHON" -c "import monai" 2>/dev/null || "$PYTHON" -m pip install -q monai  # the peer, for these benchmarks only
run() { local name=$1; shift; echo "== $name: $*"; "$PYTHON" "$@" 2>&1 | grep -v -e Warning -e USDT -e gpuGetDeviceCount | tee "$OUT/$name.txt"; }
run peak benchmarks/peak.py
run inference_speed benchmarks/bench_inference.py --part speed --rounds 2
run inference_flops benchmarks/bench_inference.py --part flops --rounds 3
run volume benchmarks/bench_volume.py --rounds 2
run training benchmarks/bench_training.py --data "$DATA" --steps 6 --warmup 2
run profile benchmarks/profile_predict.py --data "$DATA"
run profile_training benchmarks/profile_training_step.py
