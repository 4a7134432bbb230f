// The wgmma prefill kernel that ships (prefill_wgmma.cuh, configuration WsDefault): the TMA copies
// K and V where the keys allow it, cp.async otherwise (paged keys without their pools).
#include "kernels/attention/attention.h"
#include "kernels/attention/prefill_wgmma.cuh"

namespace starserve {

bool prefill_wgmma_supported() { return wgmma_device_ok(); }

cudaError_t launch_prefill_attention_wgmma(const AttentionGpuParams& p, cudaStream_t stream) {
  return launch_ws_config<WsDefault, /*kAllowTma=*/true, /*kAllowExt=*/true>(p, stream);
}

}  // namespace starserve
