// The mma.sync prefill kernel (kernels/attention/prefill_mma.cuh) in the configurations that do
// not ship: m64, its first form, and m64-lean, which separates m128's two changes when measuring.
#include "kernels/attention/prefill_mma.cuh"
#include "kernels/baselines/prefill_baselines.h"

namespace starserve {
namespace {

// m64: 64 rows per block, 16 per warp, three blocks per SM (168 registers). Uncapped, ptxas
// takes ~190 (D = 64) and ~250 (D = 128), mostly to hoist ldmatrix loads; at 168 neither head dim
// spills (ptxas -v, nvcc 13.0, sm_90a). Shared memory allows it (3 x 68 KB at D = 128).
using MmaM64 = MmaConfig<4, 1, 3, false>;
// m64-lean: m64's tiling with m128's lean softmax.
using MmaM64Lean = MmaConfig<4, 1, 3, true>;

}  // namespace

cudaError_t launch_prefill_attention_mma_m64(const AttentionGpuParams& p, cudaStream_t stream) {
  return launch_mma_config<MmaM64>(p, stream);
}

cudaError_t launch_prefill_attention_mma_m64_lean(const AttentionGpuParams& p, cudaStream_t stream) {
  return launch_mma_config<MmaM64Lean>(p, stream);
}

}  // namespace starserve
