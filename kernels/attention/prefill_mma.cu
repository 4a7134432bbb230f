// The mma.sync prefill kernel that ships (prefill_mma.cuh, configuration m128), and
// launch_prefill_attention, which picks the wgmma kernel where it runs and this one elsewhere.
#include "kernels/attention/attention.h"
#include "kernels/attention/prefill_mma.cuh"

namespace starserve {

// m128 (128 rows per block) measured 350 / 340 TFLOP/s on the H200 against 245 / 252 for m64
// (attention_bench, 2026-11-29; docs/perf.md).
cudaError_t launch_prefill_attention_mma(const AttentionGpuParams& p, cudaStream_t stream) {
  return launch_mma_config<MmaM128, /*kAllowExt=*/true>(p, stream);
}

// The wgmma kernel where the device and the build run it (sm_90a), else the mma.sync kernel.
cudaError_t launch_prefill_attention(const AttentionGpuParams& p, cudaStream_t stream) {
  if ((p.head_dim == 64 || p.head_dim == 128) && prefill_wgmma_supported())
    return launch_prefill_attention_wgmma(p, stream);
  return launch_prefill_attention_mma(p, stream);
}

}  // namespace starserve
