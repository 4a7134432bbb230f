#include "star/context_encoder.h"

#include <numeric>

#include <spdlog/spdlog.h>

namespace starserve {

ContextEncoder::ContextEncoder(Model& model, KvCache& cache, Communicator& comm)
    : model_(model),
      cache_(cache),
      comm_(comm),
      block_attention_(model.backend(), cache, model.hparams()),
      exact_attention_(model.backend(), cache, model.hparams(), comm) {}

Result<StarLayout> ContextEncoder::layout_for(int64_t n_context, const ContextPlan& plan) const {
  if (plan.mode == AttentionMode::kGlobal) {
    // One block holding everything, on rank 0; no anchor (block 1 is encoded alone anyway).
    StarLayout lay;
    lay.n_context = n_context;
    lay.block_size = static_cast<int>(std::max<int64_t>(1, n_context));
    lay.anchor_size = 0;
    lay.world_size = comm_.world_size();
    lay.query_host = 0;
    if (n_context > 0) lay.blocks.push_back({0, 0, n_context, 0});
    return lay;
  }
  const int anchor = plan.mode == AttentionMode::kExact ? 0 : plan.anchor_size;
  return partition_context(n_context, plan.block_size, anchor, comm_.world_size());
}

Status ContextEncoder::forward_block(SeqId seq, std::span<const int32_t> tokens, int64_t first_position) {
  std::vector<int32_t> pos(tokens.size());
  std::iota(pos.begin(), pos.end(), static_cast<int32_t>(first_position));
  BatchSeq bs{seq, tokens, pos, false};
  return model_.forward({&bs, 1}, block_attention_, nullptr);
}

Status ContextEncoder::encode(SeqId seq, std::span<const int32_t> context, const StarLayout& layout,
                              AttentionMode mode, const BlockProgressFn& progress, const ContinueFn& keep_going) {
  SS_CHECK(static_cast<int64_t>(context.size()) == layout.n_context, "context {} tokens, layout {}", context.size(),
           layout.n_context);
  Status st = mode == AttentionMode::kExact ? encode_exact(seq, context, layout)
                                            : encode_star(seq, context, layout, progress, keep_going);
  if (!st.ok()) cache_.free_sequence(seq);
  cache_.free_sequence(anchor_seq_id(seq));  // the anchor's KV is dropped after phase 1
  return st;
}

Status ContextEncoder::encode_star(SeqId seq, std::span<const int32_t> context, const StarLayout& layout,
                                   const BlockProgressFn& progress, const ContinueFn& keep_going) {
  const std::vector<StarBlock> mine = layout.blocks_of(comm_.rank());
  std::optional<SeqId> anchor_seq;
  int64_t anchor_len = layout.anchor_size;
  int done = 0;
  for (const StarBlock& b : mine) {
    if (keep_going) SS_RETURN_IF_ERROR(keep_going());
    const std::span<const int32_t> tokens = context.subspan(b.begin, b.size());
    if (b.index == 0) {
      // c1 is encoded alone. Its first anchor_size tokens' KV equal the anchor's KV (same tokens,
      // positions 0.., causal), so this rank reuses them instead of recomputing the anchor.
      block_attention_.set_prefix(std::nullopt, 0);
      SS_RETURN_IF_ERROR(forward_block(seq, tokens, b.begin));
      if (anchor_len > 0) anchor_seq = seq;
    } else {
      if (anchor_len > 0 && !anchor_seq) {
        // Anchor KV, computed once per rank and reused for all its blocks (spec phase 1 step 7).
        block_attention_.set_prefix(std::nullopt, 0);
        SS_RETURN_IF_ERROR(forward_block(anchor_seq_id(seq), context.subspan(0, anchor_len), 0));
        anchor_seq = anchor_seq_id(seq);
      }
      block_attention_.set_prefix(anchor_seq, anchor_len);
      SS_RETURN_IF_ERROR(forward_block(seq, tokens, b.begin));
    }
    ++done;
    if (progress) progress(done, static_cast<int>(mine.size()));
  }
  block_attention_.set_prefix(std::nullopt, 0);
  return Status();
}

Status ContextEncoder::encode_exact(SeqId seq, std::span<const int32_t> context, const StarLayout& layout) {
  // This rank's blocks are contiguous: encode them as one span in a single forward.
  const std::vector<StarBlock> mine = layout.blocks_of(comm_.rank());
  if (mine.empty()) return exact_attention_.participate_without_tokens(model_.hparams().n_layers);
  const int64_t begin = mine.front().begin, end = mine.back().end;
  std::vector<int32_t> pos(end - begin);
  std::iota(pos.begin(), pos.end(), static_cast<int32_t>(begin));
  BatchSeq bs{seq, context.subspan(begin, end - begin), pos, false};
  return model_.forward({&bs, 1}, exact_attention_, nullptr);
}

}  // namespace starserve
