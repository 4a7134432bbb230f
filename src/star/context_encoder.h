// Encodes a request's context on every rank according to its mode (docs/specs/star-attention.md):
//   global: one rank holds the whole context (ordinary causal prefill);
//   exact:  each rank encodes its share (one contiguous span, or zigzag's two chunks: the
//           layout's exact_layout) with attention to all earlier context (all ranks);
//   star:   phase 1 — each rank encodes its blocks as [anchor ; block]; the only communication is
//           the anchor's KV, sent by the owner of c1 while it encodes c1.
// Afterwards each rank holds the KV of its own context tokens in the request's KV sequence, and
// Phase2Attention takes over for the query and generated tokens. Every rank calls encode() with
// the same arguments (SPMD); what each rank does follows from the layout.
#pragma once

#include <functional>
#include <span>
#include <unordered_map>
#include <utility>

#include "common/config.h"
#include "star/partition.h"
#include "star/star_attention.h"

namespace starserve {

// Called after each block this rank finishes: (blocks done, blocks of this rank).
using BlockProgressFn = std::function<void(int, int)>;
// Checked between blocks; returning a non-OK status stops the encoding (cancellation, deadline).
using ContinueFn = std::function<Status()>;

// Prompt log-probabilities of phase 1 (model/token_scores.h): next[p] is the token after context
// position p (after the last context token: the query's first), top_k the alternatives per token.
// Each forward of this rank's own context tokens appends their scores to *out (ScoredToken::position
// = the context position); the anchor a rank computes for itself is not scored.
struct ContextScoring {
  std::span<const int32_t> next;  // (n_context)
  int top_k = 0;
  std::vector<ScoredToken>* out = nullptr;
};

// Sequence id of a request's scratch anchor KV (phase 1 only; freed when phase 1 ends).
inline SeqId anchor_seq_id(SeqId seq) { return seq | (int64_t{1} << 62); }

class ContextEncoder {
 public:
  ContextEncoder(Model& model, KvCache& cache, Communicator& comm);

  // The layout every rank derives for this request (global: one block on rank 0).
  Result<StarLayout> layout_for(int64_t n_context, const ContextPlan& plan) const;

  // Fills `seq` with this rank's context KV. On error the sequence's KV is freed on this rank.
  Status encode(SeqId seq, std::span<const int32_t> context, const StarLayout& layout, AttentionMode mode,
                const BlockProgressFn& progress = {}, const ContinueFn& keep_going = {});

  // Step-wise form for a scheduler that interleaves phase 1 with other work. A block's forward
  // may be split by layers into chunks of `layers_per_chunk` layers (chunked prefill: one chunk per
  // step, so decode steps and cancellation checks come between chunks); every block of a request is
  // split the same way, so every rank takes the same steps: block k = 0, 1, ... up to the most
  // blocks any rank has, and within it chunk c = 0 .. chunks_per_block - 1.
  // star / global: chunk c of this rank's k-th block (k < layout.blocks_of(rank).size()). With
  // several ranks and an anchor, the steps of block 0 carry the anchor's KV from the owner of c1
  // to the other ranks, layer by layer (no other communication in phase 1): a rank without a k-th
  // block calls join_block instead, so that it still takes part.
  // scoring (optional): this block's prompt log-probabilities (ContextScoring).
  Status encode_block(SeqId seq, std::span<const int32_t> context, const StarLayout& layout, int k, int chunk = 0,
                      int layers_per_chunk = 0, const ContextScoring* scoring = nullptr);
  Status join_block(SeqId seq, const StarLayout& layout, int k, int chunk = 0, int layers_per_chunk = 0);
  // exact: the whole context in one collective forward (every rank calls it), chunk c of it; a
  // rank's runs (StarLayout::runs_of) go through it together.
  Status encode_exact(SeqId seq, std::span<const int32_t> context, const StarLayout& layout, int chunk = 0,
                      int layers_per_chunk = 0, const ContextScoring* scoring = nullptr);
  // Chunks of each block's forward: ceil(n_layers / layers_per_chunk) (1 when 0 = unchunked).
  int chunks_per_block(int layers_per_chunk) const;
  // Ends phase 1 for the sequence: the anchor's scratch KV is dropped, and a forward stopped
  // part-way (cancelled between chunks) is forgotten.
  void finish(SeqId seq);
  // Context tokens this rank has run through the model in phase 1 so far (its own blocks, plus the
  // anchor wherever a rank has to compute it itself).
  int64_t tokens_forwarded() const { return tokens_forwarded_; }

 private:
  Status forward_block(SeqId seq, std::span<const int32_t> tokens, int64_t first_position);
  // Chunk `chunk` of a forward split by layers (the whole forward when layers_per_chunk is 0).
  Status forward_chunk(AttentionHandler& attention, SeqId seq, std::span<const int32_t> tokens, int64_t first_position,
                       int chunk, int layers_per_chunk, const ContextScoring* scoring = nullptr);
  // The same with each token's position given (zigzag exact: two runs of positions).
  Status forward_chunk(AttentionHandler& attention, SeqId seq, std::span<const int32_t> tokens,
                       std::span<const int32_t> positions, int chunk, int layers_per_chunk,
                       const ContextScoring* scoring = nullptr);
  // The layers [first, last) of a chunk.
  std::pair<int, int> chunk_layers(int chunk, int layers_per_chunk) const;
  bool exchanges_anchor(const StarLayout& layout) const;
  // Whether the layout's first blocks exchange KV-shifting halos (a kv_shift model, several ranks
  // and blocks).
  bool shift_halo(const StarLayout& layout) const;
  // Attamba's layout rules (block size, carry independence); kInvalidArgument naming the value.
  Status check_attamba_layout(const StarLayout& layout, AttentionMode mode) const;

  Model& model_;
  KvCache& cache_;
  Communicator& comm_;
  BlockLocalAttention block_attention_;
  ExactContextAttention exact_attention_;
  int64_t tokens_forwarded_ = 0;
  std::unordered_map<SeqId, PartialForward> partial_;  // forwards split by layers, between their chunks
};

}  // namespace starserve
