// Scale and soft-cap on the GPU (Gemma's embedding scale sqrt(hidden) and final logit
// soft-capping): x = cap > 0 ? cap tanh(x scale / cap) : x scale, in place, fp32 math, one rounding
// for bf16. Same argument order as scale_softcap_ref.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

// x: (n) bf16 or fp32, in place.
cudaError_t launch_scale_softcap(__nv_bfloat16* x, float scale, float cap, int64_t n, cudaStream_t stream);
cudaError_t launch_scale_softcap(float* x, float scale, float cap, int64_t n, cudaStream_t stream);

}  // namespace starserve
