#include <gtest/gtest.h>

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
