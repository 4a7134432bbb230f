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

TEST(KvDemand, StarCountsTheAnchorScratchInPhaseOneOnly) {
  // 4 blocks of 256 over 2 ranks: rank 0 holds c1, c2 (2 pages); rank 1 holds c3, c4 (2 pages) and,
  // in phase 1, the anchor's scratch (1 page): 3 pages; in phase 2 the scratch is gone and the 64
  // query/generated tokens take 1 page: 3 pages. The peak is 3, not 4.
  const StarLayout lay = layout(1024, AttentionMode::kStar, 256, 256, 2);
  const KvDemand d = kv_demand(lay, AttentionMode::kStar, 64, 256);
  EXPECT_EQ(d.pages, 3);
  EXPECT_EQ(d.encode_steps, 2);
  // A long generation outgrows the scratch: 2 + 2 pages of query/generated tokens in phase 2.
  EXPECT_EQ(kv_demand(lay, AttentionMode::kStar, 512, 256).pages, 4);
  // A larger anchor than the generation: phase 1 decides (2 + 1 pages; 300 scratch tokens = 2 pages).
  EXPECT_EQ(kv_demand(layout(1024, AttentionMode::kStar, 512, 300, 2), AttentionMode::kStar, 10, 256).pages, 4);
  // Without an anchor there is no scratch.
  EXPECT_EQ(kv_demand(layout(1024, AttentionMode::kStar, 256, 0, 2), AttentionMode::kStar, 64, 256).pages, 3);
}

TEST(KvDemand, StarOnTwoRanksAdmitsWhatOneRankAdmits) {
  // 1900 context + 100 query/generated tokens in pages of 256: one rank needs 8 pages. Two ranks with
  // the default layout (one block of 950 each, anchor = block): rank 1 holds 950 + the 950-token
  // scratch (4 + 4 pages) in phase 1, 950 + 100 tokens (5 pages) in phase 2: 8 pages, not 9.
  const int64_t one = kv_demand(layout(1900, AttentionMode::kStar, 0, -1, 1), AttentionMode::kStar, 100, 256).pages;
  const int64_t two = kv_demand(layout(1900, AttentionMode::kStar, 0, -1, 2), AttentionMode::kStar, 100, 256).pages;
  EXPECT_EQ(one, 8);
  EXPECT_EQ(two, 8);
}

// What one rank admits (its pool holds context + query + generated), N ranks admit too, for every
// mode and for page-aligned blocks; with blocks ending inside a page at most one page more.
TEST(KvDemand, SeveralRanksAdmitWhatOneRankAdmits) {
  const int64_t page = 64;
  int checked = 0;
  for (AttentionMode mode : {AttentionMode::kGlobal, AttentionMode::kExact, AttentionMode::kStar}) {
    for (int world : {2, 3, 4, 8}) {
      for (int64_t n_ctx : {int64_t{1}, int64_t{63}, int64_t{64}, int64_t{500}, int64_t{1024}, int64_t{4096},
                            int64_t{5000}}) {
        for (int64_t tail : {int64_t{1}, int64_t{40}, int64_t{64}, int64_t{700}}) {
          for (int block : {0, 64, 256, 1024}) {
            for (int anchor : {-1, 0, 32}) {
              auto one = plan_layout(n_ctx, {mode, block, anchor, 0}, 1);
              auto many = plan_layout(n_ctx, {mode, block, anchor, 0}, world);
              if (!one.ok() || !many.ok()) continue;  // anchor > block: refused alike
              const int64_t p1 = kv_demand(*one, mode, tail, page).pages;
              const int64_t pn = kv_demand(*many, mode, tail, page).pages;
              bool aligned = many->block_size % page == 0 && many->anchor_size % page == 0;
              SCOPED_TRACE(testing::Message() << "mode " << static_cast<int>(mode) << " world " << world << " ctx "
                                              << n_ctx << " tail " << tail << " block " << block << " anchor "
                                              << anchor);
              if (aligned || mode != AttentionMode::kStar) {
                EXPECT_LE(pn, p1);
              } else {
                EXPECT_LE(pn, p1 + 1);
              }
              ++checked;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 500);
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

TEST(ChunkedPrefill, StepTokensAreTheChunksShareOfTheBlock) {
  EXPECT_EQ(prefill_step_tokens(30, 0, 48), 48);      // unchunked: the whole block
  EXPECT_EQ(prefill_step_tokens(30, 8, 2048), 547);   // 2048 x 8 / 30, rounded up: about a 512-token chunk
  EXPECT_EQ(prefill_step_tokens(30, 30, 2048), 2048);
}

SchedulerConfig budget_config(int max_batch_tokens) {
  SchedulerConfig c = config(64, 64);
  c.max_batch_tokens = max_batch_tokens;
  return c;
}

// Runs phase-1 steps until every request's phase 1 is complete, each step with `decode_tokens` decoding;
// returns the steps, each the requests that took part.
std::vector<std::vector<RequestId>> encode_all(Scheduler& s, int64_t decode_tokens = 0) {
  std::vector<std::vector<RequestId>> steps;
  for (auto batch = s.encode_batch(decode_tokens); !batch.empty(); batch = s.encode_batch(decode_tokens)) {
    steps.emplace_back();
    for (const auto& [id, k] : batch) {
      steps.back().push_back(id);
      s.encoded(id);
    }
  }
  return steps;
}

// Short prompts that arrive together share steps: ceil(total tokens / budget) of them, not one each.
TEST(Scheduler, PromptsArrivingTogetherShareTheStepBudget) {
  for (const int n : {1, 4, 10, 64}) {
    Scheduler s(budget_config(256), 1000);
    for (RequestId id = 1; id <= static_cast<RequestId>(n); ++id) ASSERT_TRUE(s.enqueue(id, {1, 1, 64}).ok());
    ASSERT_EQ(s.admit().size(), static_cast<size_t>(n));
    const auto steps = encode_all(s);
    EXPECT_EQ(steps.size(), static_cast<size_t>((n * 64 + 255) / 256)) << n << " prompts";
    EXPECT_EQ(steps.front().front(), 1u);  // admission order
    for (const auto& step : steps) EXPECT_LE(step.size(), 4u);
    EXPECT_TRUE(s.encode_batch().empty());
    EXPECT_EQ(s.decode_batch().size(), static_cast<size_t>(n));
  }
}

// The running decodes take their tokens of the budget first; the oldest prompt still progresses when they
// take it all.
TEST(Scheduler, DecodesTakeTheBudgetFirst) {
  Scheduler s(budget_config(256), 1000);
  for (RequestId id = 1; id <= 4; ++id) ASSERT_TRUE(s.enqueue(id, {1, 1, 64}).ok());
  ASSERT_EQ(s.admit().size(), 4u);
  EXPECT_EQ(encode_all(s, 128).size(), 2u);  // 128 left per step: two prompts each
  Scheduler busy(budget_config(256), 1000);
  for (RequestId id = 1; id <= 3; ++id) ASSERT_TRUE(busy.enqueue(id, {1, 1, 64}).ok());
  ASSERT_EQ(busy.admit().size(), 3u);
  const auto steps = encode_all(busy, 300);  // more decode tokens than the budget
  ASSERT_EQ(steps.size(), 3u);
  EXPECT_EQ(steps[0], std::vector<RequestId>{1});
  EXPECT_EQ(steps[2], std::vector<RequestId>{3});
}

// A long prompt is still cut: one chunk per step, however large the budget; two long prompts with a budget of one
// chunk alternate, so each step does one chunk's work; a short one fills what a chunk leaves.
TEST(Scheduler, LongPromptsStayChunkedUnderTheBudget) {
  Scheduler s(budget_config(2048), 1000);
  ASSERT_TRUE(s.enqueue(1, {1, 8, 512}).ok());  // 8 chunks of ~512 tokens' work
  ASSERT_EQ(s.admit().size(), 1u);
  EXPECT_EQ(encode_all(s).size(), 8u);

  Scheduler tight(budget_config(512), 1000);
  ASSERT_TRUE(tight.enqueue(1, {1, 3, 512}).ok());
  ASSERT_TRUE(tight.enqueue(2, {1, 3, 512}).ok());
  ASSERT_EQ(tight.admit().size(), 2u);
  const auto steps = encode_all(tight);
  ASSERT_EQ(steps.size(), 6u);
  for (const auto& step : steps) EXPECT_EQ(step.size(), 1u);
  EXPECT_EQ(steps[0], std::vector<RequestId>{1});

  Scheduler mixed(budget_config(600), 1000);
  ASSERT_TRUE(mixed.enqueue(1, {1, 2, 512}).ok());
  ASSERT_TRUE(mixed.enqueue(2, {1, 2, 512}).ok());  // does not fit beside 1: waits
  ASSERT_TRUE(mixed.enqueue(3, {1, 1, 64}).ok());   // fits beside 1
  ASSERT_EQ(mixed.admit().size(), 3u);
  using Steps = std::vector<std::pair<RequestId, int>>;
  EXPECT_EQ(mixed.encode_batch(), (Steps{{1, 0}, {3, 0}}));
}

// No budget (0): every request still encoding takes its step, as without the budget.
TEST(Scheduler, NoBudgetEncodesEveryPromptInOneStep) {
  Scheduler s(budget_config(0), 1000);
  for (RequestId id = 1; id <= 10; ++id) ASSERT_TRUE(s.enqueue(id, {1, 1, 4096}).ok());
  ASSERT_EQ(s.admit().size(), 10u);
  EXPECT_EQ(encode_all(s).size(), 1u);
}

}  // namespace
}  // namespace starserve
