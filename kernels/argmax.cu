// One block per row. Each thread scans its elements in increasing index order and keeps the first
// strict maximum (x > best, starting from -inf: NaN and -inf never take it); the block then
// reduces (value, index) pairs with ties to the smaller index, so the result equals the serial
// scan's whatever the thread count. 16-byte loads when the row is 16-byte aligned.
#include "kernels/argmax.h"

#include <cmath>
#include <cstdint>

namespace starserve {
namespace {

constexpr int kThreads = 1024;
constexpr int kNone = 0x7fffffff;  // index of "no candidate yet" (its value is -inf)

struct Best {
  float value;
  int index;
};

__device__ __forceinline__ void consider(Best& b, float x, int i) {
  if (x > b.value) {
    b.value = x;
    b.index = i;
  }
}

// Larger value wins; equal values (candidates, or two empty slots) take the smaller index.
__device__ __forceinline__ Best pick(Best a, Best b) {
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

template <bool kVectorized>
__global__ void __launch_bounds__(kThreads) argmax_rows_kernel(int32_t* out, const float* logits, int cols) {
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * cols;
  Best b{-INFINITY, kNone};
  int done = 0;
  if constexpr (kVectorized) {
    const int n_vec = cols / 4;
    for (int v = threadIdx.x; v < n_vec; v += kThreads) {
      const float4 x = reinterpret_cast<const float4*>(row)[v];
      consider(b, x.x, 4 * v);
      consider(b, x.y, 4 * v + 1);
      consider(b, x.z, 4 * v + 2);
      consider(b, x.w, 4 * v + 3);
    }
    done = n_vec * 4;
  }
  for (int64_t i = done + threadIdx.x; i < cols; i += kThreads) consider(b, row[i], static_cast<int>(i));

  for (int off = 16; off > 0; off /= 2) {
    const Best o{__shfl_xor_sync(0xffffffffu, b.value, off), __shfl_xor_sync(0xffffffffu, b.index, off)};
    b = pick(b, o);
  }
  __shared__ Best s_best[kThreads / 32];
  if (threadIdx.x % 32 == 0) s_best[threadIdx.x / 32] = b;
  __syncthreads();
  if (threadIdx.x == 0) {
    Best r = s_best[0];
    for (int w = 1; w < kThreads / 32; ++w) r = pick(r, s_best[w]);
    out[blockIdx.x] = r.index == kNone ? 0 : r.index;
  }
}

}  // namespace

cudaError_t launch_argmax_rows(int32_t* out, const float* logits, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || cols < 1 || cols > 0x7fffffff || (rows > 0 && (!out || !logits)))
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const bool vec = cols % 4 == 0 && (reinterpret_cast<uintptr_t>(logits) & 15u) == 0;
  const unsigned grid = static_cast<unsigned>(rows);
  if (vec)
    argmax_rows_kernel<true><<<grid, kThreads, 0, stream>>>(out, logits, static_cast<int>(cols));
  else
    argmax_rows_kernel<false><<<grid, kThreads, 0, stream>>>(out, logits, static_cast<int>(cols));
  return cudaGetLastError();
}

}  // namespace starserve
