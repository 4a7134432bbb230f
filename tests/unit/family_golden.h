// What the family-golden tests share (tests/unit/test_families.cpp, tests/mpi/family_mpi_test.cpp):
// the golden files of tests/golden/<family>/ (scripts/golden/make_family_goldens.py), token and
// position helpers, and the logits tolerance against transformers. Needs STARSERVE_GOLDEN_DIR.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace starserve::family_golden {

inline std::string family_dir(const std::string& family) {
  return std::string(STARSERVE_GOLDEN_DIR) + "/" + family;
}

inline nlohmann::json read_golden(const std::string& family) {
  std::ifstream in(family_dir(family) + "/golden.json");
  EXPECT_TRUE(in.good()) << family;
  return nlohmann::json::parse(in);
}

inline std::vector<int32_t> random_tokens(int64_t n, uint32_t seed, int n_vocab) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, n_vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = dist(rng);
  return t;
}

// Positions start, start + 1, ... (n of them).
inline std::vector<int32_t> iota_from(int64_t n, int64_t start) {
  std::vector<int32_t> p(n);
  std::iota(p.begin(), p.end(), static_cast<int32_t>(start));
  return p;
}

// Tolerance for our fp32 logits against transformers' fp32 logits from the same (float16-exact)
// weights, or for our attention modes against each other. Both compute in fp32 and differ only in
// summation order (tiling, the LSE merge of segments and ranks) and in the transcendental
// functions' last bits: a dot product of K <= 128 terms carries a relative error of about
// sqrt(K) * 2^-24 ~ 1e-6, and 2-6 layers (with soft-capping's tanh, which only shrinks
// differences) keep it at a few 1e-6 of the logit scale. 2e-5 of the largest |logit| (at least
// 1e-4 absolute) is ten times that and still far below any real error: a wrong RoPE pairing, a
// missing (1 + w), bias or a key wrongly inside or outside the window shifts logits by tenths to
// whole units.
inline float logit_tolerance(const std::vector<float>& ref) {
  float m = 0.0f;
  for (float v : ref) m = std::max(m, std::abs(v));
  return std::max(1e-4f, 2e-5f * m);
}

inline float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float m = 0.0f;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

}  // namespace starserve::family_golden
