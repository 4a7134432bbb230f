// GeGLU on the GPU (Gemma's MLP): out = gelu_tanh(gate) * up on bf16, fp32 math, with GELU's tanh
// approximation 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) as gelu_tanh_mul_ref computes it;
// and the same GELU alone (GPT-2's MLP, gelu_tanh_ref).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

// out, gate, up: (n) bf16; out may alias gate.
cudaError_t launch_gelu_tanh_mul(__nv_bfloat16* out, const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n,
                                 cudaStream_t stream);

// out, in: (n) bf16; out = gelu_tanh(in); out may alias in.
cudaError_t launch_gelu_tanh(__nv_bfloat16* out, const __nv_bfloat16* in, int64_t n, cudaStream_t stream);

}  // namespace starserve
