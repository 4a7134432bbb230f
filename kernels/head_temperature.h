// The LayerNorm-free GPT-2's learnable softmax temperature (docs/specs/lnfree-gpt2.md) on the GPU:
// x[i, h, :] /= temperature[h, positions[i]] in place, before the attention handler, so every
// attention kernel sees q / t and its logits, LSE and entropy are those of the scaled softmax.
// Same argument order as head_temperature_ref (kernels/ref/ops_ref.h).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

// x: (n_tokens, n_heads, head_dim) bf16 or fp32, in place; temperature: (n_heads, n_positions) fp32;
// positions: (n_tokens) int32 on the device, each in [0, n_positions) (checked by the caller: a
// position outside is not read, the row is left unchanged). The division is done in fp32 and
// rounded once, as the reference's `row[d] /= t` on a bf16 value widened to fp32.
cudaError_t launch_head_temperature(__nv_bfloat16* x, const float* temperature, const int32_t* positions,
                                    int64_t n_tokens, int n_heads, int head_dim, int64_t n_positions,
                                    cudaStream_t stream);
cudaError_t launch_head_temperature(float* x, const float* temperature, const int32_t* positions, int64_t n_tokens,
                                    int n_heads, int head_dim, int64_t n_positions, cudaStream_t stream);

}  // namespace starserve
