// SwiGLU on the GPU: out = silu(gate) * up on bf16, fp32 math. Same argument order as swiglu_ref.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

// out, gate, up: (n) bf16; out may alias gate.
cudaError_t launch_swiglu(__nv_bfloat16* out, const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n,
                          cudaStream_t stream);

}  // namespace starserve
