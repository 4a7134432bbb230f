// Memory bound (one read and one write of q per layer): one thread block per token, its threads
// stride over the token's n_heads * head_dim values; each thread reads its head's temperature
// (a cached fp32 load) and divides. A true division, not a multiply by 1 / t, so the result is
// the reference's to the last bit in fp32.
#include "kernels/head_temperature.h"

namespace starserve {
namespace {

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename T>
__global__ void head_temperature_kernel(T* x, const float* __restrict__ temperature,
                                        const int32_t* __restrict__ positions, int n_heads, int head_dim,
                                        int64_t n_positions) {
  const int64_t i = blockIdx.x;
  const int32_t pos = positions[i];
  if (pos < 0 || pos >= n_positions) return;
  const int width = n_heads * head_dim;
  T* row = x + i * width;
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    const int h = c / head_dim;
    const float t = __ldg(temperature + static_cast<int64_t>(h) * n_positions + pos);
    store_f(row + c, load_f(row + c) / t);
  }
}

template <typename T>
cudaError_t launch_typed(T* x, const float* temperature, const int32_t* positions, int64_t n_tokens, int n_heads,
                         int head_dim, int64_t n_positions, cudaStream_t stream) {
  if (n_tokens < 0 || n_heads < 1 || head_dim < 1 || n_positions < 1) return cudaErrorInvalidValue;
  if (n_tokens == 0) return cudaSuccess;
  if (!x || !temperature || !positions || n_tokens > 0x7fffffff) return cudaErrorInvalidValue;
  const int width = n_heads * head_dim;
  const int threads = width >= 256 ? 256 : ((width + 31) / 32) * 32;
  head_temperature_kernel<T><<<static_cast<unsigned>(n_tokens), threads, 0, stream>>>(x, temperature, positions,
                                                                                     n_heads, head_dim, n_positions);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_head_temperature(__nv_bfloat16* x, const float* temperature, const int32_t* positions,
                                    int64_t n_tokens, int n_heads, int head_dim, int64_t n_positions,
                                    cudaStream_t stream) {
  return launch_typed(x, temperature, positions, n_tokens, n_heads, head_dim, n_positions, stream);
}

cudaError_t launch_head_temperature(float* x, const float* temperature, const int32_t* positions, int64_t n_tokens,
                                    int n_heads, int head_dim, int64_t n_positions, cudaStream_t stream) {
  return launch_typed(x, temperature, positions, n_tokens, n_heads, head_dim, n_positions, stream);
}

}  // namespace starserve
