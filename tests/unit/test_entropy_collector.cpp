// EntropyCollector: per-layer entropy rows staged on the backend and added to EntropyStats once
// per forward. Checked against EntropyStats::add called directly with the same rows, in both
// modes, and through LocalAttention on a tiny random model: every layer gets every row, and a
// forward downloads entropy once instead of once per layer.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "star/entropy_collector.h"
#include "star/local_attention.h"
#include "model/random_source.h"
#include "tests/unit/forwarding_backend.h"

namespace starserve {
namespace {

// Counts raw downloads (what the collector and the handlers use to bring entropy home).
class CountingBackend final : public testing_backend::ForwardingBackend {
 public:
  CountingBackend() : ForwardingBackend(make_cpu_backend(1)) {}
  void download_bytes(void* dst, const void* src, size_t bytes) override {
    ++downloads;
    inner().download_bytes(dst, src, bytes);
  }
  int downloads = 0;
};

struct Rows {
  int layer;
  std::vector<float> entropy;  // (n, heads)
  std::vector<int64_t> visible;
};

std::vector<Rows> random_rows(int heads, std::mt19937& rng) {
  std::uniform_real_distribution<float> h(0.0f, 5.0f);
  std::vector<Rows> out;
  for (int layer : {0, 2, 1, 2}) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 5);
    Rows r{layer, std::vector<float>(n * heads), std::vector<int64_t>(n)};
    for (float& x : r.entropy) x = h(rng);
    for (int64_t i = 0; i < n; ++i) r.visible[i] = 10 + i + layer;
    out.push_back(std::move(r));
  }
  return out;
}

void expect_equal(const EntropyStats& a, const EntropyStats& b) {
  ASSERT_EQ(a.sum.size(), b.sum.size());
  for (size_t i = 0; i < a.sum.size(); ++i) {
    EXPECT_EQ(a.count[i], b.count[i]) << i;
    EXPECT_DOUBLE_EQ(a.sum[i], b.sum[i]) << i;
    EXPECT_DOUBLE_EQ(a.max_sum[i], b.max_sum[i]) << i;
  }
}

TEST(EntropyCollector, StagedAndDirectAddTheSame) {
  const int heads = 3;
  std::mt19937 rng(11);
  CountingBackend be;
  for (bool staged : {true, false}) {
    const auto rows = random_rows(heads, rng);
    EntropyStats want, got;
    want.reset(3, heads);
    got.reset(3, heads);
    int64_t total = 0;
    for (const Rows& r : rows) total += static_cast<int64_t>(r.visible.size());
    EntropyCollector c(be);
    // Over the staging limit the collector downloads each call at once.
    c.begin(staged ? total : EntropyCollector::kMaxStagedBytes, heads);
    be.downloads = 0;
    for (const Rows& r : rows) {
      want.add(r.layer, r.entropy.data(), static_cast<int64_t>(r.visible.size()), r.visible.data());
      c.add(&got, r.layer, r.entropy.data(), static_cast<int64_t>(r.visible.size()), r.visible);
    }
    if (staged) {
      EXPECT_EQ(c.staged_rows(), total);
      EXPECT_EQ(be.downloads, 0);
      EXPECT_EQ(std::accumulate(got.count.begin(), got.count.end(), int64_t{0}), 0) << "added before the flush";
    } else {
      EXPECT_EQ(c.staged_rows(), 0);
      EXPECT_EQ(be.downloads, static_cast<int>(rows.size()));
    }
    c.flush();
    EXPECT_EQ(be.downloads, staged ? 1 : static_cast<int>(rows.size()));
    expect_equal(want, got);
    c.flush();  // nothing left: no second download, no double count
    EXPECT_EQ(be.downloads, staged ? 1 : static_cast<int>(rows.size()));
    expect_equal(want, got);
  }
}

TEST(EntropyCollector, LocalAttentionDownloadsOncePerForward) {
  CountingBackend be;
  const ModelHParams hp = tiny_llama_hparams();
  RandomWeightSource src(hp, 3);
  auto model = create_model(src, be);
  ASSERT_TRUE(model.ok()) << model.status().to_string();
  KvCache cache(be, {hp.n_layers, hp.n_kv_heads, hp.head_dim, 16, 16});
  LocalAttention attn(be, cache, hp);
  EntropyStats stats;
  stats.reset(hp.n_layers, hp.n_heads);
  attn.track_entropy(1, &stats);
  std::vector<int32_t> tokens = {5, 9, 2, 7, 1};
  std::vector<int32_t> pos(tokens.size());
  std::iota(pos.begin(), pos.end(), 0);
  BatchSeq s{1, tokens, pos, false};
  be.downloads = 0;
  ASSERT_TRUE((*model)->forward({&s, 1}, attn, nullptr).ok());
  EXPECT_EQ(be.downloads, 1) << "one entropy download per forward, not one per layer";
  for (int l = 0; l < hp.n_layers; ++l) {
    for (int h = 0; h < hp.n_heads; ++h) {
      const size_t i = static_cast<size_t>(l) * hp.n_heads + h;
      EXPECT_EQ(stats.count[i], static_cast<int64_t>(tokens.size()));
      // Row r sees r + 1 keys: its entropy lies in [0, log(r + 1)].
      EXPECT_GE(stats.mean(l, h), 0.0);
      EXPECT_LE(stats.mean(l, h), stats.mean_max(l, h) + 1e-6);
      EXPECT_NEAR(stats.mean_max(l, h), (std::log(2.0) + std::log(3.0) + std::log(4.0) + std::log(5.0)) / 5, 1e-12);
    }
  }
}

}  // namespace
}  // namespace starserve
