// Dequantization of ggml tensor data to fp32 on the host, bit-identical to ggml's reference
// (dequantize_row_* in ggml-quants.c) and to gguf-py's gguf.quants.dequantize.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/status.h"
#include "model/gguf.h"

namespace starserve::gguf {

// True for the types dequantize() handles: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
// Q5_K, Q6_K.
bool can_dequantize(GgmlType type);

// Writes n_elements floats to dst from ggml-encoded `src` (src_bytes long, any alignment).
// n_elements must be a multiple of the type's block size and src_bytes must hold all its blocks
// (kInvalidArgument otherwise); other types give kUnimplemented naming the type.
Status dequantize(GgmlType type, const uint8_t* src, size_t src_bytes, float* dst, int64_t n_elements);

// IEEE binary16 / bfloat16 bit patterns to fp32, exact for every input (subnormals, +-inf, NaN
// payloads are kept).
float fp16_to_fp32(uint16_t h);
float bf16_to_fp32(uint16_t h);

}  // namespace starserve::gguf
