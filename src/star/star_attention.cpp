#include "star/star_attention.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

namespace starserve {

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

PartialAttentionParams make_params(const AttentionDims& d, float* out, float* lse, float* ent, const float* q,
                                   std::span<const KvSegment> kv, int64_t n_q, AttentionMask mask) {
  PartialAttentionParams p;
  p.out = out;
  p.lse = lse;
  p.entropy = ent;
  p.q = q;
  p.kv = kv;
  p.n_q = n_q;
  p.n_heads = d.n_heads;
  p.n_kv_heads = d.n_kv_heads;
  p.head_dim = d.head_dim;
  p.scale = d.scale;
  p.mask = mask;
  return p;
}
}  // namespace

AttentionDims AttentionDims::from(const ModelHParams& hp) {
  return {hp.n_heads, hp.n_kv_heads, hp.head_dim, 1.0f / std::sqrt(static_cast<float>(hp.head_dim))};
}

// ---------------------------------------------------------------- BlockLocalAttention

BlockLocalAttention::BlockLocalAttention(Backend& backend, KvCache& cache, const ModelHParams& hp)
    : backend_(backend), cache_(cache), dims_(AttentionDims::from(hp)) {}

void BlockLocalAttention::set_prefix(std::optional<SeqId> prefix_seq, int64_t prefix_len) {
  prefix_seq_ = prefix_seq;
  prefix_len_ = prefix_seq ? prefix_len : 0;
}

Status BlockLocalAttention::begin_forward(std::span<const BatchSeq> batch) {
  for (const BatchSeq& s : batch) {
    SS_RETURN_IF_ERROR(cache_.reserve(s.seq_id, cache_.length(s.seq_id) + static_cast<int64_t>(s.tokens.size())));
  }
  return Status();
}

Status BlockLocalAttention::attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v,
                                   Tensor out) {
  const int64_t kv_row = static_cast<int64_t>(dims_.n_kv_heads) * dims_.head_dim;
  const int64_t q_row = static_cast<int64_t>(dims_.n_heads) * dims_.head_dim;
  int64_t start = 0;
  for (const BatchSeq& s : batch) {
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    const int64_t past = cache_.length(s.seq_id);
    cache_.write(layer, s.seq_id, past, k.f32() + start * kv_row, v.f32() + start * kv_row, n);
    std::vector<KvSegment> segs;
    if (prefix_seq_) segs = cache_.segments(layer, *prefix_seq_, 0, prefix_len_);
    const std::vector<KvSegment> own = cache_.segments(layer, s.seq_id, past, past + n);
    segs.insert(segs.end(), own.begin(), own.end());
    lse_.resize(n * dims_.n_heads);
    // Keys [prefix ; block]: block token i sees the whole prefix and block tokens 0..i.
    backend_.partial_attention(make_params(dims_, out.f32() + start * q_row, lse_.data(), nullptr,
                                           q.f32() + start * q_row, segs, n, {true, prefix_len_}));
    start += n;
  }
  return Status();
}

void BlockLocalAttention::end_forward(std::span<const BatchSeq> batch) {
  for (const BatchSeq& s : batch) {
    cache_.set_length(s.seq_id, cache_.length(s.seq_id) + static_cast<int64_t>(s.tokens.size()));
  }
}

// ---------------------------------------------------------------- ExactContextAttention

ExactContextAttention::ExactContextAttention(Backend& backend, KvCache& cache, const ModelHParams& hp,
                                             Communicator& comm)
    : backend_(backend), cache_(cache), dims_(AttentionDims::from(hp)), comm_(comm) {}

Status ExactContextAttention::gather_sizes(int64_t mine) {
  counts_.assign(comm_.world_size(), 0);
  SS_RETURN_IF_ERROR(comm_.all_gather(&mine, counts_.data(), sizeof(int64_t)));
  max_count_ = *std::max_element(counts_.begin(), counts_.end());
  return Status();
}

// All-gathers this layer's K and V of every rank's span, padded to the longest span.
Status ExactContextAttention::layer_exchange(const float* k, const float* v, int64_t n) {
  const int64_t kv_row = static_cast<int64_t>(dims_.n_kv_heads) * dims_.head_dim;
  const size_t per_rank = static_cast<size_t>(max_count_ * kv_row);
  send_.assign(per_rank, 0.0f);
  k_all_.resize(per_rank * comm_.world_size());
  v_all_.resize(per_rank * comm_.world_size());
  if (n > 0) std::memcpy(send_.data(), k, sizeof(float) * n * kv_row);
  SS_RETURN_IF_ERROR(comm_.all_gather(send_.data(), k_all_.data(), per_rank * sizeof(float)));
  if (n > 0) std::memcpy(send_.data(), v, sizeof(float) * n * kv_row);
  SS_RETURN_IF_ERROR(comm_.all_gather(send_.data(), v_all_.data(), per_rank * sizeof(float)));
  return Status();
}

Status ExactContextAttention::participate_without_tokens(int n_layers) {
  SS_RETURN_IF_ERROR(gather_sizes(0));
  for (int l = 0; l < n_layers; ++l) SS_RETURN_IF_ERROR(layer_exchange(nullptr, nullptr, 0));
  return Status();
}

Status ExactContextAttention::begin_forward(std::span<const BatchSeq> batch) {
  SS_CHECK(batch.size() == 1, "exact context encoding runs one span per forward, got {}", batch.size());
  const int64_t n = static_cast<int64_t>(batch[0].tokens.size());
  SS_RETURN_IF_ERROR(cache_.reserve(batch[0].seq_id, cache_.length(batch[0].seq_id) + n));
  return gather_sizes(n);
}

Status ExactContextAttention::attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v,
                                     Tensor out) {
  const BatchSeq& s = batch[0];
  const int64_t n = static_cast<int64_t>(s.tokens.size());
  const int64_t kv_row = static_cast<int64_t>(dims_.n_kv_heads) * dims_.head_dim;
  const int64_t rows = n * dims_.n_heads;
  const int64_t past = cache_.length(s.seq_id);
  SS_CHECK(past == 0, "exact context encoding expects an empty sequence, it has {} tokens", past);
  cache_.write(layer, s.seq_id, 0, k.f32(), v.f32(), n);
  SS_RETURN_IF_ERROR(layer_exchange(k.f32(), v.f32(), n));

  // Partials: own span causally, then every earlier rank's span in full.
  const int me = comm_.rank();
  int n_parts = 1;
  for (int r = 0; r < me; ++r) n_parts += counts_[r] > 0 ? 1 : 0;
  part_out_.resize(n_parts * rows * dims_.head_dim);
  part_lse_.resize(n_parts * rows);
  part_ent_.resize(n_parts * rows);
  const std::vector<KvSegment> own = cache_.segments(layer, s.seq_id, 0, n);
  backend_.partial_attention(make_params(dims_, part_out_.data(), part_lse_.data(), part_ent_.data(), q.f32(), own,
                                         n, {true, 0}));
  int p = 1;
  for (int r = 0; r < me; ++r) {
    if (counts_[r] == 0) continue;
    const size_t off = static_cast<size_t>(r) * max_count_ * kv_row;
    const KvSegment seg{k_all_.data() + off, v_all_.data() + off, counts_[r]};
    backend_.partial_attention(make_params(dims_, part_out_.data() + p * rows * dims_.head_dim,
                                           part_lse_.data() + p * rows, part_ent_.data() + p * rows, q.f32(),
                                           {&seg, 1}, n, {false, 0}));
    ++p;
  }
  std::vector<AttentionPartial> parts;
  for (int i = 0; i < n_parts; ++i) {
    parts.push_back({part_out_.data() + i * rows * dims_.head_dim, part_lse_.data() + i * rows,
                     part_ent_.data() + i * rows});
  }
  lse_.resize(rows);
  ent_.resize(rows);
  backend_.merge_partials(out.f32(), lse_.data(), ent_.data(), parts, rows, dims_.head_dim);
  return Status();
}

void ExactContextAttention::end_forward(std::span<const BatchSeq> batch) {
  for (const BatchSeq& s : batch) cache_.set_length(s.seq_id, static_cast<int64_t>(s.tokens.size()));
}

// ---------------------------------------------------------------- Phase2Attention

Phase2Attention::Phase2Attention(Backend& backend, KvCache& cache, const ModelHParams& hp, Communicator& comm,
                                 MergeAlgo algo)
    : backend_(backend), cache_(cache), dims_(AttentionDims::from(hp)), merger_(comm, algo) {}

void Phase2Attention::register_sequence(SeqId seq, bool query_host, int64_t n_context_total) {
  SeqInfo info;
  info.query_host = query_host;
  info.n_context_total = n_context_total;
  info.n_local_context = cache_.length(seq);
  seqs_[seq] = info;
}

void Phase2Attention::forget_sequence(SeqId seq) { seqs_.erase(seq); }

void Phase2Attention::track_entropy(SeqId seq, EntropyStats* stats) { seqs_.at(seq).entropy = stats; }

Status Phase2Attention::begin_forward(std::span<const BatchSeq> batch) {
  for (const BatchSeq& s : batch) {
    auto it = seqs_.find(s.seq_id);
    SS_CHECK(it != seqs_.end(), "sequence {} was not registered for phase 2", s.seq_id);
    if (it->second.query_host) {
      SS_RETURN_IF_ERROR(cache_.reserve(s.seq_id, cache_.length(s.seq_id) + static_cast<int64_t>(s.tokens.size())));
    }
  }
  return Status();
}

Status Phase2Attention::attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v,
                               Tensor out) {
  const int64_t kv_row = static_cast<int64_t>(dims_.n_kv_heads) * dims_.head_dim;
  const int64_t q_row = static_cast<int64_t>(dims_.n_heads) * dims_.head_dim;
  int64_t total = 0;
  for (const BatchSeq& s : batch) total += static_cast<int64_t>(s.tokens.size());
  lse_.resize(total * dims_.n_heads);
  ent_.resize(total * dims_.n_heads);
  int64_t start = 0;
  for (const BatchSeq& s : batch) {
    const SeqInfo& info = seqs_.at(s.seq_id);
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    float* o = out.f32() + start * q_row;
    float* lse = lse_.data() + start * dims_.n_heads;
    float* ent = ent_.data() + start * dims_.n_heads;
    std::vector<KvSegment> segs;
    AttentionMask mask{false, 0};
    if (info.query_host) {
      const int64_t past = cache_.length(s.seq_id);
      cache_.write(layer, s.seq_id, past, k.f32() + start * kv_row, v.f32() + start * kv_row, n);
      segs = cache_.segments(layer, s.seq_id, 0, past + n);
      // Keys [local context ; earlier query/generated ; new]: new token i sees all context, every
      // earlier query/generated token, and new tokens 0..i.
      mask = {true, past};
    } else {
      // Context only: every key visible to every query row (no causal alignment at all).
      segs = cache_.segments(layer, s.seq_id, 0, info.n_local_context);
    }
    if (segs.empty()) {
      std::fill(o, o + n * q_row, 0.0f);
      std::fill(lse, lse + n * dims_.n_heads, kNegInf);
      std::fill(ent, ent + n * dims_.n_heads, 0.0f);
    } else {
      backend_.partial_attention(make_params(dims_, o, lse, ent, q.f32() + start * q_row, segs, n, mask));
    }
    start += n;
  }
  // One collective for the whole batch: rows are (token, head) pairs.
  const auto t0 = std::chrono::steady_clock::now();
  SS_RETURN_IF_ERROR(merger_.merge(out.f32(), lse_.data(), ent_.data(), total * dims_.n_heads, dims_.head_dim));
  merge_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++merges_;
  start = 0;
  for (const BatchSeq& s : batch) {
    const SeqInfo& info = seqs_.at(s.seq_id);
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    if (info.entropy && info.entropy->enabled()) {
      std::vector<int64_t> visible(n);
      for (int64_t i = 0; i < n; ++i) visible[i] = info.n_context_total + info.n_generated + i + 1;
      info.entropy->add(layer, ent_.data() + start * dims_.n_heads, n, visible.data());
    }
    start += n;
  }
  return Status();
}

void Phase2Attention::end_forward(std::span<const BatchSeq> batch) {
  for (const BatchSeq& s : batch) {
    SeqInfo& info = seqs_.at(s.seq_id);
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    info.n_generated += n;
    if (info.query_host) cache_.set_length(s.seq_id, cache_.length(s.seq_id) + n);
  }
}

}  // namespace starserve
