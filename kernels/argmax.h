// Greedy token choice on the GPU: the argmax of each row of fp32 logits, with the CPU sampler's
// rules (Sampler::sample in src/engine/sampling.cpp): ties go to the smallest index, NaN never
// wins, and a row with no value above -inf gives 0.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace starserve {

// out: (rows) int32; logits: (rows, cols) fp32, row-major. cols in [1, 2^31 - 1].
cudaError_t launch_argmax_rows(int32_t* out, const float* logits, int64_t rows, int64_t cols, cudaStream_t stream);

}  // namespace starserve
