// One block per token copies one row (hidden * 2 bytes, 1-32 KB): 16-byte vectors when the rows
// are 16-byte aligned (hidden % 8 == 0 and aligned bases), else element by element.
#include "kernels/embedding.h"

#include <cstdint>

namespace starserve {
namespace {

constexpr int kThreads = 128;

template <bool kVectorized>
__global__ void __launch_bounds__(kThreads) embedding_kernel(__nv_bfloat16* out, const __nv_bfloat16* table,
                                                            const int32_t* ids, int hidden) {
  const int64_t t = blockIdx.x;
  const __nv_bfloat16* src = table + static_cast<int64_t>(ids[t]) * hidden;
  __nv_bfloat16* dst = out + t * hidden;
  if constexpr (kVectorized) {
    const int n_vec = hidden / 8;
    for (int i = threadIdx.x; i < n_vec; i += kThreads)
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
  } else {
    for (int i = threadIdx.x; i < hidden; i += kThreads) dst[i] = src[i];
  }
}

}  // namespace

cudaError_t launch_embedding_bf16(__nv_bfloat16* out, const __nv_bfloat16* table, const int32_t* ids,
                                  int64_t n_tokens, int hidden, cudaStream_t stream) {
  if (hidden <= 0 || n_tokens < 0 || n_tokens > 0x7fffffff || (n_tokens > 0 && (!out || !table || !ids)))
    return cudaErrorInvalidValue;
  if (n_tokens == 0) return cudaSuccess;
  const uintptr_t bases = reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(table);
  const bool vec = hidden % 8 == 0 && (bases & 15u) == 0;
  const unsigned grid = static_cast<unsigned>(n_tokens);
  if (vec)
    embedding_kernel<true><<<grid, kThreads, 0, stream>>>(out, table, ids, hidden);
  else
    embedding_kernel<false><<<grid, kThreads, 0, stream>>>(out, table, ids, hidden);
  return cudaGetLastError();
}

}  // namespace starserve
