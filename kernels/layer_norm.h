// LayerNorm on the GPU (GPT-2): bf16 in/out, fp32 statistics. Same argument order as layer_norm_ref.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

// out, in: (n_tokens, hidden) bf16; weight, bias: (hidden) bf16.
// out = (in - mean) / sqrt(var + eps) * weight + bias per row (biased variance). In-place allowed;
// any hidden >= 1.
cudaError_t launch_layer_norm(__nv_bfloat16* out, const __nv_bfloat16* in, const __nv_bfloat16* weight,
                              const __nv_bfloat16* bias, int64_t n_tokens, int hidden, float eps,
                              cudaStream_t stream);

}  // namespace starserve
