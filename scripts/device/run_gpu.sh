#!/usr/bin/env bash
# On the GPU machine: build the CUDA kernels, their parity tests and the attention benchmark, run
# them, and write logs + JSON lines under $OUT (or ./gpu-out). Usage: scripts/device/run_gpu.sh [--quick]
# First tries the whole project (-DSTARSERVE_GRPC=OFF -DSTARSERVE_MPI=ON); when a dependency the
# whole project needs is missing there, configures kernels/ alone (CUDA, fmt, GoogleTest only).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
QUICK=${1:-}
BUILD=build-gpu
JOBS=$(nproc)
export NCCL_NVLS_ENABLE=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSTARSERVE_GRPC=OFF -DSTARSERVE_MPI=ON \
     -DCMAKE_CUDA_ARCHITECTURES=90a >"$OUT/configure.log" 2>&1; then
  echo "configured: whole project"
else
  echo "whole project did not configure (see configure.log); configuring kernels/ alone"
  grep -m3 -i "error\|could not find" "$OUT/configure.log" || true
  BUILD=build-gpu-kernels
  cmake -S kernels -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
    >>"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
fi
SECONDS=0
cmake --build "$BUILD" -j "$JOBS" --target gpu_kernel_tests attention_bench >"$OUT/build.log" 2>&1 ||
  { grep -B2 -A8 "error" "$OUT/build.log" | head -60; exit 1; }
echo "built in ${SECONDS}s"
BIN=$(dirname "$(find "$BUILD" -name gpu_kernel_tests -type f -perm -u+x | head -1)")

echo "== gpu tests"
(cd "$BUILD" && ctest -L gpu --output-on-failure --timeout 120 --output-junit "$OUT/gpu_tests.xml") 2>&1 |
  tee "$OUT/gpu_tests.log" | tail -25

echo "== benchmark"
timeout 180 "$BIN/attention_bench" $QUICK | tee "$OUT/bench.jsonl"
PYTHONUNBUFFERED=1 timeout 180 python3 bench/gpu/attention_peers.py $QUICK | tee "$OUT/peers.jsonl"
python3 bench/gpu/summarize.py "$OUT/bench.jsonl" "$OUT/peers.jsonl" | tee "$OUT/summary.txt"
