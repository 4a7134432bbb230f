// LocalAttention: ordinary (global) attention over a sequence's own KV cache on this process.
// New tokens' K/V are appended at the sequence's current length; each new token attends causally
// to everything before it. This is the `global` mode and the single-rank building block.
#pragma once

#include <unordered_map>
#include <vector>

#include "star/attamba_attention.h"
#include "star/attention_stats.h"
#include "star/entropy_collector.h"
#include "kv/kv_cache.h"
#include "model/model.h"

namespace starserve {

class LocalAttention final : public AttentionHandler {
 public:
  LocalAttention(Backend& backend, KvCache& cache, const ModelHParams& hp);

  // When set, entropy of every query row of the given sequence is accumulated into stats.
  void track_entropy(SeqId seq, EntropyStats* stats) { entropy_[seq] = stats; }
  void untrack_entropy(SeqId seq) { entropy_.erase(seq); }

  Status begin_forward(std::span<const BatchSeq> batch) override;
  Status attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v, Tensor out) override;
  void end_forward(std::span<const BatchSeq> batch) override;
  // KV-shifting models: each sequence's previous token is its last one so far (KvCache::shift_rows).
  Status shift_neighbours(int layer, std::span<const BatchSeq> batch, Tensor last, Tensor prev) override;
  // Attamba models: the carry and the boundary rows in the KV cache, attention over the band and
  // every stored boundary (CompressedAttender). Entropy is not tracked for them.
  Status load_carry(int layer, std::span<const BatchSeq> batch, Tensor carry) override;
  Status store_carry(int layer, std::span<const BatchSeq> batch, Tensor carry_out, Tensor carry,
                     bool* replaced) override;
  Status attend_compressed(int layer, std::span<const BatchSeq> batch, const CompressedAttention& a) override;

 private:
  CompressedAttender compressed_;
  Backend& backend_;
  KvCache& cache_;
  ModelHParams hp_;
  std::unordered_map<SeqId, EntropyStats*> entropy_;
  EntropyCollector collector_;
  Scratch lse_, ent_;
  std::vector<std::vector<KvView>> segs_;  // one forward layer's keys per sequence (calls_ point into them)
  std::vector<AttentionCall> calls_;
  std::vector<KvCache::RowsWrite> writes_;  // one forward layer's new rows, written at once
};

}  // namespace starserve
