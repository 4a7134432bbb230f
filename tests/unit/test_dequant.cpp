// Dequantization against golden values from gguf-py's numpy implementation (an independent
// implementation; see tests/golden/dequant/README.md and scripts/make_dequant_golden.py).
//
// Exact equality is expected: gguf-py widens every fp16 field to float32 first and then does the
// same float32 multiplies and adds in the same order as ggml's C reference (e.g. Q4_K:
// (d * sc) * q - (dmin * m), each op rounded to float32; no float16 intermediate products), and
// dequant.cpp disables fused multiply-add contraction, so there is no rounding difference to allow.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "model/dequant.h"
#include "model/gguf.h"

#ifndef STARSERVE_GOLDEN_DIR
#error "STARSERVE_GOLDEN_DIR must name tests/golden (tests/CMakeLists.txt defines it)"
#endif

namespace starserve::gguf {
namespace {

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

class DequantGolden : public ::testing::TestWithParam<GgmlType> {};

TEST_P(DequantGolden, MatchesGgufPy) {
  const GgmlType type = GetParam();
  const std::string base = std::string(STARSERVE_GOLDEN_DIR) + "/dequant/" + ggml_type_name(type);
  const std::vector<uint8_t> raw = read_bytes(base + ".bin");
  const std::vector<uint8_t> expected_bytes = read_bytes(base + ".f32");
  ASSERT_FALSE(raw.empty()) << "missing " << base << ".bin (scripts/make_dequant_golden.py makes it)";
  ASSERT_FALSE(expected_bytes.empty()) << "missing " << base << ".f32";
  ASSERT_EQ(expected_bytes.size() % 4, 0u);
  const int64_t n = static_cast<int64_t>(expected_bytes.size() / 4);
  ASSERT_EQ(static_cast<int64_t>(raw.size()), n / ggml_block_size(type) * ggml_type_size(type));

  std::vector<float> expected(n);
  std::memcpy(expected.data(), expected_bytes.data(), expected_bytes.size());
  // One guard element past the end catches a write beyond n_elements.
  std::vector<float> got(n + 1, 12345.0f);
  Status st = dequantize(type, raw.data(), raw.size(), got.data(), n);
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(got[n], 12345.0f);

  int mismatches = 0;
  for (int64_t i = 0; i < n && mismatches < 10; ++i) {
    if (std::isnan(expected[i])) {
      if (!std::isnan(got[i])) {
        ++mismatches;
        ADD_FAILURE() << ggml_type_name(type) << " element " << i << ": expected NaN, got " << got[i];
      }
      continue;
    }
    // Bit comparison: tells -0 from +0 and has no tolerance.
    if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(expected[i])) {
      ++mismatches;
      ADD_FAILURE() << ggml_type_name(type) << " element " << i << " (block " << i / ggml_block_size(type)
                    << "): expected " << expected[i] << ", got " << got[i];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dequant, DequantGolden,
                         ::testing::Values(GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0,
                                           GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1,
                                           GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K),
                         [](const ::testing::TestParamInfo<GgmlType>& info) { return ggml_type_name(info.param); });

// Every fp16 bit pattern against the definition: (-1)^s * 2^(e-15) * (1 + m/1024) for normals,
// (-1)^s * 2^-14 * (m/1024) for subnormals, computed with ldexp in double.
TEST(Dequant, Fp16AllBitPatterns) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const int sign = (h >> 15) & 1;
    const int e = (h >> 10) & 0x1F;
    const int m = h & 0x3FF;
    const float got = fp16_to_fp32(static_cast<uint16_t>(h));
    if (e == 0x1F) {
      if (m == 0) {
        EXPECT_TRUE(std::isinf(got) && std::signbit(got) == (sign == 1)) << "h = " << h;
      } else {
        ASSERT_TRUE(std::isnan(got)) << "h = " << h;
        // The payload moves to the top of the fp32 mantissa.
        EXPECT_EQ(std::bit_cast<uint32_t>(got) & 0x7FFFFFu, static_cast<uint32_t>(m) << 13) << "h = " << h;
      }
      continue;
    }
    const double mag = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
    const double want = sign ? -mag : mag;
    ASSERT_EQ(static_cast<double>(got), want) << "h = " << h;
    ASSERT_EQ(std::signbit(got), sign == 1) << "h = " << h;  // -0
  }
}

TEST(Dequant, Bf16IsTheTopHalfOfFp32) {
  EXPECT_EQ(bf16_to_fp32(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_fp32(0xC000), -2.0f);
  EXPECT_TRUE(std::isinf(bf16_to_fp32(0x7F80)));
  EXPECT_TRUE(std::isnan(bf16_to_fp32(0x7FC1)));
  EXPECT_EQ(std::bit_cast<uint32_t>(bf16_to_fp32(0x0001)), 0x00010000u);  // subnormal kept
}

// Q4_0 by hand: one block with d = 0.5 and nibbles 0..15: element j < 16 is the low nibble of
// qs[j], element j + 16 the high nibble; value = d * (q - 8).
TEST(Dequant, Q4_0LayoutByHand) {
  uint8_t block[18];
  const uint16_t half = 0x3800;  // 0.5 in fp16
  std::memcpy(block, &half, 2);
  for (int j = 0; j < 16; ++j) block[2 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  float out[32];
  ASSERT_TRUE(dequantize(GgmlType::Q4_0, block, sizeof block, out, 32).ok());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], 0.5f * (j - 8)) << j;
    EXPECT_EQ(out[j + 16], 0.5f * (15 - j - 8)) << j;
  }
}

TEST(Dequant, ArgumentErrors) {
  std::vector<uint8_t> src(1024);
  std::vector<float> dst(1024);
  // Not a whole number of blocks.
  Status st = dequantize(GgmlType::Q4_0, src.data(), src.size(), dst.data(), 33);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("33"), std::string::npos) << st.message();
  // Source too short: 64 Q4_0 elements need 36 bytes.
  st = dequantize(GgmlType::Q4_0, src.data(), 35, dst.data(), 64);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("36"), std::string::npos) << st.message();
  st = dequantize(GgmlType::F32, src.data(), 8, dst.data(), -1);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  // Types without a dequantizer name themselves.
  st = dequantize(GgmlType::IQ2_XXS, src.data(), src.size(), dst.data(), 256);
  EXPECT_EQ(st.code(), StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("IQ2_XXS"), std::string::npos) << st.message();
  EXPECT_FALSE(can_dequantize(GgmlType::Q2_K));
  EXPECT_TRUE(can_dequantize(GgmlType::Q6_K));
  // Zero elements is fine and writes nothing.
  EXPECT_TRUE(dequantize(GgmlType::Q6_K, nullptr, 0, nullptr, 0).ok());
}

// Tensor data inside a file is only as aligned as the file's offsets; the decoder must not assume
// more than byte alignment.
TEST(Dequant, UnalignedSource) {
  const std::vector<uint8_t> raw = read_bytes(std::string(STARSERVE_GOLDEN_DIR) + "/dequant/Q6_K.bin");
  ASSERT_FALSE(raw.empty());
  std::vector<uint8_t> shifted(raw.size() + 1);
  std::memcpy(shifted.data() + 1, raw.data(), raw.size());
  const int64_t n = static_cast<int64_t>(raw.size() / 210 * 256);
  std::vector<float> a(n), b(n);
  ASSERT_TRUE(dequantize(GgmlType::Q6_K, raw.data(), raw.size(), a.data(), n).ok());
  ASSERT_TRUE(dequantize(GgmlType::Q6_K, shifted.data() + 1, raw.size(), b.data(), n).ok());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), n * sizeof(float)), 0);
}

}  // namespace
}  // namespace starserve::gguf
