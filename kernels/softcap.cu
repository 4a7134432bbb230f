// Element-wise, memory bound: grid-stride over elements. tanhf, as the reference's std::tanh
// (within a few fp32 ulps), saturating to +-cap.
#include "kernels/softcap.h"

namespace starserve {
namespace {

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename T>
__global__ void scale_softcap_kernel(T* x, float scale, float cap, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = load_f(x + i);
    store_f(x + i, cap > 0.0f ? cap * tanhf(v * scale / cap) : v * scale);
  }
}

template <typename T>
cudaError_t launch_typed(T* x, float scale, float cap, int64_t n, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (!x) return cudaErrorInvalidValue;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  scale_softcap_kernel<T><<<static_cast<unsigned>(blocks < 132 * 32 ? blocks : 132 * 32), kThreads, 0, stream>>>(
      x, scale, cap, n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_scale_softcap(__nv_bfloat16* x, float scale, float cap, int64_t n, cudaStream_t stream) {
  return launch_typed(x, scale, cap, n, stream);
}

cudaError_t launch_scale_softcap(float* x, float scale, float cap, int64_t n, cudaStream_t stream) {
  return launch_typed(x, scale, cap, n, stream);
}

}  // namespace starserve
