// Block layouts follow ggml-common.h (QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = 32, QK_K = 256).
// Every value is computed with the same fp32 operations in the same order as ggml's reference
// (e.g. Q4_K: (d * sc) * q - (dmin * m)), so results are bit-identical. That needs each product
// rounded before the add: a fused multiply-add rounds once and differs in the last bit, so
// contraction is switched off for this file whatever -march or -ffp-contract the build uses.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "model/dequant.h"

#include <bit>
#include <cstring>

namespace starserve::gguf {
namespace {

constexpr int64_t kQk = 32;    // elements per block of the legacy quants (Q4_0 .. Q8_0)

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);  // tensor data is not necessarily 2-byte aligned
  return v;
}

float load_f16(const uint8_t* p) { return fp16_to_fp32(load_u16(p)); }

// Q4_0, 18 bytes: fp16 d, qs[16]. Element j < 16 is the low nibble of qs[j], element j + 16 the
// high nibble; value = d * (q - 8).
void block_q4_0(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < kQk / 2; ++j) {
    y[j] = d * static_cast<float>((qs[j] & 0x0F) - 8);
    y[j + kQk / 2] = d * static_cast<float>((qs[j] >> 4) - 8);
  }
}

// Q4_1, 20 bytes: fp16 d, fp16 m, qs[16]; value = d * q + m.
void block_q4_1(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const float m = load_f16(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < kQk / 2; ++j) {
    y[j] = d * static_cast<float>(qs[j] & 0x0F) + m;
    y[j + kQk / 2] = d * static_cast<float>(qs[j] >> 4) + m;
  }
}

// Q5_0, 22 bytes: fp16 d, u32 qh (bit j is the 5th bit of element j), qs[16] nibbles as in Q4_0;
// value = d * (q - 16).
void block_q5_0(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, sizeof qh);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < kQk / 2; ++j) {
    const int lo = (qs[j] & 0x0F) | static_cast<int>(((qh >> j) & 1u) << 4);
    const int hi = (qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
    y[j] = d * static_cast<float>(lo - 16);
    y[j + kQk / 2] = d * static_cast<float>(hi - 16);
  }
}

// Q5_1, 24 bytes: fp16 d, fp16 m, u32 qh, qs[16]; value = d * q + m.
void block_q5_1(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const float m = load_f16(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, sizeof qh);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < kQk / 2; ++j) {
    const int lo = (qs[j] & 0x0F) | static_cast<int>(((qh >> j) & 1u) << 4);
    const int hi = (qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
    y[j] = d * static_cast<float>(lo) + m;
    y[j + kQk / 2] = d * static_cast<float>(hi) + m;
  }
}

// Q8_0, 34 bytes: fp16 d, int8 qs[32]; value = d * q.
void block_q8_0(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  for (int j = 0; j < kQk; ++j) y[j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
}

// The 12 scale bytes of Q4_K / Q5_K pack 8 six-bit scales and 8 six-bit mins, one pair per
// 32-element sub-block j:
//   j < 4:  scale = s[j] & 63,                            min = s[j + 4] & 63
//   j >= 4: scale = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4, min = (s[j + 4] >> 4) | (s[j] >> 6) << 4
void scale_min_k4(int j, const uint8_t* s, int* scale, int* min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K, 144 bytes: fp16 d, fp16 dmin, scales[12], qs[128]. Each 64 elements use 32 bytes of qs:
// the low nibbles are sub-block 2c, the high nibbles sub-block 2c + 1;
// value = (d * scale) * q - (dmin * min).
void block_q4_k(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const float dmin = load_f16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qs = b + 16;
  for (int c = 0; c < 4; ++c) {
    int sc0, m0, sc1, m1;
    scale_min_k4(2 * c, scales, &sc0, &m0);
    scale_min_k4(2 * c + 1, scales, &sc1, &m1);
    const float d0 = d * static_cast<float>(sc0), dm0 = dmin * static_cast<float>(m0);
    const float d1 = d * static_cast<float>(sc1), dm1 = dmin * static_cast<float>(m1);
    const uint8_t* q = qs + 32 * c;
    float* out = y + 64 * c;
    for (int l = 0; l < 32; ++l) {
      out[l] = d0 * static_cast<float>(q[l] & 0x0F) - dm0;
      out[l + 32] = d1 * static_cast<float>(q[l] >> 4) - dm1;
    }
  }
}

// Q5_K, 176 bytes: fp16 d, fp16 dmin, scales[12], qh[32], qs[128]. As Q4_K, plus a 5th bit per
// element: bit 2c of qh[l] for the low nibble of chunk c, bit 2c + 1 for the high nibble.
void block_q5_k(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const float dmin = load_f16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int c = 0; c < 4; ++c) {
    int sc0, m0, sc1, m1;
    scale_min_k4(2 * c, scales, &sc0, &m0);
    scale_min_k4(2 * c + 1, scales, &sc1, &m1);
    const float d0 = d * static_cast<float>(sc0), dm0 = dmin * static_cast<float>(m0);
    const float d1 = d * static_cast<float>(sc1), dm1 = dmin * static_cast<float>(m1);
    const uint8_t* q = qs + 32 * c;
    float* out = y + 64 * c;
    for (int l = 0; l < 32; ++l) {
      const int lo = (q[l] & 0x0F) | (((qh[l] >> (2 * c)) & 1) << 4);
      const int hi = (q[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
      out[l] = d0 * static_cast<float>(lo) - dm0;
      out[l + 32] = d1 * static_cast<float>(hi) - dm1;
    }
  }
}

// Q6_K, 210 bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], fp16 d.
// Each half of 128 elements uses 64 bytes of ql, 32 of qh and 8 scales; for l < 32 the four
// elements l, l+32, l+64, l+96 take ql[l] low, ql[l+32] low, ql[l] high, ql[l+32] high with the
// qh[l] bit pairs 0-1, 2-3, 4-5, 6-7; element e of the block uses scale e / 16;
// value = (d * scale) * (q - 32).
void block_q6_k(const uint8_t* b, float* y) {
  const float d = load_f16(b + 208);
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = b + 64 * half;
    const uint8_t* qh = b + 128 + 32 * half;
    const int8_t* sc = scales + 8 * half;
    float* out = y + 128 * half;
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q0 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q1 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      out[l] = (d * static_cast<float>(sc[is + 0])) * static_cast<float>(q0);
      out[l + 32] = (d * static_cast<float>(sc[is + 2])) * static_cast<float>(q1);
      out[l + 64] = (d * static_cast<float>(sc[is + 4])) * static_cast<float>(q2);
      out[l + 96] = (d * static_cast<float>(sc[is + 6])) * static_cast<float>(q3);
    }
  }
}

using BlockFn = void (*)(const uint8_t* block, float* out);

BlockFn block_fn(GgmlType type) {
  switch (type) {
    case GgmlType::Q4_0: return block_q4_0;
    case GgmlType::Q4_1: return block_q4_1;
    case GgmlType::Q5_0: return block_q5_0;
    case GgmlType::Q5_1: return block_q5_1;
    case GgmlType::Q8_0: return block_q8_0;
    case GgmlType::Q4_K: return block_q4_k;
    case GgmlType::Q5_K: return block_q5_k;
    case GgmlType::Q6_K: return block_q6_k;
    default: return nullptr;
  }
}

}  // namespace

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf, or NaN with its payload
  } else if (exp != 0) {
    bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);  // rebias the exponent
  } else if (mant == 0) {
    bits = sign;  // +-0
  } else {
    // Subnormal: value = mant * 2^-24. Shift until the implicit bit (bit 10) is set; after s
    // shifts the value is 1.f * 2^(-14 - s), a normal fp32 with biased exponent 113 - s.
    uint32_t e = 127 - 14;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3FFu) << 13);
  }
  return std::bit_cast<float>(bits);
}

// bfloat16 is the top half of an fp32.
float bf16_to_fp32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

bool can_dequantize(GgmlType type) {
  return type == GgmlType::F32 || type == GgmlType::F16 || type == GgmlType::BF16 || block_fn(type) != nullptr;
}

Status dequantize(GgmlType type, const uint8_t* src, size_t src_bytes, float* dst, int64_t n_elements) {
  if (!can_dequantize(type)) {
    return unimplemented("dequantize: ggml type {} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                         "Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)",
                         ggml_type_name(type));
  }
  const int64_t block = ggml_block_size(type);
  const int64_t type_size = ggml_type_size(type);
  if (n_elements < 0 || n_elements % block != 0) {
    return invalid_argument("dequantize {}: n_elements = {} is not a non-negative multiple of the block size {}",
                            ggml_type_name(type), n_elements, block);
  }
  const uint64_t n_blocks = static_cast<uint64_t>(n_elements / block);
  uint64_t need = 0;
  if (__builtin_mul_overflow(n_blocks, static_cast<uint64_t>(type_size), &need) || src_bytes < need) {
    return invalid_argument("dequantize {}: {} elements need {} bytes, got {}", ggml_type_name(type), n_elements,
                            need, src_bytes);
  }
  if (n_elements == 0) return Status();
  switch (type) {
    case GgmlType::F32: std::memcpy(dst, src, need); return Status();
    case GgmlType::F16:
      for (uint64_t i = 0; i < n_blocks; ++i) dst[i] = fp16_to_fp32(load_u16(src + 2 * i));
      return Status();
    case GgmlType::BF16:
      for (uint64_t i = 0; i < n_blocks; ++i) dst[i] = bf16_to_fp32(load_u16(src + 2 * i));
      return Status();
    default: break;
  }
  const BlockFn fn = block_fn(type);
  for (uint64_t i = 0; i < n_blocks; ++i) fn(src + i * type_size, dst + i * block);
  return Status();
}

}  // namespace starserve::gguf
