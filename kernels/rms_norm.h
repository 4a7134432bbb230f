// RMS norm on the GPU: bf16 in/out, fp32 accumulation. Same argument order as rms_norm_ref.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

// out, in: (n_tokens, hidden) bf16; weight: (hidden) bf16. out = in / sqrt(mean(in^2) + eps) * weight.
// In-place allowed. hidden must be a multiple of 8 (16-byte vectors).
cudaError_t launch_rms_norm(__nv_bfloat16* out, const __nv_bfloat16* in, const __nv_bfloat16* weight, int64_t n_tokens,
                            int hidden, float eps, cudaStream_t stream);

// The residual add, then the next norm, in one pass: x = bf16(x + h), out = rms_norm(x) * weight
// with the statistics of the rounded x (so the result equals launch_add_bf16 then launch_rms_norm).
// x, h, out: (n_tokens, hidden) bf16; weight: (hidden). out must not alias x or h.
cudaError_t launch_add_rms_norm(__nv_bfloat16* out, __nv_bfloat16* x, const __nv_bfloat16* h,
                                const __nv_bfloat16* weight, int64_t n_tokens, int hidden, float eps,
                                cudaStream_t stream);

}  // namespace starserve
