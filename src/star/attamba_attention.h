// Attamba attention for the handlers (docs/specs/attamba.md, "What starserve fixes"): query t of
// layer l sees the band t - L .. t and the stored boundary keys j < t - L. The two key sets are
// disjoint, so attention is the LSE merge of two partials:
//   band: keys [ring ; new tokens], the ring being the carry's last L k/v before the first new
//         token (AttambaCarryLayout); a causal call with a window of L + 1 positions;
//   compressed: the stored boundary keys (KV cache rows, in position order, with their positions
//         kept beside them: KvCache::stored_positions) that lie at positions <= t - L - 1. Those
//         are a prefix of the stored keys for each query row, one key longer every P rows. Rows
//         go in blocks of 64 P: the prefix every row of the block sees in one non-causal call,
//         the keys its later rows add in one call with per-row key limits
//         (AttentionMask::key_limit), merged; so a forward of n rows makes about 3 n / (64 P)
//         attention calls per layer instead of n / P.
// Only boundary tokens' k/v go into the cache (append_boundaries); the carry lives beside it
// (KvCache::carry), one per layer and sequence.
#pragma once

#include <span>
#include <utility>
#include <vector>

#include "kv/kv_cache.h"
#include "model/model.h"

namespace starserve {

// Three fp32 buffers of one partial: O (rows, head_dim), LSE (rows), entropy (rows).
struct PartialBuffers {
  float* out = nullptr;
  float* lse = nullptr;
  float* entropy = nullptr;
  AttentionPartial part() const { return {out, lse, entropy}; }
};

class CompressedAttender {
 public:
  CompressedAttender(Backend& backend, const ModelHParams& hp);

  bool enabled() const { return hp_.attamba.enabled(); }
  int64_t carry_floats() const { return layout_.floats(); }
  const ModelHParams& hparams() const { return hp_; }

  // Carry row i = the cache's carry of batch[i] at `layer` (zeros for a new sequence).
  void load(KvCache& cache, int layer, std::span<const BatchSeq> batch, Tensor carry);
  // The cache's carry of batch[i] = carry row i.
  void store(KvCache& cache, int layer, std::span<const BatchSeq> batch, Tensor carry);
  // Appends the boundary rows among a sequence's new k/v (n rows, flags and positions of each) to
  // its cache rows of `layer`; returns the layer's stored row range they took.
  std::pair<int64_t, int64_t> append_boundaries(KvCache& cache, int layer, SeqId seq, Tensor k, Tensor v,
                                                std::span<const uint8_t> boundary, std::span<const int32_t> positions);
  // The band partial of a sequence's n query rows: keys [valid ring of carry_row ; k, v (n rows)].
  void band(Tensor q, Tensor k, Tensor v, Tensor carry_row, const PartialBuffers& p);
  // The compressed partial of query rows at positions qpos over keys (in position order, at
  // key_pos): row i sees the keys at positions <= qpos[i] - L - 1.
  void compressed(Tensor q, std::span<const int32_t> qpos, std::span<const KvView> keys,
                  std::span<const int32_t> key_pos, const PartialBuffers& p);
  // out (n, n_heads, head_dim) in any dtype, lse / entropy (n * n_heads) fp32 = the merge of parts;
  // lse and entropy may be null (scratch then).
  void merge(Tensor out, float* lse, float* entropy, std::span<const AttentionPartial> parts);
  // Fresh fp32 partial buffers for n query rows (slot: 0, 1, ... for buffers alive together).
  PartialBuffers buffers(int slot, int64_t n);
  // The whole attention of one sequence on one process: band, then compressed over `keys` at
  // key_pos (the boundaries appended already included), merged into out.
  void attend_local(Tensor q, Tensor k, Tensor v, Tensor carry_row, std::span<const int32_t> qpos,
                    std::span<const KvView> keys, std::span<const int32_t> key_pos, Tensor out);

 private:
  AttentionCall call(Tensor q, std::span<const KvView> kv, AttentionMask mask, const PartialBuffers& p,
                     int64_t row0) const;

  Backend& backend_;
  ModelHParams hp_;
  AttambaCarryLayout layout_;
  std::vector<Scratch> slots_;  // buffers(): 3 scratches per slot
  Scratch ring_k_, ring_v_, lse_, ent_, out32_;
  std::vector<float> header_;
  std::vector<int32_t> limit_, rel_limit_;  // compressed(): each row's visible key count, and past its block's first
};

// Keys [0, n) of a list of runs.
std::vector<KvView> key_prefix(std::span<const KvView> keys, int64_t n);
// Keys [from, to) of a list of runs.
std::vector<KvView> key_range(std::span<const KvView> keys, int64_t from, int64_t to);

}  // namespace starserve
