#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "star/partition.h"

namespace starserve {
namespace {

TEST(StarPartition, ContiguousGroupsCoverContextOnce) {
  for (int world : {1, 2, 3, 4, 8}) {
    for (int64_t n : {1, 7, 64, 100, 1000}) {
      for (int bs : {0, 1, 5, 16, 64}) {
        auto lay = partition_context(n, bs, -1, world);
        ASSERT_TRUE(lay.ok()) << lay.status().to_string();
        int64_t next = 0;
        int prev_rank = 0;
        const int64_t n_blocks = static_cast<int64_t>(lay->blocks.size());
        for (const StarBlock& b : lay->blocks) {
          EXPECT_EQ(b.begin, next);  // contiguous, in order
          EXPECT_GT(b.size(), 0);
          EXPECT_LE(b.size(), lay->block_size);
          EXPECT_GE(b.rank, prev_rank);  // ranks own contiguous groups
          // The assignment rule of the spec: rank r gets blocks [r*B/N, (r+1)*B/N).
          EXPECT_GE(b.index, static_cast<int64_t>(b.rank) * n_blocks / world);
          EXPECT_LT(b.index, static_cast<int64_t>(b.rank + 1) * n_blocks / world);
          prev_rank = b.rank;
          next = b.end;
        }
        EXPECT_EQ(next, n);
        int64_t total = 0;
        for (int r = 0; r < world; ++r) total += lay->tokens_of(r);
        EXPECT_EQ(total, n);
        EXPECT_EQ(lay->query_host, lay->blocks.back().rank);
      }
    }
  }
}

TEST(StarPartition, DefaultsOneBlockPerRankAndAnchorIsBlock) {
  auto lay = partition_context(1000, 0, -1, 4);
  ASSERT_TRUE(lay.ok());
  EXPECT_EQ(lay->block_size, 250);
  EXPECT_EQ(lay->anchor_size, 250);
  ASSERT_EQ(lay->blocks.size(), 4u);
  for (int r = 0; r < 4; ++r) EXPECT_EQ(lay->blocks[r].rank, r);
  EXPECT_EQ(lay->query_host, 3);
}

TEST(StarPartition, FewerBlocksThanRanksLeavesSomeRanksEmpty) {
  auto lay = partition_context(10, 8, 4, 4);
  ASSERT_TRUE(lay.ok());
  ASSERT_EQ(lay->blocks.size(), 2u);
  EXPECT_EQ(lay->anchor_size, 4);
  int64_t total = 0;
  for (int r = 0; r < 4; ++r) total += lay->tokens_of(r);
  EXPECT_EQ(total, 10);
}

// Causal (query, key) pairs rank r attends over in exact mode's phase 1: each of its tokens sees
// every key at or before its position.
int64_t exact_pairs(const StarLayout& lay, int r) {
  int64_t pairs = 0;
  for (const TokenRun& run : lay.runs_of(r)) {
    for (int64_t p = run.begin; p < run.end; ++p) pairs += p + 1;
  }
  return pairs;
}

TEST(ExactZigzagLayout, ChunksRAnd2WMinus1MinusR) {
  auto lay = partition_zigzag(100, 4);  // 8 chunks: 4 of 13 tokens, then 4 of 12
  ASSERT_TRUE(lay.ok());
  EXPECT_EQ(lay->exact_layout, ExactLayout::kZigzag);
  EXPECT_EQ(lay->anchor_size, 0);
  ASSERT_EQ(lay->blocks.size(), 8u);
  const int want_rank[8] = {0, 1, 2, 3, 3, 2, 1, 0};
  const int64_t want_begin[8] = {0, 13, 26, 39, 52, 64, 76, 88};
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(lay->blocks[i].rank, want_rank[i]) << i;
    EXPECT_EQ(lay->blocks[i].begin, want_begin[i]) << i;
    EXPECT_EQ(lay->blocks[i].index, i);
  }
  EXPECT_EQ(lay->blocks.back().end, 100);
  EXPECT_EQ(lay->query_host, 0);
  // Rank 3's chunks touch: one run. The others hold two.
  ASSERT_EQ(lay->runs_of(3).size(), 1u);
  EXPECT_EQ(lay->runs_of(3)[0].begin, 39);
  EXPECT_EQ(lay->runs_of(3)[0].end, 64);
  ASSERT_EQ(lay->runs_of(0).size(), 2u);
  EXPECT_EQ(lay->runs_of(0)[1].begin, 88);
  EXPECT_EQ(lay->first_position_of(1), 13);
  EXPECT_EQ(lay->tokens_of(0), 25);
}

TEST(ExactZigzagLayout, CoversTheContextOnceAndBalancesThePairs) {
  for (int world : {1, 2, 3, 4, 5, 8, 16}) {
    for (int64_t n : {1, 2, 3, 7, 15, 16, 17, 100, 1000, 4099}) {
      auto lay = partition_zigzag(n, world);
      ASSERT_TRUE(lay.ok());
      std::vector<int> owner(static_cast<size_t>(n), -1);
      for (int r = 0; r < world; ++r) {
        const auto runs = lay->runs_of(r);
        EXPECT_LE(runs.size(), 2u);
        for (size_t i = 0; i < runs.size(); ++i) {
          if (i > 0) EXPECT_GT(runs[i].begin, runs[i - 1].end) << "runs in position order, apart";
          for (int64_t p = runs[i].begin; p < runs[i].end; ++p) {
            EXPECT_EQ(owner[p], -1);
            owner[p] = r;
          }
        }
      }
      for (int64_t p = 0; p < n; ++p) EXPECT_GE(owner[p], 0) << p;
      EXPECT_EQ(lay->query_host, owner[n - 1]);
      // Balance: with 2W chunks of c tokens rank r attends over c (r c) + c (c + 1) / 2 +
      // c ((2W - 1 - r) c) + c (c + 1) / 2 = n^2 / (2W) + c pairs. Chunks one token shorter move each
      // of a rank's <= 2c positions by < 2W: within (4W + 1) c of n^2 / (2W), c = ceil(n / 2W).
      if (n < 2 * world) continue;
      const int64_t c = (n + 2 * world - 1) / (2 * world);
      const double even = static_cast<double>(n) * n / (2.0 * world);
      for (int r = 0; r < world; ++r) {
        EXPECT_NEAR(static_cast<double>(exact_pairs(*lay, r)), even, (4.0 * world + 1) * c)
            << "world " << world << " n " << n << " rank " << r;
      }
    }
  }
}

// What zigzag is for: at 8 ranks the contiguous layout's last rank attends over 15/64 of the pairs
// (about (2W - 1) / W^2), zigzag's busiest rank over 1/8 of them.
TEST(ExactZigzagLayout, BusiestRankAgainstContiguous) {
  const int64_t n = 1 << 14;
  const int world = 8;
  auto zig = plan_layout(n, {AttentionMode::kExact, 0, 0, 0, ExactLayout::kZigzag}, world);
  auto contiguous = plan_layout(n, {AttentionMode::kExact, 0, 0, 0, ExactLayout::kContiguous}, world);
  ASSERT_TRUE(zig.ok() && contiguous.ok());
  EXPECT_EQ(contiguous->exact_layout, ExactLayout::kContiguous);
  int64_t zmax = 0, cmax = 0, total = 0;
  for (int r = 0; r < world; ++r) {
    zmax = std::max(zmax, exact_pairs(*zig, r));
    cmax = std::max(cmax, exact_pairs(*contiguous, r));
    total += exact_pairs(*zig, r);
  }
  EXPECT_NEAR(static_cast<double>(cmax) / total, 15.0 / 64, 1e-3);
  EXPECT_NEAR(static_cast<double>(zmax) / total, 1.0 / 8, 1e-3);
  // The default (auto) is zigzag; star and global never are.
  auto automatic = plan_layout(n, {AttentionMode::kExact, 0, 0, 0}, world);
  ASSERT_TRUE(automatic.ok());
  EXPECT_EQ(automatic->exact_layout, ExactLayout::kZigzag);
  auto star = plan_layout(n, {AttentionMode::kStar, 0, -1, 0, ExactLayout::kZigzag}, world);
  ASSERT_TRUE(star.ok());
  EXPECT_EQ(star->exact_layout, ExactLayout::kContiguous);
  EXPECT_EQ(star->runs_of(world - 1).size(), 1u);
}

TEST(StarPartition, BadValuesNameTheField) {
  auto a = partition_context(100, 8, 16, 2);
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.status().message().find("anchor_size = 16"), std::string::npos);
  auto b = partition_context(100, -3, -1, 2);
  ASSERT_FALSE(b.ok());
  EXPECT_NE(b.status().message().find("block_size = -3"), std::string::npos);
  EXPECT_FALSE(partition_context(100, 8, -1, 0).ok());
}

TEST(StarPartition, PlainPromptSplit) {
  EXPECT_EQ(split_plain_prompt(1000, 0), 1000 - 32);
  EXPECT_EQ(split_plain_prompt(8, 0), 6);
  EXPECT_EQ(split_plain_prompt(1, 0), 0);
  EXPECT_EQ(split_plain_prompt(100, 10), 90);
  EXPECT_EQ(split_plain_prompt(5, 10), 0);
}

}  // namespace
}  // namespace starserve
