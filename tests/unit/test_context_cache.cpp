// Context reuse's pieces on their own: KvCache::fork (shared whole pages, a copied tail, reference counts), the
// pages a cached context holds and a request forked from it needs, the scheduler's one-at-a-time admission and
// held pages, and ContextCache's keys, pins and LRU order.
#include <gtest/gtest.h>

#include <vector>

#include "backend/backend.h"
#include "engine/context_cache.h"
#include "engine/scheduler.h"
#include "kv/kv_cache.h"

namespace starserve {
namespace {

StarLayout layout(int64_t n_context, AttentionMode mode, int block, int anchor, int world) {
  auto lay = plan_layout(n_context, {mode, block, anchor, 0}, world);
  EXPECT_TRUE(lay.ok()) << lay.status().to_string();
  return *lay;
}

// Row r of layer l, K: value 1000 l + r + 0.25; V: its negative.
void fill(Backend& be, KvCache& cache, SeqId seq, int64_t start, int64_t n, int n_layers, int width) {
  for (int l = 0; l < n_layers; ++l) {
    std::vector<float> k(static_cast<size_t>(n * width)), v(k.size());
    for (int64_t r = 0; r < n; ++r) {
      for (int j = 0; j < width; ++j) {
        k[r * width + j] = 1000.0f * l + static_cast<float>(start + r) + 0.25f;
        v[r * width + j] = -k[r * width + j];
      }
    }
    DeviceBuffer kb = be.alloc(k.size() * sizeof(float)), vb = be.alloc(v.size() * sizeof(float));
    Tensor kt = kb.view(DType::kF32, {n, 1, width}), vt = vb.view(DType::kF32, {n, 1, width});
    be.upload_f32(kt, k.data());
    be.upload_f32(vt, v.data());
    cache.write(l, seq, start, kt, vt);
  }
}

// Keys [0, n) of one layer as floats, row-major.
std::vector<float> keys(Backend& be, KvCache& cache, int layer, SeqId seq, int64_t n) {
  std::vector<float> out;
  for (const KvView& s : cache.segments(layer, seq, 0, n)) {
    std::vector<float> part(static_cast<size_t>(s.k.numel()));
    be.download_f32(part.data(), s.k);
    out.insert(out.end(), part.begin(), part.end());
  }
  return out;
}

TEST(KvCacheFork, SharesWholePagesCopiesTheTailAndCountsReferences) {
  auto be = make_cpu_backend(1);
  constexpr int kLayers = 2, kWidth = 4;
  KvCache cache(*be, {kLayers, 1, kWidth, 8, 10});
  ASSERT_TRUE(cache.reserve(1, 20).ok());  // 3 pages: two whole, one with 4 of 8 rows
  cache.set_length(1, 20);
  fill(*be, cache, 1, 0, 20, kLayers, kWidth);
  const std::vector<float> before = keys(*be, cache, 1, 1, 20);
  ASSERT_TRUE(cache.fork(1, 2).ok());
  EXPECT_EQ(cache.pages_free(), 10 - 3 - 1) << "only the tail page is new";
  EXPECT_EQ(cache.length(2), 20);
  EXPECT_EQ(cache.shared_pages(1), 2);
  EXPECT_EQ(cache.shared_pages(2), 2);
  EXPECT_EQ(keys(*be, cache, 1, 2, 20), before);
  // Both append after row 20, each into its own tail page: neither sees the other's rows.
  ASSERT_TRUE(cache.reserve(2, 24).ok());
  cache.set_length(2, 24);
  fill(*be, cache, 2, 20, 4, kLayers, kWidth);
  ASSERT_TRUE(cache.reserve(1, 22).ok());
  cache.set_length(1, 22);
  std::vector<float> k(2 * kWidth, 7.0f), v(k.size(), 7.0f);
  DeviceBuffer kb = be->alloc(k.size() * 4), vb = be->alloc(v.size() * 4);
  be->upload_f32(kb.view(DType::kF32, {2, 1, kWidth}), k.data());
  be->upload_f32(vb.view(DType::kF32, {2, 1, kWidth}), v.data());
  for (int l = 0; l < kLayers; ++l) {
    cache.write(l, 1, 20, kb.view(DType::kF32, {2, 1, kWidth}), vb.view(DType::kF32, {2, 1, kWidth}));
  }
  const std::vector<float> forked = keys(*be, cache, 1, 2, 24);
  EXPECT_EQ(std::vector<float>(forked.begin(), forked.begin() + 20 * kWidth), before);
  EXPECT_EQ(forked[20 * kWidth], 1000.0f + 20.25f);
  EXPECT_EQ(keys(*be, cache, 1, 1, 22)[20 * kWidth], 7.0f);
  // A shared page is freed with its last holder.
  cache.free_sequence(1);
  EXPECT_EQ(cache.pages_free(), 10 - 3) << "the two shared pages stay with the fork";
  EXPECT_EQ(cache.shared_pages(2), 0);
  EXPECT_EQ(keys(*be, cache, 1, 2, 20), before);
  cache.free_sequence(2);
  EXPECT_EQ(cache.pages_free(), 10);
}

TEST(KvCacheFork, WholePagesOnlyNeedNoNewPageAndAFullPoolRefusesATail) {
  auto be = make_cpu_backend(1);
  KvCache cache(*be, {1, 1, 2, 4, 3});
  ASSERT_TRUE(cache.reserve(1, 8).ok());
  cache.set_length(1, 8);
  ASSERT_TRUE(cache.fork(1, 2).ok());
  EXPECT_EQ(cache.pages_free(), 1);
  ASSERT_TRUE(cache.reserve(3, 2).ok());
  cache.set_length(3, 2);
  const Status st = cache.fork(3, 4);  // its tail needs a page; none is free
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.to_string();
  EXPECT_FALSE(cache.has(4));
  EXPECT_EQ(cache.fork(9, 5).code(), StatusCode::kNotFound);
}

// A decode step's batched write equals a write per sequence: rows across a page boundary, a source row no
// entry names (not stored), and a shared page refused as write() refuses it.
TEST(KvCacheWriteBatch, EqualsOneWritePerSequence) {
  auto be = make_cpu_backend(1);
  constexpr int kWidth = 3;
  KvCache batched(*be, {1, 1, kWidth, 4, 8}), single(*be, {1, 1, kWidth, 4, 8});
  for (KvCache* c : {&batched, &single}) {
    ASSERT_TRUE(c->reserve(1, 6).ok());
    ASSERT_TRUE(c->reserve(2, 3).ok());
  }
  // Source rows: 0-1 for sequence 1 (its rows 3, 4: across its first page), 2 unnamed, 3 for sequence 2's row 2.
  std::vector<float> k(4 * kWidth), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = 1.5f + static_cast<float>(i);
    v[i] = -k[i];
  }
  DeviceBuffer kb = be->alloc(k.size() * 4), vb = be->alloc(v.size() * 4);
  const Tensor kt = kb.view(DType::kF32, {4, 1, kWidth}), vt = vb.view(DType::kF32, {4, 1, kWidth});
  be->upload_f32(kt, k.data());
  be->upload_f32(vt, v.data());
  const std::vector<KvCache::RowsWrite> writes = {{1, 3, 2, 0}, {2, 2, 1, 3}};
  batched.write_batch(0, writes, kt, vt);
  single.write(0, 1, 3, kt.slice_rows(0, 2), vt.slice_rows(0, 2));
  single.write(0, 2, 2, kt.slice_rows(3, 1), vt.slice_rows(3, 1));
  for (SeqId seq : {1, 2}) {
    const int64_t n = seq == 1 ? 5 : 3;
    const std::vector<float> a = keys(*be, batched, 0, seq, n), b = keys(*be, single, 0, seq, n);
    EXPECT_EQ(std::vector<float>(a.begin() + (n - (seq == 1 ? 2 : 1)) * kWidth, a.end()),
              std::vector<float>(b.begin() + (n - (seq == 1 ? 2 : 1)) * kWidth, b.end()))
        << "sequence " << seq;
  }
  EXPECT_EQ(keys(*be, batched, 0, 2, 3)[2 * kWidth], k[3 * kWidth]);
  // Sequence 1's first page is shared once it is forked: writing into it is a bug, caught.
  batched.set_length(1, 5);
  ASSERT_TRUE(batched.fork(1, 3).ok());
  const std::vector<KvCache::RowsWrite> into_shared = {{1, 0, 1, 0}};
  EXPECT_DEATH(batched.write_batch(0, into_shared, kt, vt), "sequences share");
}

TEST(KvDemandCached, AForkOwnsOnlyItsTailAndItsQuery) {
  // Global, 1000 context tokens on rank 0 in pages of 256: the entry holds 4 pages (3 whole + 232 rows);
  // a fork with 100 query/generated tokens owns the copied tail page (232 + 100 rows fit in 2 pages).
  const StarLayout g = layout(1000, AttentionMode::kGlobal, 0, 0, 2);
  EXPECT_EQ(context_entry_pages(g, 256), 4);
  EXPECT_EQ(kv_demand_cached(g, 100, 256).pages, 2);
  EXPECT_EQ(kv_demand_cached(g, 10, 256).pages, 1);
  EXPECT_EQ(kv_demand_cached(g, 10, 256).encode_steps, 0);
  // Star, 4 blocks of 256 on 2 ranks: every share is whole pages; the query host (rank 1) owns the query's.
  const StarLayout s = layout(1024, AttentionMode::kStar, 256, 256, 2);
  EXPECT_EQ(context_entry_pages(s, 256), 2);
  EXPECT_EQ(kv_demand_cached(s, 300, 256).pages, 2);
  // Always at most the encoding request's demand.
  EXPECT_LE(kv_demand_cached(s, 300, 256).pages, kv_demand(s, AttentionMode::kStar, 300, 256).pages);
}

TEST(SchedulerFront, AdmitsOneAtATimeWithItsDemandAndHoldsPages) {
  SchedulerConfig cfg;
  cfg.max_running = 4;
  Scheduler s(cfg, 10);
  ASSERT_TRUE(s.enqueue(1, {8, 1, 0}).ok());
  ASSERT_TRUE(s.enqueue(2, {3, 1, 0}).ok());
  EXPECT_TRUE(s.hold_pages(4));
  EXPECT_FALSE(s.hold_pages(7));
  EXPECT_EQ(s.front(), std::optional<RequestId>(1));
  EXPECT_EQ(s.front_shortfall(), 2);
  EXPECT_FALSE(s.admit_front().has_value());
  s.set_front_demand({2, 0, 0});  // a cached context lowers it
  EXPECT_EQ(s.front_shortfall(), 0);
  EXPECT_EQ(s.admit_front(), std::optional<RequestId>(1));
  EXPECT_TRUE(s.phase1_done(1)) << "no phase-1 steps";
  EXPECT_EQ(s.front_shortfall(), 0);
  EXPECT_EQ(s.admit_front(), std::optional<RequestId>(2));
  EXPECT_EQ(s.pages_free(), 1);
  EXPECT_EQ(s.front_shortfall(), -1);
  s.return_pages(4);
  s.release(1);
  s.release(2);
  EXPECT_EQ(s.pages_free(), 10);
}

TEST(ContextCacheBook, KeysPinsAndLeastRecentlyUsedOrder) {
  ContextCache cache;
  const std::vector<int32_t> a{1, 2, 3}, b{1, 2, 4};
  const StarLayout g = layout(3, AttentionMode::kGlobal, 0, 0, 1);
  const StarLayout s = layout(3, AttentionMode::kStar, 0, -1, 2);
  EXPECT_EQ(ContextCache::id_of(a), ContextCache::id_of(std::vector<int32_t>{1, 2, 3}));
  EXPECT_NE(ContextCache::id_of(a), ContextCache::id_of(b));
  EXPECT_EQ(ContextCache::id_of(a).size(), 20u);
  const auto gk = ContextCache::layout_key(g, AttentionMode::kGlobal);
  const auto sk = ContextCache::layout_key(s, AttentionMode::kStar);
  EXPECT_NE(gk, sk);
  const SeqId ea = cache.insert(a, g, AttentionMode::kGlobal, 3);
  const SeqId eb = cache.insert(b, g, AttentionMode::kGlobal, 5);
  EXPECT_GE(ea, ContextCache::kSeqBase);
  EXPECT_EQ(cache.pages(), 8);
  EXPECT_EQ(cache.find(a, sk), nullptr) << "same tokens, other layout";
  ASSERT_NE(cache.find(a, gk), nullptr);
  EXPECT_EQ(cache.find(a, gk)->seq, ea);
  ASSERT_NE(cache.tokens_of(ContextCache::id_of(b)), nullptr);
  EXPECT_EQ(*cache.tokens_of(ContextCache::id_of(b)), b);
  EXPECT_EQ(cache.tokens_of("ctx-0000000000000000"), nullptr);
  // a was used last: b is the least recently used; pinned entries are never chosen.
  EXPECT_EQ(cache.lru_idle(), std::optional<SeqId>(eb));
  cache.pin(eb);
  EXPECT_EQ(cache.lru_idle(), std::optional<SeqId>(ea));
  EXPECT_EQ(cache.lru_idle(ea), std::nullopt);
  cache.unpin(eb);
  EXPECT_EQ(cache.erase(ea), 3);
  EXPECT_EQ(cache.pages(), 5);
  EXPECT_EQ(cache.size(), 1);
}

}  // namespace
}  // namespace starserve
