// Element-wise, memory bound: grid-stride over the elements; the bias row stays in L1 / L2.
#include "kernels/bias.h"

namespace starserve {
namespace {

__global__ void add_bias_kernel(__nv_bfloat16* x, const __nv_bfloat16* bias, int64_t n, int64_t n_cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(bias[i % n_cols]));
}

}  // namespace

cudaError_t launch_add_bias(__nv_bfloat16* x, const __nv_bfloat16* bias, int64_t n_rows, int64_t n_cols,
                            cudaStream_t stream) {
  if (n_rows < 0 || n_cols < 0) return cudaErrorInvalidValue;
  const int64_t n = n_rows * n_cols;
  if (n == 0) return cudaSuccess;
  if (!x || !bias) return cudaErrorInvalidValue;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  add_bias_kernel<<<static_cast<unsigned>(blocks < 132 * 32 ? blocks : 132 * 32), kThreads, 0, stream>>>(x, bias, n,
                                                                                                       n_cols);
  return cudaGetLastError();
}

}  // namespace starserve
