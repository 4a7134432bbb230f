// Memory bound, grid-stride. When every pointer is 16-byte aligned a thread moves 8 elements per
// step (16-byte bf16 vectors, two 16-byte fp32 vectors); the n % 8 tail, and any unaligned call,
// go element by element. Each element is read and written by one thread, so out == a is safe.
#include "kernels/elementwise.h"

#include <cstdint>

namespace starserve {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 132 * 16;  // grid-stride beyond this: ~16 blocks per SM of an H100/H200
constexpr int kVec = 8;                   // elements per vector step

unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <bool kVectorized>
__global__ void add_bf16_kernel(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b, int64_t n) {
  int64_t done = 0;
  if constexpr (kVectorized) {
    const int64_t n_vec = n / kVec;
    for (int64_t i = thread_index(); i < n_vec; i += grid_stride()) {
      const uint4 ra = reinterpret_cast<const uint4*>(a)[i], rb = reinterpret_cast<const uint4*>(b)[i];
      const auto* ha = reinterpret_cast<const __nv_bfloat162*>(&ra);
      const auto* hb = reinterpret_cast<const __nv_bfloat162*>(&rb);
      uint4 res;
      auto* hr = reinterpret_cast<__nv_bfloat162*>(&res);
#pragma unroll
      for (int k = 0; k < kVec / 2; ++k) {
        const float2 x = __bfloat1622float2(ha[k]), y = __bfloat1622float2(hb[k]);
        hr[k] = __floats2bfloat162_rn(x.x + y.x, x.y + y.y);
      }
      reinterpret_cast<uint4*>(out)[i] = res;
    }
    done = n_vec * kVec;
  }
  for (int64_t i = done + thread_index(); i < n; i += grid_stride())
    out[i] = __float2bfloat16_rn(__bfloat162float(a[i]) + __bfloat162float(b[i]));
}

template <bool kVectorized>
__global__ void f32_to_bf16_kernel(__nv_bfloat16* dst, const float* src, int64_t n) {
  int64_t done = 0;
  if constexpr (kVectorized) {
    const int64_t n_vec = n / kVec;
    for (int64_t i = thread_index(); i < n_vec; i += grid_stride()) {
      const float4 lo = reinterpret_cast<const float4*>(src)[2 * i];
      const float4 hi = reinterpret_cast<const float4*>(src)[2 * i + 1];
      uint4 res;
      auto* hr = reinterpret_cast<__nv_bfloat162*>(&res);
      hr[0] = __floats2bfloat162_rn(lo.x, lo.y);
      hr[1] = __floats2bfloat162_rn(lo.z, lo.w);
      hr[2] = __floats2bfloat162_rn(hi.x, hi.y);
      hr[3] = __floats2bfloat162_rn(hi.z, hi.w);
      reinterpret_cast<uint4*>(dst)[i] = res;
    }
    done = n_vec * kVec;
  }
  for (int64_t i = done + thread_index(); i < n; i += grid_stride()) dst[i] = __float2bfloat16_rn(src[i]);
}

template <bool kVectorized>
__global__ void bf16_to_f32_kernel(float* dst, const __nv_bfloat16* src, int64_t n) {
  int64_t done = 0;
  if constexpr (kVectorized) {
    const int64_t n_vec = n / kVec;
    for (int64_t i = thread_index(); i < n_vec; i += grid_stride()) {
      const uint4 raw = reinterpret_cast<const uint4*>(src)[i];
      const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
      const float2 f0 = __bfloat1622float2(h[0]), f1 = __bfloat1622float2(h[1]);
      const float2 f2 = __bfloat1622float2(h[2]), f3 = __bfloat1622float2(h[3]);
      reinterpret_cast<float4*>(dst)[2 * i] = make_float4(f0.x, f0.y, f1.x, f1.y);
      reinterpret_cast<float4*>(dst)[2 * i + 1] = make_float4(f2.x, f2.y, f3.x, f3.y);
    }
    done = n_vec * kVec;
  }
  for (int64_t i = done + thread_index(); i < n; i += grid_stride()) dst[i] = __bfloat162float(src[i]);
}

// One block per row (grid-stride over rows); 16-byte moves when the row and both ends allow them.
__global__ void scatter_rows_kernel(void* const* dst_rows, const char* src, int64_t n_rows, int64_t row_bytes) {
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    char* dst = static_cast<char*>(dst_rows[r]);
    if (dst == nullptr) continue;
    const char* from = src + r * row_bytes;
    if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(from) | static_cast<uintptr_t>(row_bytes)) &
         15u) == 0) {
      for (int64_t i = threadIdx.x; i < row_bytes / 16; i += blockDim.x)
        reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(from)[i];
    } else {
      for (int64_t i = threadIdx.x; i < row_bytes; i += blockDim.x) dst[i] = from[i];
    }
  }
}

}  // namespace

cudaError_t launch_scatter_rows(void* const* dst_rows, const void* src, int64_t n_rows, int64_t row_bytes,
                                cudaStream_t stream) {
  if (n_rows < 0 || row_bytes < 0 || (n_rows > 0 && row_bytes > 0 && (!dst_rows || !src))) return cudaErrorInvalidValue;
  if (n_rows == 0 || row_bytes == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(n_rows < kMaxBlocks ? n_rows : kMaxBlocks);
  scatter_rows_kernel<<<blocks, 128, 0, stream>>>(dst_rows, static_cast<const char*>(src), n_rows, row_bytes);
  return cudaGetLastError();
}

cudaError_t launch_add_bf16(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b, int64_t n,
                            cudaStream_t stream) {
  if (n < 0 || (n > 0 && (!out || !a || !b))) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (aligned16(out) && aligned16(a) && aligned16(b))
    add_bf16_kernel<true><<<grid_for(n / kVec + n % kVec), kThreads, 0, stream>>>(out, a, b, n);
  else
    add_bf16_kernel<false><<<grid_for(n), kThreads, 0, stream>>>(out, a, b, n);
  return cudaGetLastError();
}

cudaError_t launch_f32_to_bf16(__nv_bfloat16* dst, const float* src, int64_t n, cudaStream_t stream) {
  if (n < 0 || (n > 0 && (!dst || !src))) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (aligned16(dst) && aligned16(src))
    f32_to_bf16_kernel<true><<<grid_for(n / kVec + n % kVec), kThreads, 0, stream>>>(dst, src, n);
  else
    f32_to_bf16_kernel<false><<<grid_for(n), kThreads, 0, stream>>>(dst, src, n);
  return cudaGetLastError();
}

cudaError_t launch_bf16_to_f32(float* dst, const __nv_bfloat16* src, int64_t n, cudaStream_t stream) {
  if (n < 0 || (n > 0 && (!dst || !src))) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (aligned16(dst) && aligned16(src))
    bf16_to_f32_kernel<true><<<grid_for(n / kVec + n % kVec), kThreads, 0, stream>>>(dst, src, n);
  else
    bf16_to_f32_kernel<false><<<grid_for(n), kThreads, 0, stream>>>(dst, src, n);
  return cudaGetLastError();
}

}  // namespace starserve
