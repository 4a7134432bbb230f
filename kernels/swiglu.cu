// Element-wise, memory bound: grid-stride over elements. silu(g) = g / (1 + e^-g) with expf, which
// gives inf for g << 0 and so silu -> -0, never NaN.
#include "kernels/swiglu.h"

namespace starserve {
namespace {

__global__ void swiglu_kernel(__nv_bfloat16* out, const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = __bfloat162float(gate[i]);
    out[i] = __float2bfloat16(g / (1.0f + expf(-g)) * __bfloat162float(up[i]));
  }
}

}  // namespace

cudaError_t launch_swiglu(__nv_bfloat16* out, const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n,
                          cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  swiglu_kernel<<<static_cast<unsigned>(blocks < 132 * 32 ? blocks : 132 * 32), kThreads, 0, stream>>>(out, gate, up,
                                                                                                     n);
  return cudaGetLastError();
}

}  // namespace starserve
