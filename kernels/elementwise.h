// Element-wise bf16 / fp32 ops on the GPU: residual add and dtype conversions. fp32 math, one
// rounding to bf16 on output (round to nearest even). Same argument order as add_ref.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

// out, a, b: (n) bf16. out = bf16(float(a) + float(b)). out may be a itself (no partial overlap).
cudaError_t launch_add_bf16(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b, int64_t n,
                            cudaStream_t stream);

// dst: (n) bf16, src: (n) fp32. Round to nearest even; inf stays inf, NaN stays NaN.
cudaError_t launch_f32_to_bf16(__nv_bfloat16* dst, const float* src, int64_t n, cudaStream_t stream);

// dst: (n) fp32, src: (n) bf16. Exact.
cudaError_t launch_bf16_to_f32(float* dst, const __nv_bfloat16* src, int64_t n, cudaStream_t stream);

// Rows of src to scattered places: row r (row_bytes bytes at src + r * row_bytes) is copied to
// dst_rows[r], a device array of n_rows device pointers; a null entry skips its row. The rows one
// decode step appends to many sequences' KV pages, in one launch instead of one copy per row.
// Destinations must not overlap src or each other. Reference: a memcpy per non-null row.
cudaError_t launch_scatter_rows(void* const* dst_rows, const void* src, int64_t n_rows, int64_t row_bytes,
                                cudaStream_t stream);

}  // namespace starserve
