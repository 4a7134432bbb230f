// Star Attention context partitioning (docs/specs/star-attention.md, phase 1 steps 1-3).
// Pure bookkeeping: which tokens form which block, which rank encodes it, what the anchor is.
#pragma once

#include <cstdint>
#include <vector>

#include "common/config.h"
#include "common/status.h"

namespace starserve {

struct StarBlock {
  int index = 0;       // 0-based block number c_{index+1}
  int64_t begin = 0;   // context token range [begin, end); positions are the original ones
  int64_t end = 0;
  int rank = 0;        // rank that encodes and keeps this block's KV
  int64_t size() const { return end - begin; }
};

// A run of consecutive context positions [begin, end).
struct TokenRun {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};

struct StarLayout {
  int64_t n_context = 0;
  int block_size = 0;
  int anchor_size = 0;   // first anchor_size tokens of block 0; 0 = no anchor
  int world_size = 1;
  int query_host = 0;    // rank that stores query/generated KV: the owner of the last block
  // Exact mode: kContiguous or kZigzag (never kAuto); other modes: kContiguous.
  ExactLayout exact_layout = ExactLayout::kContiguous;
  std::vector<StarBlock> blocks;

  // Blocks of one rank, in position order (star, contiguous exact: the group [r*B/N, (r+1)*B/N);
  // zigzag exact: chunks r and 2W-1-r).
  std::vector<StarBlock> blocks_of(int rank) const;
  int64_t tokens_of(int rank) const;
  // Position of the rank's first context token (0 when the rank holds none).
  int64_t first_position_of(int rank) const;
  // The rank's context as runs of consecutive positions, in position order: its KV rows hold them
  // one after the other. One run in every layout but zigzag exact, where a rank holds two (one when
  // its chunks touch, W = 1, or the context is too short to give it a second).
  std::vector<TokenRun> runs_of(int rank) const;
};

// block_size 0 = one block per rank (ceil(n_context / world_size)); anchor_size -1 = block_size.
// anchor_size is clamped to the first block's length. Errors name the bad value.
Result<StarLayout> partition_context(int64_t n_context, int block_size, int anchor_size, int world_size);

// Exact mode's balanced layout: the context cut into 2W chunks (sizes differing by at most one, the
// longer first; chunks past the context's end are empty and left out), chunk i on rank i for
// i < W and on rank 2W-1-i after. Rank r's queries then attend over about (r + 1/2) c^2 +
// (2W - r - 1/2) c^2 = 2W c^2 = n^2 / (2W) causal pairs, the same on every rank. No anchor. The
// query host is the owner of the last context token (rank 0 once n >= 2W).
Result<StarLayout> partition_zigzag(int64_t n_context, int world_size);

// How a request's context is to be encoded: its attention mode and block/anchor sizes.
struct ContextPlan {
  AttentionMode mode = AttentionMode::kStar;
  int block_size = 0;    // 0 = one block per rank
  int anchor_size = -1;  // -1 = block_size; 0 = no anchor
  int n_blocks = 0;      // > 0: block_size = ceil(n_context / n_blocks), for block = 1/4 of the context etc.
  // Exact mode's token assignment; kAuto here is kZigzag (ContextEncoder::layout_for first resolves
  // it by the model). Zigzag ignores block_size and n_blocks: a rank's chunks run in one forward.
  ExactLayout exact_layout = ExactLayout::kAuto;
};

// The layout every rank derives for a request: global puts the whole context in one block on rank
// 0 (no anchor); exact partitions without an anchor, contiguously (by block_size / n_blocks) or
// zigzag (plan.exact_layout); star partitions by the plan.
Result<StarLayout> plan_layout(int64_t n_context, const ContextPlan& plan, int world_size);

// How a plain prompt (no explicit context/query split) is split: the last `query_tail` tokens are
// the query (phase 2) and the rest is the context. query_tail 0 picks the default:
// min(32, max(1, n_prompt / 4)) — short enough that the context carries the bulk, long enough to
// hold a question's last sentence. Returns the number of context tokens.
int64_t split_plain_prompt(int64_t n_prompt, int query_tail);

}  // namespace starserve
