#!/usr/bin/env bash
# On a machine with several GPUs (the device tool's nvidia-h200-x2/-x4/-x8): Star Attention with one
# rank per GPU over NCCL. Builds what it runs (dependencies from scripts/device/env.sh), then, as asked:
#   tests   — the cross-rank exactness tests with one rank per GPU (star_gpu_mpi_tests and
#             nccl_comm_tests under mpirun -np <GPUs>) and the merge kernels' parity tests;
#   merge   — bench/gpu/merge_bench (phase-2 merge per layer, all-reduce vs all-gather, decode and
#             prefill sizes) next to bench/gpu/merge_peers.py (the same merges in torch over NCCL);
#   bench   — bench/gpu/model_bench on every GPU (mpirun -np <GPUs>; modes exact in its default
#             layout, star with block 1/4, star with 32K blocks) and on one GPU (global) in the same
#             job, random Llama-3-8B shape; MULTI_LENGTHS, MULTI_MODES, MULTI_GLOBAL_LENGTHS (empty: no
#             global run) override;
#   scaling — the context-parallel table of docs/perf.md in one call: TTFT and decode of the 8B shape
#             at 128K and 256K for global on 1 GPU, then exact unbalanced (exact@contiguous), exact
#             balanced (exact@zigzag), star 1/4 and star with 32K blocks on 2, 4 and 8 GPUs (the
#             counts the machine has), one model_bench job per GPU count; then the tables
#             (bench/gpu/summarize_multi.py) and the cost model's check against them
#             (bench/cp_cost_model.py --check). SCALING_LENGTHS, SCALING_MODES, SCALING_RANKS and
#             SCALING_GLOBAL_LENGTHS (empty: no global run) override.
# Usage: scripts/device/run_multi_gpu.sh [tests] [merge] [bench] [scaling]   (default: tests merge bench)
# The first call on a fresh machine also builds (minutes): on the 8-GPU kind run `tests` first and
# `scaling` in a second call, so that the build and the measurements each fit one call's limit.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
STEPS=${*:-tests merge bench}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source scripts/device/env.sh || exit 1
BUILD=${STARSERVE_DEVICE_BUILD:-build-gpu}
NGPU=$(nvidia-smi -L | wc -l)
echo "GPUs: $NGPU"
nvidia-smi topo -m 2>/dev/null | head -8

SECONDS=0
if [ ! -f "$BUILD/build.ninja" ]; then
  STARSERVE_GRPC=${STARSERVE_GRPC:-OFF} starserve_configure "$BUILD" >"$OUT/configure_multi.log" 2>&1 ||
    { tail -30 "$OUT/configure_multi.log"; exit 1; }
fi
cmake --build "$BUILD" -j "$(nproc)" --target gpu_kernel_tests star_gpu_mpi_tests nccl_comm_tests model_bench \
  merge_bench >"$OUT/build_multi.log" 2>&1 || { grep -B2 -A10 "error" "$OUT/build_multi.log" | head -80; exit 1; }
echo "built in ${SECONDS}s"
BIN=$BUILD/bin
MPI=(mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST
  -x NVSHMEM_DISABLE_NVLS -x LD_LIBRARY_PATH)

for step in $STEPS; do
  case $step in
  tests)
    echo "== exactness across GPUs, one rank per GPU ($NGPU ranks)"
    for t in nccl_comm_tests star_gpu_mpi_tests; do
      timeout 200 "${MPI[@]}" -np "$NGPU" "$BIN/$t" 2>&1 | tee -a "$OUT/multi_tests.log" |
        grep -E "max \||PASSED|FAILED|SKIPPED" | head -12
    done
    timeout 120 "$BIN/gpu_kernel_tests" --gtest_filter='*Merge*' 2>&1 | tee "$OUT/merge_kernel_tests.log" | tail -3
    ;;
  merge)
    echo "== phase-2 merge per layer, $NGPU GPUs"
    timeout 120 "${MPI[@]}" -np "$NGPU" "$BIN/merge_bench" | tee "$OUT/merge_bench.jsonl"
    LD_LIBRARY_PATH="$STARSERVE_BASE_LD_LIBRARY_PATH" timeout 180 "${MPI[@]}" -np "$NGPU" python3 bench/gpu/merge_peers.py |
      tee "$OUT/merge_peers.jsonl"
    ;;
  scaling)
    L=${SCALING_LENGTHS:-131072,262144}
    M=${SCALING_MODES:-exact@contiguous,exact@zigzag,star,star@32768}
    G=${SCALING_GLOBAL_LENGTHS-$L}
    rm -f "$OUT"/scaling_*gpu.jsonl
    if [ -n "$G" ]; then
      echo "== scaling: global on one GPU (lengths $G)"
      timeout 200 "$BIN/model_bench" --lengths "$G" --modes global | tee "$OUT/scaling_1gpu.jsonl"
    fi
    for np in ${SCALING_RANKS:-2 4 8}; do
      if [ "$np" -gt "$NGPU" ]; then echo "== scaling: $np GPUs: this machine has $NGPU, skipped"; continue; fi
      echo "== scaling: $np GPUs (lengths $L, modes $M)"
      timeout 300 "${MPI[@]}" -np "$np" "$BIN/model_bench" --lengths "$L" --modes "$M" --blocks 4 |
        tee "$OUT/scaling_${np}gpu.jsonl"
    done
    python3 bench/gpu/summarize_multi.py model "$OUT"/scaling_*gpu.jsonl | tee "$OUT/scaling_summary.md"
    python3 bench/cp_cost_model.py --check --data "$OUT"/scaling_*gpu.jsonl | tee "$OUT/scaling_model_check.jsonl"
    ;;
  bench)
    L=${MULTI_LENGTHS:-32768,65536,131072}
    M=${MULTI_MODES:-exact,star,star@32768}
    G=${MULTI_GLOBAL_LENGTHS-$L}
    echo "== model bench on $NGPU GPUs (lengths $L, modes $M)"
    timeout 560 "${MPI[@]}" -np "$NGPU" "$BIN/model_bench" --lengths "$L" --modes "$M" --blocks 4 |
      tee "$OUT/multi_model_bench.jsonl"
    if [ -n "$G" ]; then
      echo "== global on one GPU (lengths $G)"
      timeout 560 "$BIN/model_bench" --lengths "$G" --modes global | tee "$OUT/multi_model_bench_1gpu.jsonl"
    fi
    ;;
  esac
done
