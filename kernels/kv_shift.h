// KV-shifting attention's mix on the GPU (arXiv 2411.19574; reference kv_shift_ref and
// split_qkv_shift_rope_ref in kernels/ref/ops_ref.h): bf16 in and out, the mix and the rotation in
// fp32 with one rounding to bf16 at the end.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/ref/rope_style.h"

namespace starserve {

struct KvShiftParams {
  // Outputs. q: (n_tokens, n_heads, head_dim), null on the unfused path (q is rotated by rope);
  // k, v: (n_tokens, n_kv_heads, head_dim), not aliasing the sources.
  __nv_bfloat16* q = nullptr;
  __nv_bfloat16* k = nullptr;
  __nv_bfloat16* v = nullptr;
  // Sources: token t's q / raw k / raw v heads begin at q_src / k_src / v_src + t * src_stride
  // (the fused q|k|v rows: src_stride = (n_heads + 2 n_kv_heads) * head_dim).
  const __nv_bfloat16* q_src = nullptr;
  const __nv_bfloat16* k_src = nullptr;
  const __nv_bfloat16* v_src = nullptr;
  int64_t src_stride = 0;
  // (n_prev, 2, n_kv_heads, head_dim): rows [k, v] of the token before each sequence's first one.
  const __nv_bfloat16* prev = nullptr;
  const int32_t* prev_index = nullptr;  // (n_tokens): -1 = token t - 1, else the prev row
  const float* k_shift = nullptr;       // (n_kv_heads, 2): column 0 previous, column 1 current
  const float* v_shift = nullptr;
  const int32_t* positions = nullptr;  // (n_tokens)
  const float* inv_freq = nullptr;     // (rope_dim / 2)
  int64_t n_tokens = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0, rope_dim = 0;
  RopeStyle style = RopeStyle::kHalf;
};

// split_qkv_rope with the mix (p.q set), or the unfused mix + RoPE of k (p.q null).
cudaError_t launch_kv_shift_rope(const KvShiftParams& p, cudaStream_t stream);

}  // namespace starserve
