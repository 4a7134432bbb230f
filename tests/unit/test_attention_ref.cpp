// Partial attention + merge references against a dense two-pass computation in double precision.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/ref/attention_ref.h"

namespace starserve {
namespace {

struct Dense {
  std::vector<double> out, lse, ent;
};

// Two-pass softmax in double over the keys visible under `mask`: the independent check.
Dense dense_attention(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                      int64_t n_q, int64_t n_k, int nh, int nkv, int d, float scale, AttentionMask mask) {
  Dense r;
  r.out.assign(n_q * nh * d, 0.0);
  r.lse.assign(n_q * nh, -std::numeric_limits<double>::infinity());
  r.ent.assign(n_q * nh, 0.0);
  const int group = nh / nkv;
  for (int64_t i = 0; i < n_q; ++i) {
    for (int h = 0; h < nh; ++h) {
      std::vector<double> s;
      std::vector<int64_t> idx;
      for (int64_t j = 0; j < n_k; ++j) {
        if (!mask.visible(i, j)) continue;
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += double(q[(i * nh + h) * d + c]) * k[(j * nkv + h / group) * d + c];
        s.push_back(dot * scale);
        idx.push_back(j);
      }
      if (s.empty()) continue;
      double m = s[0];
      for (double x : s) m = std::max(m, x);
      double z = 0;
      for (double x : s) z += std::exp(x - m);
      const int64_t row = i * nh + h;
      r.lse[row] = m + std::log(z);
      double hsum = 0;
      for (size_t a = 0; a < s.size(); ++a) {
        const double p = std::exp(s[a] - m) / z;
        if (p > 0) hsum -= p * std::log(p);
        for (int c = 0; c < d; ++c) r.out[row * d + c] += p * v[(idx[a] * nkv + h / group) * d + c];
      }
      r.ent[row] = hsum;
    }
  }
  return r;
}

std::vector<float> randn(size_t n, std::mt19937& rng, float sigma) {
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> x(n);
  for (float& f : x) f = dist(rng);
  return x;
}

struct Case {
  int64_t n_q, n_k;
  int nh, nkv, d;
  bool causal;
  int64_t offset;
  float sigma;  // logit scale: large sigma -> peaked softmax, tests the rescaling path
};

class PartialAttentionRef : public ::testing::TestWithParam<Case> {};

TEST_P(PartialAttentionRef, MatchesDenseTwoPass) {
  const Case c = GetParam();
  std::mt19937 rng(1234);
  auto q = randn(c.n_q * c.nh * c.d, rng, c.sigma);
  auto k = randn(c.n_k * c.nkv * c.d, rng, 1.0f);
  auto v = randn(c.n_k * c.nkv * c.d, rng, 1.0f);
  const float scale = 1.0f / std::sqrt(float(c.d));
  // Split keys into uneven segments to exercise the segment walk.
  std::vector<KvSegment> segs;
  const int64_t row = int64_t(c.nkv) * c.d;
  for (int64_t b = 0; b < c.n_k;) {
    const int64_t n = std::min<int64_t>(c.n_k - b, 1 + (b * 7 + 3) % 13);
    segs.push_back({k.data() + b * row, v.data() + b * row, n});
    b += n;
  }
  std::vector<float> out(c.n_q * c.nh * c.d), lse(c.n_q * c.nh), ent(c.n_q * c.nh);
  PartialAttentionParams p{out.data(), lse.data(), ent.data(), q.data(), segs, c.n_q, c.nh, c.nkv, c.d, scale,
                           {c.causal, c.offset}};
  partial_attention_ref(p);
  const Dense ref = dense_attention(q, k, v, c.n_q, c.n_k, c.nh, c.nkv, c.d, scale, {c.causal, c.offset});
  // fp32 accumulation over n_k terms: relative error ~ n_k * 2^-24 in the worst case; values are O(1)
  // and logits up to ~sigma*sqrt(d)*scale, so 1e-4 absolute bounds it for n_k <= 300 with margin.
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], ref.out[i], 1e-4) << "out " << i;
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(ref.lse[i])) {
      EXPECT_TRUE(std::isinf(lse[i]) && lse[i] < 0) << i;
      EXPECT_EQ(ent[i], 0.0f);
    } else {
      EXPECT_NEAR(lse[i], ref.lse[i], 1e-4 * std::max(1.0, std::abs(ref.lse[i]))) << "lse " << i;
      EXPECT_NEAR(ent[i], ref.ent[i], 2e-4) << "entropy " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, PartialAttentionRef,
                         ::testing::Values(Case{1, 1, 1, 1, 8, true, 0, 1.0f},       // one token
                                           Case{5, 37, 4, 2, 16, false, 0, 1.0f},    // non-causal, GQA 2
                                           Case{7, 7, 6, 2, 8, true, 0, 1.0f},       // square causal, GQA 3
                                           Case{4, 50, 8, 1, 32, true, 46, 2.0f},    // causal with offset (decode-like), MQA
                                           Case{3, 20, 2, 2, 64, true, -5, 1.0f},    // early rows see no key at all
                                           Case{16, 300, 4, 4, 64, true, 284, 8.0f}  // peaked softmax, long keys
                                           ));

// The Star Attention pitfall: a multi-token query on a rank that holds only context keys must see
// every context key. A bottom-right causal alignment (offset = n_k - n_q) would hide the last
// n_q - 1 - i keys from row i; the non-causal mask must not.
TEST(PartialAttentionRefMask, QueryOnContextShardSeesAllKeys) {
  const int64_t n_q = 4, n_k = 10;
  const int d = 8;
  std::vector<float> q(n_q * d, 0.0f), k(n_k * d, 0.0f), v(n_k * d, 0.0f);
  for (int64_t j = 0; j < n_k; ++j) v[j * d] = float(j);  // value = key index in dim 0
  std::vector<float> out(n_q * d), lse(n_q), ent(n_q);
  KvSegment seg{k.data(), v.data(), n_k};
  PartialAttentionParams p{out.data(), lse.data(), ent.data(), q.data(), {&seg, 1}, n_q, 1, 1, d, 1.0f, {false, 0}};
  partial_attention_ref(p);
  // Zero logits: uniform over all 10 keys -> mean index 4.5, entropy ln 10, for every row.
  for (int64_t i = 0; i < n_q; ++i) {
    EXPECT_NEAR(out[i * d], 4.5f, 1e-5);
    EXPECT_NEAR(ent[i], std::log(10.0f), 1e-5);
    EXPECT_NEAR(lse[i], std::log(10.0f), 1e-5);
  }
  // And the wrong alignment really does differ (so this test can fail).
  p.mask = {true, n_k - n_q};
  partial_attention_ref(p);
  EXPECT_NEAR(out[0], 3.0f, 1e-5);  // row 0 sees keys 0..6 only
}

// Per-row key limits (AttentionMask::key_limit, Attamba's compressed keys): row i sees keys
// j < limit[i] only, with and without a causal bound; a limit of 0 leaves the row empty (O = 0,
// LSE = -inf, H = 0), a limit past the keys changes nothing.
TEST(PartialAttentionRefMask, PerRowKeyLimits) {
  const int64_t n_q = 9, n_k = 40;
  const int nh = 4, nkv = 2, d = 16;
  std::mt19937 rng(77);
  auto q = randn(n_q * nh * d, rng, 2.0f);
  auto k = randn(n_k * nkv * d, rng, 1.0f);
  auto v = randn(n_k * nkv * d, rng, 1.0f);
  const std::vector<int32_t> limit = {0, 1, 1, 5, 12, 12, 13, 39, 100};
  const float scale = 1.0f / std::sqrt(float(d));
  const int64_t row = int64_t(nkv) * d;
  std::vector<KvSegment> segs = {{k.data(), v.data(), 11}, {k.data() + 11 * row, v.data() + 11 * row, n_k - 11}};
  for (bool causal : {false, true}) {
    AttentionMask mask{causal, 20};
    mask.key_limit = limit.data();
    std::vector<float> out(n_q * nh * d), lse(n_q * nh), ent(n_q * nh);
    PartialAttentionParams p{out.data(), lse.data(), ent.data(), q.data(), segs, n_q, nh, nkv, d, scale, mask};
    partial_attention_ref(p);
    const Dense ref = dense_attention(q, k, v, n_q, n_k, nh, nkv, d, scale, mask);
    for (int64_t r = 0; r < n_q * nh; ++r) {
      if (limit[r / nh] == 0) {
        EXPECT_TRUE(std::isinf(lse[r]) && lse[r] < 0) << r;
        EXPECT_EQ(ent[r], 0.0f);
        for (int c = 0; c < d; ++c) EXPECT_EQ(out[r * d + c], 0.0f);
        continue;
      }
      EXPECT_NEAR(lse[r], ref.lse[r], 1e-4 * std::max(1.0, std::abs(ref.lse[r]))) << r;
      EXPECT_NEAR(ent[r], ref.ent[r], 2e-4) << r;
      for (int c = 0; c < d; ++c) EXPECT_NEAR(out[r * d + c], ref.out[r * d + c], 1e-4) << r;
    }
    // The limits matter: without them row 4 (limit 12) sees more keys.
    AttentionMask open{causal, 20};
    const Dense all = dense_attention(q, k, v, n_q, n_k, nh, nkv, d, scale, open);
    EXPECT_GT(std::abs(all.lse[4 * nh] - ref.lse[4 * nh]), 1e-3);
    // A limit at or past the last visible key is no limit: row 8 (100) equals the open mask.
    EXPECT_NEAR(ref.lse[8 * nh], all.lse[8 * nh], 1e-12);
  }
}

// Merging partial results over shards of the keys equals attention over the union, including
// shards that are empty for some or all rows.
TEST(MergePartialsRef, EqualsDenseOverUnionWithEmptyShards) {
  const int64_t n_q = 6;
  const int nh = 4, nkv = 2, d = 16;
  const std::vector<int64_t> shard_sizes = {13, 0, 1, 29, 0, 8};
  int64_t n_k = 0;
  for (int64_t s : shard_sizes) n_k += s;
  std::mt19937 rng(7);
  auto q = randn(n_q * nh * d, rng, 3.0f);
  auto k = randn(n_k * nkv * d, rng, 1.0f);
  auto v = randn(n_k * nkv * d, rng, 1.0f);
  const float scale = 1.0f / std::sqrt(float(d));
  // Queries are the last n_q tokens of the sequence: causal over the concatenation.
  const AttentionMask global_mask{true, n_k - n_q};
  const Dense ref = dense_attention(q, k, v, n_q, n_k, nh, nkv, d, scale, global_mask);

  const int64_t rows = n_q * nh;
  std::vector<std::vector<float>> outs, lses, ents;
  int64_t base = 0;
  for (int64_t sz : shard_sizes) {
    outs.emplace_back(rows * d);
    lses.emplace_back(rows);
    ents.emplace_back(rows);
    KvSegment seg{k.data() + base * nkv * d, v.data() + base * nkv * d, sz};
    // In shard-local key indices the global rule j_global <= i + n_k - n_q becomes j <= i + n_k - n_q - base.
    PartialAttentionParams p{outs.back().data(), lses.back().data(), ents.back().data(), q.data(), {&seg, 1},
                             n_q, nh, nkv, d, scale, {true, n_k - n_q - base}};
    partial_attention_ref(p);
    base += sz;
  }
  std::vector<AttentionPartial> parts;
  for (size_t s = 0; s < shard_sizes.size(); ++s) parts.push_back({outs[s].data(), lses[s].data(), ents[s].data()});
  std::vector<float> out(rows * d), lse(rows), ent(rows);
  auto expect_dense = [&](const char* form) {
    for (int64_t r = 0; r < rows; ++r) {
      EXPECT_NEAR(lse[r], ref.lse[r], 1e-4 * std::max(1.0, std::abs(ref.lse[r]))) << form;
      EXPECT_NEAR(ent[r], ref.ent[r], 2e-4) << form << " row " << r;
      for (int c = 0; c < d; ++c) EXPECT_NEAR(out[r * d + c], ref.out[r * d + c], 1e-4) << form;
    }
  };
  merge_partials_ref(out.data(), lse.data(), ent.data(), parts, rows, d);
  expect_dense("gather form");

  // The all-reduce form: max of LSE over shards, each shard's terms, their sum, the finish.
  std::vector<float> max_lse(rows, -std::numeric_limits<float>::infinity());
  for (const auto& l : lses)
    for (int64_t r = 0; r < rows; ++r) max_lse[r] = std::max(max_lse[r], l[r]);
  const int64_t width = merge_sum_width(d);
  std::vector<float> sum(rows * width, 0.0f), terms(rows * width);
  for (size_t s = 0; s < shard_sizes.size(); ++s) {
    merge_sum_terms_ref(terms.data(), outs[s].data(), lses[s].data(), ents[s].data(), max_lse.data(), rows, d);
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += terms[i];
  }
  std::fill(out.begin(), out.end(), 7.0f);
  merge_sum_finish_ref(out.data(), lse.data(), ent.data(), sum.data(), max_lse.data(), rows, d);
  expect_dense("sum form");
}

TEST(MergeSumRef, AllShardsEmptyGivesZeroNotNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  const int d = 4;
  std::vector<float> o(d, 0.0f), l = {-inf}, h = {0.0f}, m = {-inf};
  std::vector<float> terms(merge_sum_width(d), 5.0f);
  merge_sum_terms_ref(terms.data(), o.data(), l.data(), h.data(), m.data(), 1, d);
  for (float x : terms) EXPECT_EQ(x, 0.0f);
  std::vector<float> out(d, 1.0f), lse(1), ent(1, 3.0f);
  merge_sum_finish_ref(out.data(), lse.data(), ent.data(), terms.data(), m.data(), 1, d);
  for (float x : out) EXPECT_EQ(x, 0.0f);
  EXPECT_TRUE(std::isinf(lse[0]) && lse[0] < 0);
  EXPECT_EQ(ent[0], 0.0f);
}

TEST(MergePartialsRef, AllShardsEmptyGivesZeroNotNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> o1(4, 0.0f), o2(4, 0.0f);
  std::vector<float> l1 = {-inf}, l2 = {-inf}, h1 = {0.0f}, h2 = {0.0f};
  std::vector<AttentionPartial> parts = {{o1.data(), l1.data(), h1.data()}, {o2.data(), l2.data(), h2.data()}};
  std::vector<float> out(4, 1.0f), lse(1), ent(1);
  merge_partials_ref(out.data(), lse.data(), ent.data(), parts, 1, 4);
  for (float x : out) EXPECT_EQ(x, 0.0f);
  EXPECT_TRUE(std::isinf(lse[0]) && lse[0] < 0);
  EXPECT_EQ(ent[0], 0.0f);
}

// Large logits: the chain-rule form keeps its digits where "LSE - E[s]" would not.
TEST(MergePartialsRef, EntropyStableAtLargeLogits) {
  const int d = 4;
  // Two shards, each a uniform softmax over 2 keys, logits around 1e4, equal mass.
  std::vector<float> o(d, 0.0f), l1 = {1e4f + std::log(2.0f)}, l2 = {1e4f + std::log(2.0f)};
  std::vector<float> h1 = {std::log(2.0f)}, h2 = {std::log(2.0f)};
  std::vector<AttentionPartial> parts = {{o.data(), l1.data(), h1.data()}, {o.data(), l2.data(), h2.data()}};
  std::vector<float> out(d), lse(1), ent(1);
  merge_partials_ref(out.data(), lse.data(), ent.data(), parts, 1, d);
  EXPECT_NEAR(ent[0], std::log(4.0f), 1e-6);  // uniform over 4 keys
}

}  // namespace
}  // namespace starserve
