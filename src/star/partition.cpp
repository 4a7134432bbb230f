#include "star/partition.h"

#include <algorithm>

namespace starserve {

std::vector<StarBlock> StarLayout::blocks_of(int rank) const {
  std::vector<StarBlock> out;
  for (const StarBlock& b : blocks) {
    if (b.rank == rank) out.push_back(b);
  }
  return out;
}

int64_t StarLayout::tokens_of(int rank) const {
  int64_t n = 0;
  for (const StarBlock& b : blocks) {
    if (b.rank == rank) n += b.size();
  }
  return n;
}

int64_t StarLayout::first_position_of(int rank) const {
  for (const StarBlock& b : blocks) {
    if (b.rank == rank) return b.begin;
  }
  return 0;
}

std::vector<TokenRun> StarLayout::runs_of(int rank) const {
  std::vector<TokenRun> runs;
  for (const StarBlock& b : blocks) {
    if (b.rank != rank || b.size() == 0) continue;
    if (!runs.empty() && runs.back().end == b.begin) {
      runs.back().end = b.end;
    } else {
      runs.push_back({b.begin, b.end});
    }
  }
  return runs;
}

Result<StarLayout> partition_zigzag(int64_t n_context, int world_size) {
  if (world_size < 1) return invalid_argument("world_size = {} must be >= 1", world_size);
  if (n_context < 0) return invalid_argument("context length = {} must be >= 0", n_context);
  StarLayout lay;
  lay.n_context = n_context;
  lay.world_size = world_size;
  lay.anchor_size = 0;
  lay.exact_layout = ExactLayout::kZigzag;
  const int64_t chunks = 2 * static_cast<int64_t>(world_size);
  const int64_t base = n_context / chunks, longer = n_context % chunks;
  lay.block_size = static_cast<int>(std::max<int64_t>(1, base + (longer > 0 ? 1 : 0)));
  int64_t at = 0;
  for (int64_t i = 0; i < chunks; ++i) {
    const int64_t size = base + (i < longer ? 1 : 0);
    if (size == 0) break;  // every later chunk is empty too
    StarBlock blk;
    blk.index = static_cast<int>(lay.blocks.size());
    blk.begin = at;
    blk.end = at + size;
    blk.rank = static_cast<int>(i < world_size ? i : chunks - 1 - i);
    lay.blocks.push_back(blk);
    at += size;
  }
  lay.query_host = lay.blocks.empty() ? 0 : lay.blocks.back().rank;
  return lay;
}

Result<StarLayout> partition_context(int64_t n_context, int block_size, int anchor_size, int world_size) {
  if (world_size < 1) return invalid_argument("world_size = {} must be >= 1", world_size);
  if (n_context < 0) return invalid_argument("context length = {} must be >= 0", n_context);
  if (block_size < 0) return invalid_argument("block_size = {} must be >= 0 (0 = one block per rank)", block_size);
  if (anchor_size < -1) return invalid_argument("anchor_size = {} must be >= -1 (-1 = block size)", anchor_size);
  StarLayout lay;
  lay.n_context = n_context;
  lay.world_size = world_size;
  if (block_size == 0) block_size = static_cast<int>(std::max<int64_t>(1, (n_context + world_size - 1) / world_size));
  lay.block_size = block_size;
  if (anchor_size == -1) anchor_size = block_size;
  if (anchor_size > block_size) {
    return invalid_argument("anchor_size = {} must be <= block_size = {}", anchor_size, block_size);
  }
  lay.anchor_size = static_cast<int>(std::min<int64_t>(anchor_size, std::min<int64_t>(block_size, n_context)));
  const int64_t n_blocks = (n_context + block_size - 1) / block_size;
  for (int64_t b = 0; b < n_blocks; ++b) {
    StarBlock blk;
    blk.index = static_cast<int>(b);
    blk.begin = b * block_size;
    blk.end = std::min<int64_t>(n_context, blk.begin + block_size);
    // Rank r owns [r*B/N, (r+1)*B/N): the owner of block b is the largest r with r*B/N <= b.
    int r = static_cast<int>((b * world_size + world_size - 1) / n_blocks);
    while (r > 0 && (static_cast<int64_t>(r) * n_blocks) / world_size > b) --r;
    while (r + 1 < world_size && (static_cast<int64_t>(r + 1) * n_blocks) / world_size <= b) ++r;
    blk.rank = r;
    lay.blocks.push_back(blk);
  }
  lay.query_host = lay.blocks.empty() ? 0 : lay.blocks.back().rank;
  return lay;
}

Result<StarLayout> plan_layout(int64_t n_context, const ContextPlan& plan, int world_size) {
  if (plan.mode == AttentionMode::kGlobal) {
    // One block holding everything, on rank 0; no anchor (block 1 is encoded alone anyway).
    StarLayout lay;
    lay.n_context = n_context;
    lay.block_size = static_cast<int>(std::max<int64_t>(1, n_context));
    lay.anchor_size = 0;
    lay.world_size = world_size;
    lay.query_host = 0;
    if (n_context > 0) lay.blocks.push_back({0, 0, n_context, 0});
    return lay;
  }
  if (plan.mode == AttentionMode::kExact && plan.exact_layout != ExactLayout::kContiguous) {
    return partition_zigzag(n_context, world_size);
  }
  const int anchor = plan.mode == AttentionMode::kExact ? 0 : plan.anchor_size;
  int block = plan.block_size;
  if (plan.n_blocks < 0) return invalid_argument("n_blocks = {} must be >= 0", plan.n_blocks);
  if (plan.n_blocks > 0) block = static_cast<int>(std::max<int64_t>(1, (n_context + plan.n_blocks - 1) / plan.n_blocks));
  return partition_context(n_context, block, anchor, world_size);
}

int64_t split_plain_prompt(int64_t n_prompt, int query_tail) {
  int64_t tail = query_tail > 0 ? query_tail : std::min<int64_t>(32, std::max<int64_t>(1, n_prompt / 4));
  tail = std::min<int64_t>(tail, n_prompt);
  return n_prompt - tail;
}

}  // namespace starserve
