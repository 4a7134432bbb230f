// Token embedding lookup on the GPU: a row gather from the bf16 table. Same argument order as
// embedding_ref.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

// out: (n_tokens, hidden) bf16; table: (n_vocab, hidden) bf16; ids: (n_tokens) int32 on the device.
// out row t = table row ids[t], copied bit for bit. ids must be in [0, n_vocab): the launcher cannot
// read them (they are on the device), so the caller validates tokens before they get here.
cudaError_t launch_embedding_bf16(__nv_bfloat16* out, const __nv_bfloat16* table, const int32_t* ids,
                                  int64_t n_tokens, int hidden, cudaStream_t stream);

}  // namespace starserve
