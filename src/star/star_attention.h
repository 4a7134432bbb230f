// Attention handlers of the three context modes (docs/specs/star-attention.md):
//   BlockLocalAttention  — phase 1 of star: a block attends to an optional prefix (the anchor) and
//                          causally to itself, never to other blocks; also ordinary causal prefill.
//   ExactContextAttention — phase 1 of exact mode: every rank's context (one span, or zigzag's two
//                          chunks) attends to all earlier context on every rank (K/V all-gathered
//                          per layer) and causally to itself.
//   Phase2Attention      — query and generated tokens: partial attention over this rank's KV (all
//                          context visible; causal over query/generated KV on the query host), then
//                          the exact LSE/entropy merge across ranks.
#pragma once

#include <optional>
#include <unordered_map>
#include <vector>

#include "comm/communicator.h"
#include "star/attamba_attention.h"
#include "star/attention_stats.h"
#include "star/entropy_collector.h"
#include "star/kv_shift_state.h"
#include "kv/kv_cache.h"
#include "model/model.h"
#include "star/merge.h"
#include "star/partition.h"

namespace starserve {

// Common parameters of partial attention calls for one model.
struct AttentionDims {
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 1.0f;
  float softcap = 0.0f;              // attention logit soft-capping (ModelHParams::attn_softcap)
  std::vector<int64_t> layer_window;  // per layer: the sliding window, 0 = none (ModelHParams::window_of)
  int64_t window(int layer) const {
    return layer >= 0 && layer < static_cast<int>(layer_window.size()) ? layer_window[layer] : 0;
  }
  static AttentionDims from(const ModelHParams& hp);
};

// The anchor's KV travelling between ranks in phase 1 (docs/specs/star-attention.md phase 1 step 7): the rank
// that owns c1 broadcasts the K and V of c1's first anchor_len tokens layer by layer while it
// encodes c1; every other rank receives them while it encodes its first block, writing them into
// its anchor sequence before that layer's attention. No rank computes the anchor a second time.
struct AnchorExchange {
  enum class Role { kNone, kSend, kReceive };
  Role role = Role::kNone;
  Communicator* comm = nullptr;
  int root = 0;            // the rank that owns c1
  int64_t anchor_len = 0;
  SeqId anchor_seq = 0;    // kReceive: where the anchor's KV goes (reserved, length anchor_len)
};

// A tensor's bytes from rank root to every rank, in place: NCCL on device buffers when the
// communicator has device collectives, else through host memory.
Status broadcast_tensor(Backend& backend, Communicator& comm, Tensor t, int root);

class BlockLocalAttention final : public AttentionHandler {
 public:
  BlockLocalAttention(Backend& backend, KvCache& cache, const ModelHParams& hp);
  // Keys of the next forward: the first prefix_len tokens of prefix_seq (if any), then the new
  // tokens themselves (appended to their own sequence). Earlier tokens of the sequence are NOT
  // visible: each block is encoded independently.
  void set_prefix(std::optional<SeqId> prefix_seq, int64_t prefix_len);
  // The anchor exchange of the next forward (one sequence in the batch); kNone turns it off.
  void set_anchor_exchange(const AnchorExchange& x) { exchange_ = x; }
  // KV-shifting models on several ranks: in the next forward (every rank's first block), each
  // layer's raw k/v of every rank's last token is all-gathered, and the block's first token mixes
  // with rank `source`'s (the owner of the previous block; -1 = none: c1, or a rank that only
  // sends). comm null turns it off.
  void set_shift_halo(Communicator* comm, int source) {
    halo_comm_ = comm;
    halo_source_ = source;
  }
  // A rank with no block to encode still joins every layer's anchor broadcast (and drops it) and,
  // when set_shift_halo is on, every layer's halo gather first: layers [first, last). x.comm null:
  // no anchor broadcast.
  Status join_anchor_exchange(const AnchorExchange& x, int first, int last);

  Status begin_forward(std::span<const BatchSeq> batch) override;
  Status attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v, Tensor out) override;
  void end_forward(std::span<const BatchSeq> batch) override;
  Status shift_neighbours(int layer, std::span<const BatchSeq> batch, Tensor last, Tensor prev) override;
  // Attamba models: the block's carry continues this sequence's (its previous block on this rank)
  // or, with set_shift_halo, the halo carry of rank `source`; the block attends to its band and to
  // the boundaries of the prefix (the anchor, positions < prefix_len) and of its own tokens.
  Status load_carry(int layer, std::span<const BatchSeq> batch, Tensor carry) override;
  Status store_carry(int layer, std::span<const BatchSeq> batch, Tensor carry_out, Tensor carry,
                     bool* replaced) override;
  Status attend_compressed(int layer, std::span<const BatchSeq> batch, const CompressedAttention& a) override;

 private:
  Backend& backend_;
  KvCache& cache_;
  AttentionDims dims_;
  CompressedAttender compressed_;
  Status exchange_anchor(int layer, Tensor k, Tensor v);
  // Attamba: the anchor's stored rows of the layer (its boundaries at positions < anchor_len).
  Status exchange_compressed_anchor(int layer, SeqId seq);

  std::optional<SeqId> prefix_seq_;
  int64_t prefix_len_ = 0;
  AnchorExchange exchange_;
  Communicator* halo_comm_ = nullptr;
  int halo_source_ = -1;
  ShiftHalo halo_;
  Scratch lse_, anchor_k_, anchor_v_;
};

// Exact mode's phase 1. A rank's tokens are one or two runs of consecutive positions (the layout's
// runs_of: one span, or zigzag's chunks r and 2W-1-r), concatenated in its forward. Per layer every
// rank's K/V rows are all-gathered (padded to the longest share), and each of this rank's query runs
// attends, rank by rank, to the runs that lie before it (and causally to itself): one partial per
// rank that has such keys, then the exact merge of those partials.
class ExactContextAttention final : public AttentionHandler {
 public:
  ExactContextAttention(Backend& backend, KvCache& cache, const ModelHParams& hp, Communicator& comm);
  // A rank whose span is empty still takes part in every collective of the forward pass: layers
  // [first, last) of sequence seq's (the runs' exchange comes with layer 0).
  Status participate_without_tokens(SeqId seq, int first, int last, int n_layers);
  // Drops what the handler keeps of a sequence whose encoding stopped part-way (chunked prefill).
  void forget(SeqId seq) { exchanges_.erase(seq); }
  // Most runs one rank's forward may hold (zigzag's two chunks).
  static constexpr int kMaxRuns = 2;

  Status begin_forward(std::span<const BatchSeq> batch) override;
  Status attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v, Tensor out) override;
  void end_forward(std::span<const BatchSeq> batch) override;
  // KV-shifting models (contiguous layout only: ContextEncoder::layout_for refuses zigzag): the
  // span's first token mixes with the last token of the nearest earlier rank that has context (a
  // one-token halo per layer, gathered from every rank).
  Status shift_neighbours(int layer, std::span<const BatchSeq> batch, Tensor last, Tensor prev) override;
  // Attamba models (contiguous layout only): the carry halo at every rank boundary, the band, and
  // the boundaries of the own span and of every earlier rank's (all-gathered per layer).
  Status load_carry(int layer, std::span<const BatchSeq> batch, Tensor carry) override;
  Status store_carry(int layer, std::span<const BatchSeq> batch, Tensor carry_out, Tensor carry,
                     bool* replaced) override;
  Status attend_compressed(int layer, std::span<const BatchSeq> batch, const CompressedAttention& a) override;

 private:
  // One run of a rank's rows: positions [begin, begin + size), rows [row, row + size) of its share.
  struct Run {
    int64_t begin = 0, size = 0, row = 0;
  };
  // What every rank holds in one forward: counts (tokens per rank), the longest, and the runs.
  struct Exchange {
    std::vector<int64_t> counts;
    int64_t max_count = 0;
    std::vector<std::vector<Run>> runs;  // per rank, in position order
  };
  // All-gathers every rank's runs, taken from its tokens' positions (empty: none).
  Status gather_runs(std::span<const int32_t> positions);
  Status layer_exchange(Tensor k, Tensor v, int64_t n);
  Status gather_rows(Tensor rows, int64_t n, Scratch& all);
  // Whether every rank's share is at most one run (the layouts the halos support).
  bool one_run_per_rank() const;
  // Rank r's gathered rows [row, row + n) of k_all_ / v_all_.
  KvView gathered(int r, int64_t row, int64_t n);

  Backend& backend_;
  KvCache& cache_;
  AttentionDims dims_;
  Communicator& comm_;
  // Sequence seq's exchange into counts_ / max_count_ / runs_ (kept between the calls of a forward
  // split by layers, since other sequences' forwards may run in between).
  void load_exchange(SeqId seq);
  std::vector<int64_t> counts_;        // context tokens per rank in this forward
  int64_t max_count_ = 0;
  std::vector<std::vector<Run>> runs_;
  std::unordered_map<SeqId, Exchange> exchanges_;
  std::vector<char> send_host_, recv_host_;
  bool kv_shift_ = false;  // ModelHParams::kv_shift: a halo gather before each layer's exchange
  ShiftHalo halo_;
  CompressedAttender compressed_;
  std::vector<KvView> call_kv_;  // one view per call of a layer (calls_ point into it)
  std::vector<AttentionCall> calls_;
  Scratch own_k_, own_v_;
  Scratch send_, k_all_, v_all_, part_out_, part_lse_, part_ent_, lse_, ent_, out32_;
};

class Phase2Attention final : public AttentionHandler {
 public:
  Phase2Attention(Backend& backend, KvCache& cache, const ModelHParams& hp, Communicator& comm, MergeAlgo algo);

  // Per sequence: whether this rank stores its query/generated KV, and the global number of
  // context tokens (for the entropy maximum log(n_visible)).
  // first_context_position: the position of this rank's first context token, which a context-only
  // rank needs under a sliding window (-1 = not given; the query host never needs it).
  void register_sequence(SeqId seq, bool query_host, int64_t n_context_total, int64_t first_context_position = -1);
  // The same from the request's layout: whether `rank` hosts the query, the context's length, and
  // where this rank's keys sit (its runs: under a sliding window the mask places each key by its
  // position, across zigzag exact's jump between a rank's two chunks).
  void register_sequence(SeqId seq, const StarLayout& layout, int rank);
  void forget_sequence(SeqId seq);
  // A registered sequence's placement for `dst`, a fork of it (KvCache::fork; n > 1 choices): the same
  // context layout and count of tokens so far, with no entropy tracked.
  void clone_sequence(SeqId src, SeqId dst);
  // Accumulates the entropy of the sequence's rows into stats from its next forward on; may come
  // before register_sequence, so that the query's own rows (the first forward) are counted.
  void track_entropy(SeqId seq, EntropyStats* stats);
  const RankMerger& merger() const { return merger_; }
  // Time spent in the cross-rank merge (collectives included), and the number of merges.
  double merge_seconds() const { return merge_seconds_; }
  int64_t merges() const { return merges_; }

  Status begin_forward(std::span<const BatchSeq> batch) override;
  Status attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v, Tensor out) override;
  void end_forward(std::span<const BatchSeq> batch) override;
  // KV-shifting models: the query host's first query token mixes with its last context token (the
  // query host owns the last block); a context-only rank's k/v are not kept, so it mixes with zeros.
  Status shift_neighbours(int layer, std::span<const BatchSeq> batch, Tensor last, Tensor prev) override;
  // Attamba models: every rank's compressed partial over the boundaries it stores (j <= t - L - 1),
  // the query host's merged with its band partial (its carry: it holds the last context token),
  // then the exact merge across ranks. Entropy is not tracked for them.
  Status load_carry(int layer, std::span<const BatchSeq> batch, Tensor carry) override;
  Status store_carry(int layer, std::span<const BatchSeq> batch, Tensor carry_out, Tensor carry,
                     bool* replaced) override;
  Status attend_compressed(int layer, std::span<const BatchSeq> batch, const CompressedAttention& a) override;

 private:
  struct SeqInfo {
    bool query_host = false;
    int64_t n_context_total = 0;
    int64_t first_context_position = -1;  // of this rank's context (register_sequence)
    // This rank's context rows [0, gap_from) sit at first_context_position.., the rest `gap`
    // positions further on (zigzag exact's second chunk); gap 0: one run.
    int64_t gap_from = 0, gap = 0;
    int64_t n_local_context = 0;  // KV length at registration: this rank's context tokens
    int64_t n_generated = 0;      // query + generated tokens processed so far (global count)
    EntropyStats* entropy = nullptr;
  };
  Backend& backend_;
  KvCache& cache_;
  AttentionDims dims_;
  int n_layers_ = 0;
  RankMerger merger_;
  std::unordered_map<SeqId, SeqInfo> seqs_;
  std::unordered_map<SeqId, EntropyStats*> entropy_before_registration_;
  Scratch lse_, ent_, out32_;
  DeviceBuffer zero_rows_;  // shift_neighbours of a context-only rank
  std::vector<std::vector<KvView>> segs_;  // one forward layer's keys per sequence (calls_ point into them)
  std::vector<AttentionCall> calls_;
  std::vector<KvCache::RowsWrite> writes_;  // one forward layer's new rows, written at once
  EntropyCollector collector_;
  std::vector<float> rank_entropy_;  // one layer's rank entropy of a tracked sequence (host)
  double merge_seconds_ = 0;
  int64_t merges_ = 0;
  CompressedAttender compressed_;
};

}  // namespace starserve
