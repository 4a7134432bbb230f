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

// One thread per pair of a head's dims, over every (token, head slot): slots [0, n_heads) are q,
// [n_heads, n_heads + n_kv) k, then v. Pairs i < rope_dim / 2 of q and k rotate (the same pairing
// and arithmetic as rope_kernel); the remaining dims, and all of v, are copied two at a time.
__global__ void split_qkv_rope_kernel(__nv_bfloat16* q, __nv_bfloat16* k, __nv_bfloat16* v,
                                      const __nv_bfloat16* qkv, const int32_t* positions, const float* inv_freq,
                                      int64_t total, int n_heads, int n_kv_heads, int head_dim, int half,
                                      bool interleaved) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int pairs = head_dim / 2;
  const int slots = n_heads + 2 * n_kv_heads;
  const int i = static_cast<int>(idx % pairs);
  const int64_t ts = idx / pairs;
  const int slot = static_cast<int>(ts % slots);
  const int64_t t = ts / slots;
  const __nv_bfloat16* src = qkv + ts * head_dim;  // rows are slots * head_dim wide
  __nv_bfloat16* dst;
  if (slot < n_heads) {
    dst = q + (t * n_heads + slot) * head_dim;
  } else if (slot < n_heads + n_kv_heads) {
    dst = k + (t * n_kv_heads + (slot - n_heads)) * head_dim;
  } else {
    dst = v + (t * n_kv_heads + (slot - n_heads - n_kv_heads)) * head_dim;
    dst[2 * i] = src[2 * i];
    dst[2 * i + 1] = src[2 * i + 1];
    return;
  }
  if (i >= half) {  // beyond rope_dim: copied
    const int d = 2 * half + 2 * (i - half);
    dst[d] = src[d];
    dst[d + 1] = src[d + 1];
    return;
  }
  float s, c;
  sincosf(static_cast<float>(positions[t]) * inv_freq[i], &s, &c);
  const int a = interleaved ? 2 * i : i;
  const int b = interleaved ? 2 * i + 1 : i + half;
  const float x0 = __bfloat162float(src[a]), x1 = __bfloat162float(src[b]);
  dst[a] = __float2bfloat16(x0 * c - x1 * s);
  dst[b] = __float2bfloat16(x0 * s + x1 * c);
}

}  // namespace

cudaError_t launch_split_qkv_rope(__nv_bfloat16* q, __nv_bfloat16* k, __nv_bfloat16* v, const __nv_bfloat16* qkv,
                                  const int32_t* positions, const float* inv_freq, int64_t n_tokens, int n_heads,
                                  int n_kv_heads, int head_dim, int rope_dim, RopeStyle style, cudaStream_t stream) {
  if (rope_dim <= 0 || rope_dim % 2 != 0 || rope_dim > head_dim || head_dim % 2 != 0 || n_heads <= 0 ||
      n_kv_heads <= 0 || n_tokens < 0)
    return cudaErrorInvalidValue;
  const int64_t total = n_tokens * (n_heads + 2 * n_kv_heads) * (head_dim / 2);
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  split_qkv_rope_kernel<<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      q, k, v, qkv, positions, inv_freq, total, n_heads, n_kv_heads, head_dim, rope_dim / 2,
      style == RopeStyle::kInterleaved);
  return cudaGetLastError();
}

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
