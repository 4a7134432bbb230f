// Rotary position embedding on the GPU, in place on bf16, angles in fp32. Same argument order and
// pairing rules as rope_ref (RopeStyle: kInterleaved pairs (2i, 2i+1), kHalf pairs (i, i + rope_dim/2)).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/ref/rope_style.h"

namespace starserve {

// x: (n_tokens, n_heads, head_dim) bf16, rotated in place; positions: (n_tokens) int32;
// inv_freq: (rope_dim / 2) fp32, scaling already applied. Only the first rope_dim dims rotate.
cudaError_t launch_rope(__nv_bfloat16* x, const int32_t* positions, const float* inv_freq, int64_t n_tokens,
                        int n_heads, int head_dim, int rope_dim, RopeStyle style, cudaStream_t stream);

// One fused projection's rows [q heads | k heads | v heads] split into q, k, v, with q and k
// rotated exactly as launch_rope rotates them (same angles and rounding) and v copied.
// qkv: (n_tokens, (n_heads + 2 n_kv_heads) * head_dim) bf16; q: (n_tokens, n_heads, head_dim);
// k, v: (n_tokens, n_kv_heads, head_dim). head_dim and rope_dim even, rope_dim <= head_dim.
cudaError_t launch_split_qkv_rope(__nv_bfloat16* q, __nv_bfloat16* k, __nv_bfloat16* v, const __nv_bfloat16* qkv,
                                  const int32_t* positions, const float* inv_freq, int64_t n_tokens, int n_heads,
                                  int n_kv_heads, int head_dim, int rope_dim, RopeStyle style, cudaStream_t stream);

}  // namespace starserve
