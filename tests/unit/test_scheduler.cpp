// The scheduler's bookkeeping on its own: KV demand per rank, admission against the page budget
// (FIFO, bounded queue, max_running), and which requests take part in a step.
#include <gtest/gtest.h>

#include "engine/scheduler.h"

namespace starserve {
namespace {

StarLayout layout(int64_t n_context, AttentionMode mode, int block, int anchor, int world) {
  auto lay = plan_layout(n_context, {mode, block, anchor, 0}, world);
  EXPECT_TRUE(lay.ok()) << lay.status().to_string();
  return *lay;
}

TEST(KvDemand, GlobalKeepsEverythingOnRankZero) {
  // 1000 context + 100 query/generated tokens on rank 0, pages of 256: 5 pages; one phase-1 step.
  const KvDemand d = kv_demand(layout(1000, AttentionMode::kGlobal, 0, 0, 2), AttentionMode::kGlobal, 100, 256);
  EXPECT_EQ(d.pages, 5);
  EXPECT_EQ(d.encode_steps, 1);
}

TEST(KvDemand, StarAddsTheAnchorScratchOnRanksWithoutTheFirstBlock) {
  // 4 blocks of 256 over 2 ranks: rank 0 holds c1, c2 (2 pages); rank 1 holds c3, c4 (2 pages),
  // the anchor's scratch (1 page) and the 64 query/generated tokens (1 page): 4 pages.
  const StarLayout lay = layout(1024, AttentionMode::kStar, 256, 256, 2);
  const KvDemand d = kv_demand(lay, AttentionMode::kStar, 64, 256);
  EXPECT_EQ(d.pages, 4);
  EXPECT_EQ(d.encode_steps, 2);
  // Without an anchor there is no scratch.
  EXPECT_EQ(kv_demand(layout(1024, AttentionMode::kStar, 256, 0, 2), AttentionMode::kStar, 64, 256).pages, 3);
}

TEST(KvDemand, ExactTakesOneCollectiveStep) {
  EXPECT_EQ(kv_demand(layout(1024, AttentionMode::kExact, 0, 0, 4), AttentionMode::kExact, 1, 256).encode_steps, 1);
  EXPECT_EQ(kv_demand(layout(0, AttentionMode::kExact, 0, 0, 4), AttentionMode::kExact, 1, 256).encode_steps, 0);
}

TEST(ChunkedPrefill, LayersPerChunkFollowTheLongestBlock) {
  // A block no longer than the chunk runs whole (0 = unchunked), as does everything with chunks off.
  EXPECT_EQ(prefill_layers_per_chunk(30, 512, 512), 0);
  EXPECT_EQ(prefill_layers_per_chunk(30, 0, 100000), 0);
  // 2048 tokens in 512-token chunks: 30 x 512 / 2048 = 7.5 -> 8 layers per step, 4 steps.
  EXPECT_EQ(prefill_layers_per_chunk(30, 512, 2048), 8);
  // Very long blocks: one layer per step at least.
  EXPECT_EQ(prefill_layers_per_chunk(30, 512, 1 << 20), 1);
  // Phase-1 steps: blocks x chunks per block.
  auto lay = plan_layout(1024, {AttentionMode::kStar, 256, 256, 0}, 2);
  ASSERT_TRUE(lay.ok());
  EXPECT_EQ(kv_demand(*lay, AttentionMode::kStar, 64, 256, 4).encode_steps, 8);
}

SchedulerConfig config(int max_running, int max_queue) {
  SchedulerConfig c;
  c.max_running = max_running;
  c.max_queue = max_queue;
  return c;
}

TEST(Scheduler, RefusesWhatCanNeverFitAndAFullQueue) {
  Scheduler s(config(4, 2), 10);
  const Status never = s.enqueue(1, {11, 1});
  EXPECT_EQ(never.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(never.message().find("needs 11 KV pages"), std::string::npos) << never.message();
  EXPECT_TRUE(s.enqueue(2, {1, 1}).ok());
  EXPECT_TRUE(s.enqueue(3, {1, 1}).ok());
  const Status full = s.enqueue(4, {1, 1});
  EXPECT_EQ(full.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("queue is full (2 waiting, limit 2)"), std::string::npos) << full.message();
}

TEST(Scheduler, AdmitsInOrderWhileThePagesLastWithoutOvertaking) {
  Scheduler s(config(16, 8), 10);
  ASSERT_TRUE(s.enqueue(1, {6, 1}).ok());
  ASSERT_TRUE(s.enqueue(2, {6, 1}).ok());
  ASSERT_TRUE(s.enqueue(3, {1, 1}).ok());  // would fit, but waits behind 2
  EXPECT_EQ(s.admit(), std::vector<RequestId>{1});
  EXPECT_EQ(s.pages_free(), 4);
  EXPECT_EQ(s.waiting_count(), 2);
  EXPECT_TRUE(s.admit().empty());
  s.finish(1);
  s.release(1);
  EXPECT_EQ(s.pages_free(), 10);
  EXPECT_EQ(s.admit(), (std::vector<RequestId>{2, 3}));
  EXPECT_EQ(s.pages_free(), 3);
  EXPECT_EQ(s.running_count(), 2);
}

TEST(Scheduler, MaxRunningBoundsTheRunningSet) {
  Scheduler s(config(2, 8), 100);
  for (RequestId id = 1; id <= 3; ++id) ASSERT_TRUE(s.enqueue(id, {1, 0}).ok());
  EXPECT_EQ(s.admit(), (std::vector<RequestId>{1, 2}));
  EXPECT_TRUE(s.admit().empty());
  s.release(2);
  EXPECT_EQ(s.admit(), std::vector<RequestId>{3});
}

TEST(Scheduler, DropsAWaitingRequest) {
  Scheduler s(config(1, 8), 100);
  ASSERT_TRUE(s.enqueue(1, {1, 0}).ok());
  ASSERT_TRUE(s.enqueue(2, {1, 0}).ok());
  EXPECT_TRUE(s.drop_waiting(2));
  EXPECT_FALSE(s.drop_waiting(2));
  EXPECT_FALSE(s.drop_waiting(7));
  EXPECT_EQ(s.waiting_count(), 1);
}

TEST(Scheduler, StepsEncodeThenDecodeWhatIsEncoded) {
  Scheduler s(config(8, 8), 100);
  ASSERT_TRUE(s.enqueue(5, {1, 2}).ok());  // two phase-1 steps
  ASSERT_TRUE(s.enqueue(3, {1, 0}).ok());  // no context
  ASSERT_TRUE(s.enqueue(9, {1, 1}).ok());
  ASSERT_EQ(s.admit().size(), 3u);
  using Steps = std::vector<std::pair<RequestId, int>>;
  EXPECT_EQ(s.encode_batch(), (Steps{{5, 0}, {9, 0}}));  // increasing id
  EXPECT_EQ(s.decode_batch(), std::vector<RequestId>{3});
  EXPECT_FALSE(s.encoded(5));
  EXPECT_TRUE(s.encoded(9));  // phase 1 complete: it decodes in this same step
  EXPECT_EQ(s.decode_batch(), (std::vector<RequestId>{3, 9}));
  EXPECT_EQ(s.encode_batch(), (Steps{{5, 1}}));
  EXPECT_TRUE(s.encoded(5));
  EXPECT_TRUE(s.phase1_done(5));
  s.finish(3);  // finished requests take no further steps but keep their pages
  EXPECT_EQ(s.decode_batch(), (std::vector<RequestId>{5, 9}));
  EXPECT_EQ(s.pages_free(), 97);
  s.release(3);
  EXPECT_EQ(s.pages_free(), 98);
}

}  // namespace
}  // namespace starserve
