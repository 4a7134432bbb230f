#!/usr/bin/env bash
# On the GPU machine: build the whole project, run every ctest with label gpu (CUDA kernel parity,
# NCCL communicator), the attention benchmark with its peers and the sampling benchmark; logs and
# JSON lines under $OUT (or ./gpu-out). Usage: scripts/device/run_gpu.sh [--quick]
# Carry third_party/debs with the call (scripts/device/fetch_debs.sh fills it, ~15 MB): env.sh
# unpacks it into a prefix for what the machine lacks (PCRE2, nlohmann_json, CLI11, gRPC C++).
# gRPC is on when it configures and builds from the debs, else the build goes on without it.
# When the whole project does not configure, falls back to kernels/ alone (CUDA, fmt, GoogleTest
# only): the kernel tests and the benchmark still run, starserve and the other gpu tests do not.
# Exit status: non-zero when the kernel targets do not build (nothing else runs), or when the rest
# of the project does not build or a gpu ctest fails (reported on the last line, after everything
# has run).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
QUICK=${1:-}
BUILD="build-gpu"
JOBS=$(nproc)
FAILED=()
source scripts/device/env.sh 2>"$OUT/deps.log" || true
[ -s "$OUT/deps.log" ] && cat "$OUT/deps.log"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
WHOLE=0
if starserve_configure "$BUILD" >"$OUT/configure.log" 2>&1; then
  WHOLE=1
  echo "configured: whole project (gRPC ${STARSERVE_GRPC_ON})"
else
  echo "whole project did not configure (see configure.log); configuring kernels/ alone"
  grep -m3 -i "error\|could not find" "$OUT/configure.log" || true
  BUILD="build-gpu-kernels"
  cmake -S kernels -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
    >>"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
fi
SECONDS=0
cmake --build "$BUILD" -j "$JOBS" --target gpu_kernel_tests attention_bench sampling_bench >"$OUT/build.log" 2>&1 ||
  { grep -B2 -A8 "error" "$OUT/build.log" | head -60; exit 1; }
echo "built kernel tests and benchmark in ${SECONDS}s"
BIN=$(dirname "$(find "$BUILD" -name gpu_kernel_tests -type f -perm -u+x | head -1)")

# The rest of the project: the default target, so that every executable the gpu ctests run is
# there (gpu_model_tests; nccl_comm_tests and star_gpu_mpi_tests where NCCL and MPI were found)
# along with the server binary. A list of targets here would miss the next gpu test added.
if [ $WHOLE = 1 ]; then
  build_app() {
    echo "building the default target (gRPC ${STARSERVE_GRPC_ON})" >>"$OUT/build_app.log"
    cmake --build "$BUILD" -j "$JOBS" >>"$OUT/build_app.log" 2>&1
  }
  SECONDS=0
  : >"$OUT/build_app.log"
  build_app
  rc=$?
  if [ $rc != 0 ] && [ "$STARSERVE_GRPC_ON" = ON ]; then
    echo "the project did not build with gRPC (see build_app.log); building again with -DSTARSERVE_GRPC=OFF"
    grep -m5 "error" "$OUT/build_app.log" || true
    STARSERVE_GRPC=OFF starserve_configure "$BUILD" >>"$OUT/configure.log" 2>&1 && build_app
    rc=$?
  fi
  if [ $rc = 0 ]; then
    echo "built the whole project in ${SECONDS}s (gRPC ${STARSERVE_GRPC_ON})"
  else
    echo "the project did not build (see build_app.log)"
    grep -B2 -A8 "error" "$OUT/build_app.log" | head -40
    FAILED+=("project build")
  fi
fi

echo "== gpu tests"
(cd "$BUILD" && ctest -L gpu --output-on-failure --timeout 180 --output-junit "$OUT/gpu_tests.xml") 2>&1 |
  tee "$OUT/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || FAILED+=("gpu ctest")

echo "== benchmark"
timeout 180 "$BIN/attention_bench" ${QUICK:+"$QUICK"} | tee "$OUT/bench.jsonl"
# Python with torch runs without the unpacked libraries on its loader path.
PYTHONUNBUFFERED=1 LD_LIBRARY_PATH="${STARSERVE_BASE_LD_LIBRARY_PATH:-}" timeout 180 \
  python3 bench/gpu/attention_peers.py ${QUICK:+"$QUICK"} | tee "$OUT/peers.jsonl"
python3 bench/gpu/summarize.py "$OUT/bench.jsonl" "$OUT/peers.jsonl" | tee "$OUT/summary.txt"
# Sampling kernel next to its peer, the host Sampler after a download of the logits.
timeout 120 "$BIN/sampling_bench" ${QUICK:+"$QUICK"} | tee "$OUT/sampling_bench.jsonl"

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "status: FAILED: ${FAILED[*]}"
  exit 1
fi
echo "status: ok"
