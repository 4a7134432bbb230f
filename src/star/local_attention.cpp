#include "star/local_attention.h"

#include "star/kv_shift_state.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace starserve {

LocalAttention::LocalAttention(Backend& backend, KvCache& cache, const ModelHParams& hp)
    : compressed_(backend, hp), backend_(backend), cache_(cache), hp_(hp), collector_(backend) {}

Status LocalAttention::begin_forward(std::span<const BatchSeq> batch) {
  int64_t tracked_rows = 0;
  for (const BatchSeq& s : batch) {
    SS_RETURN_IF_ERROR(cache_.reserve(s.seq_id, cache_.length(s.seq_id) + static_cast<int64_t>(s.tokens.size())));
    auto it = entropy_.find(s.seq_id);
    if (it != entropy_.end() && it->second->enabled()) tracked_rows += static_cast<int64_t>(s.tokens.size());
  }
  collector_.begin(tracked_rows * hp_.n_layers, hp_.n_heads);
  return Status();
}

Status LocalAttention::attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v, Tensor out) {
  const int64_t nh = hp_.n_heads;
  int64_t total = 0;
  for (const BatchSeq& s : batch) total += static_cast<int64_t>(s.tokens.size());
  float* lse = lse_.floats(backend_, total * nh);
  float* ent = ent_.floats(backend_, total * nh);
  // Every sequence's new keys into the cache, then every sequence's attention in one backend call
  // (the CUDA backend runs a decode step's sequences in one launch).
  segs_.resize(batch.size());
  calls_.resize(batch.size());
  writes_.clear();
  int64_t start = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const BatchSeq& s = batch[i];
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    const int64_t past = cache_.length(s.seq_id);
    writes_.push_back({s.seq_id, past, n, start});
    cache_.segments_into(layer, s.seq_id, 0, past + n, &segs_[i]);
    AttentionCall& c = calls_[i];
    c = AttentionCall{};
    c.out = out.slice_rows(start, n);
    c.lse = lse + start * nh;
    c.entropy = ent + start * nh;
    c.q = q.slice_rows(start, n);
    c.kv = segs_[i];
    c.n_heads = hp_.n_heads;
    c.n_kv_heads = hp_.n_kv_heads;
    c.head_dim = hp_.head_dim;
    c.scale = hp_.attention_scale();
    c.softcap = hp_.attn_softcap;
    c.mask = {true, past};  // new token i sees keys 0 .. past + i
    if (const int64_t w = hp_.window_of(layer); w > 0) {
      // Keys sit at positions 0, 1, ... in cache order, so distances are those of the indices.
      c.mask.window = w;
      c.mask.window_offset = past;
    }
    start += n;
  }
  cache_.write_batch(layer, writes_, k, v);
  backend_.partial_attentions(calls_);
  for (size_t i = 0; i < batch.size(); ++i) {
    const BatchSeq& s = batch[i];
    auto it = entropy_.find(s.seq_id);
    if (it == entropy_.end() || !it->second->enabled()) continue;
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    const int64_t past = calls_[i].mask.causal_offset;
    std::vector<int64_t> visible(n);
    const int64_t w = hp_.window_of(layer);
    for (int64_t j = 0; j < n; ++j) visible[j] = w > 0 ? std::min(past + j + 1, w) : past + j + 1;
    collector_.add(it->second, layer, calls_[i].entropy, n, std::move(visible));
  }
  return Status();
}

Status LocalAttention::shift_neighbours(int layer, std::span<const BatchSeq> batch, Tensor last, Tensor prev) {
  shift_rows_from_cache(backend_, cache_, layer, batch, last, prev);
  return Status();
}

Status LocalAttention::load_carry(int layer, std::span<const BatchSeq> batch, Tensor carry) {
  compressed_.load(cache_, layer, batch, carry);
  return Status();
}

Status LocalAttention::store_carry(int layer, std::span<const BatchSeq> batch, Tensor carry_out, Tensor carry,
                                   bool* replaced) {
  (void)carry;
  compressed_.store(cache_, layer, batch, carry_out);
  *replaced = false;
  return Status();
}

Status LocalAttention::attend_compressed(int layer, std::span<const BatchSeq> batch, const CompressedAttention& a) {
  const int64_t cf = compressed_.carry_floats();
  int64_t start = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const BatchSeq& s = batch[i];
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    const Tensor k = a.k.slice_rows(start, n), v = a.v.slice_rows(start, n);
    compressed_.append_boundaries(cache_, layer, s.seq_id, k, v, a.boundary.subspan(start, n), s.positions);
    const std::vector<int32_t>& pos = cache_.stored_positions(layer, s.seq_id);
    const std::vector<KvView> keys = cache_.segments(layer, s.seq_id, 0, static_cast<int64_t>(pos.size()));
    compressed_.attend_local(a.q.slice_rows(start, n), k, v,
                             Tensor::make(a.carry.f32() + static_cast<int64_t>(i) * cf, DType::kF32, {cf}),
                             s.positions, keys, pos, a.out.slice_rows(start, n));
    start += n;
  }
  return Status();
}

void LocalAttention::end_forward(std::span<const BatchSeq> batch) {
  collector_.flush();
  for (const BatchSeq& s : batch) {
    cache_.set_length(s.seq_id, cache_.length(s.seq_id) + static_cast<int64_t>(s.tokens.size()));
  }
}

}  // namespace starserve
