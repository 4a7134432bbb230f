// One thread per pair of a head's dims over every (token, head slot): slots [0, n_heads) are q
// (when the op splits q too), then k, then v. A k pair mixes both of its dims in fp32 and rotates
// them as rope_kernel does (sincosf of position * inv_freq); v and the dims beyond rope_dim are
// mixed and copied. The previous token's raw values are read from the sources (never from the
// outputs), so tokens run in any order.
#include "kernels/kv_shift.h"

namespace starserve {
namespace {

__global__ void kv_shift_rope_kernel(KvShiftParams p, int64_t total, int q_slots) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int pairs = p.head_dim / 2;
  const int half = p.rope_dim / 2;
  const int slots = q_slots + 2 * p.n_kv_heads;
  const int i = static_cast<int>(idx % pairs);
  const int64_t ts = idx / pairs;
  const int slot = static_cast<int>(ts % slots);
  const int64_t t = ts / slots;
  const bool interleaved = p.style == RopeStyle::kInterleaved;
  const int a = i < half ? (interleaved ? 2 * i : i) : 2 * i;
  const int b = i < half ? (interleaved ? 2 * i + 1 : i + half) : 2 * i + 1;
  float x0, x1;
  __nv_bfloat16* dst;
  bool rotate = i < half;
  if (slot < q_slots) {
    const __nv_bfloat16* src = p.q_src + t * p.src_stride + static_cast<int64_t>(slot) * p.head_dim;
    x0 = __bfloat162float(src[a]);
    x1 = __bfloat162float(src[b]);
    dst = p.q + (t * p.n_heads + slot) * p.head_dim;
  } else {
    const bool is_k = slot < q_slots + p.n_kv_heads;
    const int h = slot - q_slots - (is_k ? 0 : p.n_kv_heads);
    const int64_t kv_row = static_cast<int64_t>(p.n_kv_heads) * p.head_dim;
    const __nv_bfloat16* base = is_k ? p.k_src : p.v_src;
    const __nv_bfloat16* cur = base + t * p.src_stride + static_cast<int64_t>(h) * p.head_dim;
    const int32_t pi = p.prev_index[t];
    const __nv_bfloat16* prv = pi < 0 ? cur - p.src_stride
                                      : p.prev + static_cast<int64_t>(pi) * 2 * kv_row + (is_k ? 0 : kv_row) +
                                            static_cast<int64_t>(h) * p.head_dim;
    const float* w = (is_k ? p.k_shift : p.v_shift) + 2 * h;
    x0 = w[1] * __bfloat162float(cur[a]) + w[0] * __bfloat162float(prv[a]);
    x1 = w[1] * __bfloat162float(cur[b]) + w[0] * __bfloat162float(prv[b]);
    dst = (is_k ? p.k : p.v) + (t * p.n_kv_heads + h) * p.head_dim;
    rotate = rotate && is_k;
  }
  if (rotate) {
    float s, c;
    sincosf(static_cast<float>(p.positions[t]) * p.inv_freq[i], &s, &c);
    const float r0 = x0 * c - x1 * s, r1 = x0 * s + x1 * c;
    x0 = r0;
    x1 = r1;
  }
  dst[a] = __float2bfloat16(x0);
  dst[b] = __float2bfloat16(x1);
}

}  // namespace

cudaError_t launch_kv_shift_rope(const KvShiftParams& p, cudaStream_t stream) {
  if (p.rope_dim <= 0 || p.rope_dim % 2 != 0 || p.rope_dim > p.head_dim || p.head_dim % 2 != 0 ||
      p.n_kv_heads <= 0 || p.n_tokens < 0 || (p.q != nullptr && p.n_heads <= 0))
    return cudaErrorInvalidValue;
  const int q_slots = p.q != nullptr ? p.n_heads : 0;
  const int64_t total = p.n_tokens * (q_slots + 2 * p.n_kv_heads) * (p.head_dim / 2);
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  kv_shift_rope_kernel<<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p, total,
                                                                                                        q_slots);
  return cudaGetLastError();
}

}  // namespace starserve
