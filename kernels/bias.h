// Bias add on the GPU (Qwen2's q/k/v projection biases): x (n_rows, n_cols) += bias (n_cols) row by
// row, bf16 storage, fp32 sum, one rounding. Same argument order as add_bias_ref.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

// x: (n_rows, n_cols) bf16, in place; bias: (n_cols) bf16.
cudaError_t launch_add_bias(__nv_bfloat16* x, const __nv_bfloat16* bias, int64_t n_rows, int64_t n_cols,
                            cudaStream_t stream);

}  // namespace starserve
