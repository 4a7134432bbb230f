// Skinny GEMM for decode steps on the GPU: out (n_tokens, n) = in (n_tokens, k) . weight (n, k)^T
// for 1..kGemvMaxTokens tokens, bf16 inputs, fp32 accumulation, bf16 or fp32 output. Same argument
// order as matmul_ref. A decode step reads every weight once and does 2 FLOPs per weight per token,
// so it is bound by HBM bandwidth: the kernel streams each weight row once with 16-byte loads and
// several loads in flight per thread, which general GEMM tilings do not do at n_tokens = 1.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

inline constexpr int kGemvMaxTokens = 8;

// in: (n_tokens, k) bf16; weight: (n, k) bf16; out: (n_tokens, n), bf16 or (out_fp32) fp32.
// k must be a multiple of 8 and every row 16-byte aligned; 1 <= n_tokens <= kGemvMaxTokens.
// out must not alias in or weight.
cudaError_t launch_gemv(void* out, bool out_fp32, const __nv_bfloat16* in, const __nv_bfloat16* weight,
                        int64_t n_tokens, int64_t n, int64_t k, cudaStream_t stream);

}  // namespace starserve
