// One thread per rotated pair. The angle is position * inv_freq in fp32 (as the references), and
// sincosf (full-range, not __sinf) because positions reach 128K+ where the fast path loses digits.
#include "kernels/rope.h"

namespace starserve {
namespace {

__global__ void rope_kernel(__nv_bfloat16* x, const int32_t* positions, const float* inv_freq, int64_t n_pairs_total,
                            int n_heads, int head_dim, int half, bool interleaved) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_pairs_total) return;
  const int i = static_cast<int>(idx % half);
  const int64_t th = idx / half;  // token * n_heads + head
  const int64_t t = th / n_heads;
  float s, c;
  sincosf(static_cast<float>(positions[t]) * inv_freq[i], &s, &c);
  __nv_bfloat16* v = x + th * head_dim;
  const int a = interleaved ? 2 * i : i;
  const int b = interleaved ? 2 * i + 1 : i + half;
  const float x0 = __bfloat162float(v[a]), x1 = __bfloat162float(v[b]);
  v[a] = __float2bfloat16(x0 * c - x1 * s);
  v[b] = __float2bfloat16(x0 * s + x1 * c);
}

}  // namespace

cudaError_t launch_rope(__nv_bfloat16* x, const int32_t* positions, const float* inv_freq, int64_t n_tokens,
                        int n_heads, int head_dim, int rope_dim, RopeStyle style, cudaStream_t stream) {
  if (rope_dim <= 0 || rope_dim % 2 != 0 || rope_dim > head_dim || n_heads <= 0 || n_tokens < 0)
    return cudaErrorInvalidValue;
  const int64_t total = n_tokens * n_heads * (rope_dim / 2);
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  rope_kernel<<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      x, positions, inv_freq, total, n_heads, head_dim, rope_dim / 2, style == RopeStyle::kInterleaved);
  return cudaGetLastError();
}

}  // namespace starserve
