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

__global__ void swiglu_fused_kernel(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int64_t n, int64_t ffn) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t t = i / ffn, j = i - t * ffn;
    const __nv_bfloat16* row = gate_up + t * 2 * ffn;
    const float g = __bfloat162float(row[j]);
    out[i] = __float2bfloat16(g / (1.0f + expf(-g)) * __bfloat162float(row[ffn + j]));
  }
}

}  // namespace

cudaError_t launch_swiglu_fused(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int64_t n_tokens, int64_t ffn,
                                cudaStream_t stream) {
  if (n_tokens < 0 || ffn < 0) return cudaErrorInvalidValue;
  const int64_t n = n_tokens * ffn;
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  swiglu_fused_kernel<<<static_cast<unsigned>(blocks < 132 * 32 ? blocks : 132 * 32), kThreads, 0, stream>>>(
      out, gate_up, n, ffn);
  return cudaGetLastError();
}

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
