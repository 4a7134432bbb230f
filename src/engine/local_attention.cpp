#include "engine/local_attention.h"

#include <cmath>

namespace starserve {

LocalAttention::LocalAttention(Backend& backend, KvCache& cache, const ModelHParams& hp)
    : backend_(backend), cache_(cache), hp_(hp) {}

Status LocalAttention::begin_forward(std::span<const BatchSeq> batch) {
  for (const BatchSeq& s : batch) {
    SS_RETURN_IF_ERROR(cache_.reserve(s.seq_id, cache_.length(s.seq_id) + static_cast<int64_t>(s.tokens.size())));
  }
  return Status();
}

Status LocalAttention::attend(int layer, std::span<const BatchSeq> batch, Tensor q, Tensor k, Tensor v, Tensor out) {
  const int64_t nh = hp_.n_heads, nkv = hp_.n_kv_heads, hd = hp_.head_dim;
  int64_t start = 0;
  for (const BatchSeq& s : batch) {
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    const int64_t past = cache_.length(s.seq_id);
    cache_.write(layer, s.seq_id, past, k.f32() + start * nkv * hd, v.f32() + start * nkv * hd, n);
    const std::vector<KvSegment> segs = cache_.segments(layer, s.seq_id, 0, past + n);
    lse_.resize(n * nh);
    ent_.resize(n * nh);
    PartialAttentionParams p;
    p.out = out.f32() + start * nh * hd;
    p.lse = lse_.data();
    p.entropy = ent_.data();
    p.q = q.f32() + start * nh * hd;
    p.kv = segs;
    p.n_q = n;
    p.n_heads = hp_.n_heads;
    p.n_kv_heads = hp_.n_kv_heads;
    p.head_dim = hp_.head_dim;
    p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
    p.mask = {true, past};  // new token i sees keys 0 .. past + i
    backend_.partial_attention(p);
    auto it = entropy_.find(s.seq_id);
    if (it != entropy_.end() && it->second->enabled()) {
      std::vector<int64_t> visible(n);
      for (int64_t i = 0; i < n; ++i) visible[i] = past + i + 1;
      it->second->add(layer, ent_.data(), n, visible.data());
    }
    start += n;
  }
  return Status();
}

void LocalAttention::end_forward(std::span<const BatchSeq> batch) {
  for (const BatchSeq& s : batch) {
    cache_.set_length(s.seq_id, cache_.length(s.seq_id) + static_cast<int64_t>(s.tokens.size()));
  }
}

}  // namespace starserve
