// SwiGLU on the GPU: out = silu(gate) * up on bf16, fp32 math. Same argument order as swiglu_ref.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

// out, gate, up: (n) bf16; out may alias gate.
cudaError_t launch_swiglu(__nv_bfloat16* out, const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n,
                          cudaStream_t stream);

// Over one fused gate|up projection: out (n_tokens, ffn) = silu(gate_up[:, :ffn]) * gate_up[:, ffn:],
// gate_up: (n_tokens, 2 ffn) bf16; the same arithmetic as launch_swiglu. out must not alias gate_up.
cudaError_t launch_swiglu_fused(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int64_t n_tokens, int64_t ffn,
                                cudaStream_t stream);

}  // namespace starserve
