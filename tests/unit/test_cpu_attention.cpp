// The CPU backend's tiled attention against the scalar reference, over shapes that cross the
// query (64) and key (256) tile edges, GQA ratios, masks and segmented keys.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "backend/cpu_attention.h"

namespace starserve {
namespace {

struct Shape {
  int64_t n_q, n_k;
  int nh, nkv, d;
  bool causal;
  int64_t offset;
  int64_t segment;  // keys per segment (pages)
  float sigma;
};

class CpuAttention : public ::testing::TestWithParam<Shape> {};

TEST_P(CpuAttention, MatchesReference) {
  const Shape c = GetParam();
  std::mt19937 rng(99);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto fill = [&](size_t n, float sg) {
    std::vector<float> x(n);
    for (float& f : x) f = sg * nd(rng);
    return x;
  };
  const auto q = fill(c.n_q * c.nh * c.d, c.sigma);
  const auto k = fill(c.n_k * c.nkv * c.d, 1.0f);
  const auto v = fill(c.n_k * c.nkv * c.d, 1.0f);
  std::vector<KvSegment> segs;
  for (int64_t b = 0; b < c.n_k; b += c.segment) {
    const int64_t n = std::min(c.segment, c.n_k - b);
    segs.push_back({k.data() + b * c.nkv * c.d, v.data() + b * c.nkv * c.d, n});
  }
  const int64_t rows = c.n_q * c.nh;
  std::vector<float> o1(rows * c.d), l1(rows), h1(rows), o2(rows * c.d), l2(rows), h2(rows);
  PartialAttentionParams p{o1.data(), l1.data(), h1.data(), q.data(), segs, c.n_q, c.nh, c.nkv, c.d,
                           1.0f / std::sqrt(float(c.d)), {c.causal, c.offset}};
  partial_attention_ref(p);
  p.out = o2.data();
  p.lse = l2.data();
  p.entropy = h2.data();
  partial_attention_cpu(p);
  // Same fp32 math in a different summation order (tiles, BLAS blocking): differences are a few
  // ulps of the running sums, ~1e-6 relative; 2e-5 absolute on O(1) values leaves a wide margin
  // while any masking or rescaling mistake shows up at 1e-2 or more.
  for (int64_t r = 0; r < rows; ++r) {
    if (std::isinf(l1[r])) {
      EXPECT_TRUE(std::isinf(l2[r])) << r;
      continue;
    }
    ASSERT_NEAR(l1[r], l2[r], 2e-5 * std::max(1.0f, std::abs(l1[r]))) << "lse row " << r;
    ASSERT_NEAR(h1[r], h2[r], 5e-5) << "entropy row " << r;
    for (int x = 0; x < c.d; ++x) ASSERT_NEAR(o1[r * c.d + x], o2[r * c.d + x], 2e-5) << "out row " << r;
  }
}

// Per-row key limits (AttentionMask::key_limit) across key tiles and query tiles: the tiled
// kernel against the scalar reference; limits that rise in steps, 0, and past the keys.
TEST(CpuAttentionKeyLimit, MatchesReference) {
  const int64_t n_q = 150, n_k = 700;
  const int nh = 4, nkv = 2, d = 32;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto fill = [&](size_t n) {
    std::vector<float> x(n);
    for (float& f : x) f = nd(rng);
    return x;
  };
  const auto q = fill(n_q * nh * d), k = fill(n_k * nkv * d), v = fill(n_k * nkv * d);
  std::vector<int32_t> limit(n_q);
  for (int64_t i = 0; i < n_q; ++i) limit[i] = static_cast<int32_t>(i < 3 ? 0 : i >= 140 ? 1000 : 5 * (i / 4));
  std::vector<KvSegment> segs = {{k.data(), v.data(), 300}, {k.data() + 300 * nkv * d, v.data() + 300 * nkv * d, 400}};
  const int64_t rows = n_q * nh;
  std::vector<float> o1(rows * d), l1(rows), h1(rows), o2(rows * d), l2(rows), h2(rows);
  AttentionMask mask{false, 0};
  mask.key_limit = limit.data();
  PartialAttentionParams p{o1.data(), l1.data(), h1.data(), q.data(), segs, n_q, nh, nkv, d,
                           1.0f / std::sqrt(float(d)), mask};
  partial_attention_ref(p);
  p.out = o2.data();
  p.lse = l2.data();
  p.entropy = h2.data();
  partial_attention_cpu(p);
  for (int64_t r = 0; r < rows; ++r) {
    if (std::isinf(l1[r])) {
      EXPECT_TRUE(std::isinf(l2[r])) << r;
      continue;
    }
    ASSERT_NEAR(l1[r], l2[r], 2e-5 * std::max(1.0f, std::abs(l1[r]))) << "lse row " << r;
    ASSERT_NEAR(h1[r], h2[r], 5e-5) << "entropy row " << r;
    for (int x = 0; x < d; ++x) ASSERT_NEAR(o1[r * d + x], o2[r * d + x], 2e-5) << "out row " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CpuAttention,
    ::testing::Values(Shape{1, 1, 1, 1, 64, true, 0, 256, 1.0f},          // one token
                      Shape{1, 1000, 9, 3, 64, true, 999, 256, 1.0f},      // decode, GQA 3, 4 pages
                      Shape{70, 70, 4, 2, 64, true, 0, 256, 1.0f},         // prefill crossing the query tile
                      Shape{130, 600, 8, 8, 128, false, 0, 300, 2.0f},     // non-causal, odd segments
                      Shape{65, 513, 6, 1, 32, true, 448, 100, 4.0f},      // offset causal, MQA, peaked
                      Shape{40, 300, 2, 2, 64, true, -10, 256, 1.0f},      // first rows see nothing
                      Shape{257, 257, 3, 3, 16, true, 0, 257, 1.0f}));     // tile edge +1

}  // namespace
}  // namespace starserve
