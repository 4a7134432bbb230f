#include "star/attamba_attention.h"

#include <algorithm>

namespace starserve {

std::vector<KvView> key_prefix(std::span<const KvView> keys, int64_t n) {
  std::vector<KvView> out;
  for (const KvView& kv : keys) {
    if (n <= 0) break;
    const int64_t take = std::min(n, kv.n_tokens());
    out.push_back({kv.k.slice_rows(0, take), kv.v.slice_rows(0, take)});
    n -= take;
  }
  return out;
}

CompressedAttender::CompressedAttender(Backend& backend, const ModelHParams& hp)
    : backend_(backend), hp_(hp), layout_(AttambaCarryLayout::of(hp.attamba, hp.hidden)) {}

void CompressedAttender::load(KvCache& cache, int layer, std::span<const BatchSeq> batch, Tensor carry) {
  const int64_t f = layout_.floats();
  SS_CHECK(carry.numel() == f * static_cast<int64_t>(batch.size()), "attamba carry of {} floats for {} sequences",
           carry.numel(), batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    backend_.copy(Tensor::make(carry.f32() + static_cast<int64_t>(i) * f, DType::kF32, {f}),
                  cache.carry(layer, batch[i].seq_id, f));
  }
}

void CompressedAttender::store(KvCache& cache, int layer, std::span<const BatchSeq> batch, Tensor carry) {
  const int64_t f = layout_.floats();
  for (size_t i = 0; i < batch.size(); ++i) {
    backend_.copy(cache.carry(layer, batch[i].seq_id, f),
                  Tensor::make(carry.f32() + static_cast<int64_t>(i) * f, DType::kF32, {f}));
  }
}

std::pair<int64_t, int64_t> CompressedAttender::append_boundaries(KvCache& cache, int layer, SeqId seq, Tensor k,
                                                                  Tensor v, std::span<const uint8_t> boundary,
                                                                  std::span<const int32_t> positions) {
  std::vector<int32_t>& stored = cache.stored_positions(layer, seq);
  const int64_t begin = static_cast<int64_t>(stored.size());
  for (size_t i = 0; i < boundary.size(); ++i) {
    if (!boundary[i]) continue;
    SS_CHECK(stored.empty() || stored.back() < positions[i], "attamba: boundary at {} after one at {}", positions[i],
             stored.back());
    const int64_t r = static_cast<int64_t>(i);
    cache.write(layer, seq, static_cast<int64_t>(stored.size()), k.slice_rows(r, 1), v.slice_rows(r, 1));
    stored.push_back(positions[i]);
  }
  return {begin, static_cast<int64_t>(stored.size())};
}

PartialBuffers CompressedAttender::buffers(int slot, int64_t n) {
  if (static_cast<int>(slots_.size()) < 3 * (slot + 1)) slots_.resize(static_cast<size_t>(3 * (slot + 1)));
  const int64_t rows = n * hp_.n_heads;
  return {slots_[3 * slot].floats(backend_, std::max<int64_t>(rows * hp_.head_dim, 1)),
          slots_[3 * slot + 1].floats(backend_, std::max<int64_t>(rows, 1)),
          slots_[3 * slot + 2].floats(backend_, std::max<int64_t>(rows, 1))};
}

AttentionCall CompressedAttender::call(Tensor q, std::span<const KvView> kv, AttentionMask mask,
                                       const PartialBuffers& p, int64_t row0) const {
  AttentionCall c;
  const int64_t rows = row0 * hp_.n_heads;
  c.out = Tensor::make(p.out + rows * hp_.head_dim, DType::kF32, {q.shape[0], hp_.n_heads, hp_.head_dim});
  c.lse = p.lse + rows;
  c.entropy = p.entropy + rows;
  c.q = q;
  c.kv = kv;
  c.n_heads = hp_.n_heads;
  c.n_kv_heads = hp_.n_kv_heads;
  c.head_dim = hp_.head_dim;
  c.scale = hp_.attention_scale();
  c.mask = mask;
  return c;
}

void CompressedAttender::band(Tensor q, Tensor k, Tensor v, Tensor carry_row, const PartialBuffers& p) {
  const int64_t n = q.shape[0], L = layout_.ring_rows, row = layout_.row;
  header_.resize(static_cast<size_t>(AttambaCarryLayout::kHeader));
  backend_.download_f32(header_.data(), Tensor::make(carry_row.f32(), DType::kF32, {AttambaCarryLayout::kHeader}));
  const int64_t n_ring = std::clamp<int64_t>(static_cast<int64_t>(header_[0]), 0, L);
  std::vector<KvView> keys;
  const DType dt = backend_.compute_dtype();
  if (n_ring > 0) {
    // The ring's valid rows (fp32 in the carry) in the compute dtype.
    const Tensor rk = ring_k_.view(backend_, dt, {n_ring, hp_.n_kv_heads, hp_.head_dim});
    const Tensor rv = ring_v_.view(backend_, dt, {n_ring, hp_.n_kv_heads, hp_.head_dim});
    backend_.convert(rk, Tensor::make(carry_row.f32() + layout_.ring_k_at() + (L - n_ring) * row, DType::kF32,
                                      {n_ring, hp_.n_kv_heads, hp_.head_dim}));
    backend_.convert(rv, Tensor::make(carry_row.f32() + layout_.ring_v_at() + (L - n_ring) * row, DType::kF32,
                                      {n_ring, hp_.n_kv_heads, hp_.head_dim}));
    keys.push_back({rk, rv});
  }
  keys.push_back({k, v});
  // Keys sit at consecutive positions, the first new token n_ring after the ring's first: query i
  // (logical i + n_ring) sees keys i + n_ring - L .. i + n_ring.
  AttentionMask mask{true, n_ring};
  mask.window = L + 1;
  mask.window_offset = n_ring;
  backend_.partial_attention(call(q, keys, mask, p, 0));
  (void)n;
}

std::vector<KvView> key_range(std::span<const KvView> keys, int64_t from, int64_t to) {
  std::vector<KvView> out;
  int64_t at = 0;  // logical index of the run's first key
  for (const KvView& kv : keys) {
    const int64_t n = kv.n_tokens();
    const int64_t lo = std::max(from, at), hi = std::min(to, at + n);
    if (lo < hi) out.push_back({kv.k.slice_rows(lo - at, hi - lo), kv.v.slice_rows(lo - at, hi - lo)});
    at += n;
    if (at >= to) break;
  }
  return out;
}

void CompressedAttender::compressed(Tensor q, std::span<const int32_t> qpos, std::span<const KvView> keys,
                                    std::span<const int32_t> key_pos, const PartialBuffers& p) {
  const int64_t n = q.shape[0], L = hp_.attamba.leading, nh = hp_.n_heads, hd = hp_.head_dim;
  SS_CHECK(static_cast<int64_t>(qpos.size()) == n, "attamba: {} query positions for {} rows", qpos.size(), n);
  int64_t n_keys = 0;
  for (const KvView& kv : keys) n_keys += kv.n_tokens();
  SS_CHECK(n_keys == static_cast<int64_t>(key_pos.size()), "attamba: {} stored keys with {} positions", n_keys,
           key_pos.size());
  // limit_[i]: how many stored keys row i sees (those at positions <= qpos[i] - L - 1); it grows
  // with i, by one key every P rows.
  limit_.resize(static_cast<size_t>(n));
  rel_limit_.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t last = int64_t{qpos[i]} - L - 1;
    limit_[i] = static_cast<int32_t>(std::upper_bound(key_pos.begin(), key_pos.end(), last) - key_pos.begin());
  }
  // Rows in blocks of 64 P: the keys every row of a block sees ([0, c0), c0 the block's first
  // limit) in one non-causal call that any kernel takes, the few the later rows add ([c0, c1), at
  // most about 64 per row) in a call with per-row key limits (AttentionMask::key_limit), then the
  // two merged. A block whose rows all see the same keys is one call.
  const int64_t block = 64 * std::max(1, hp_.attamba.chunk);
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t nb = std::min(block, n - i0);
    const int64_t c0 = limit_[i0], c1 = limit_[i0 + nb - 1];
    const Tensor qb = q.slice_rows(i0, nb);
    if (c0 == c1) {  // empty prefix included: O = 0, LSE = -inf, H = 0
      const std::vector<KvView> prefix = key_prefix(keys, c0);
      backend_.partial_attention(call(qb, prefix, AttentionMask{false, 0}, p, i0));
      continue;
    }
    for (int64_t i = 0; i < nb; ++i) rel_limit_[i0 + i] = limit_[i0 + i] - static_cast<int32_t>(c0);
    AttentionMask limited{false, 0};
    limited.key_limit = rel_limit_.data() + i0;
    const std::vector<KvView> tail = key_range(keys, c0, c1);
    if (c0 == 0) {
      backend_.partial_attention(call(qb, tail, limited, p, i0));
      continue;
    }
    const PartialBuffers a = buffers(2, nb), b = buffers(3, nb);
    const std::vector<KvView> prefix = key_prefix(keys, c0);
    backend_.partial_attention(call(qb, prefix, AttentionMask{false, 0}, a, 0));
    backend_.partial_attention(call(qb, tail, limited, b, 0));
    const AttentionPartial parts[2] = {a.part(), b.part()};
    backend_.merge_partials(p.out + i0 * nh * hd, p.lse + i0 * nh, p.entropy + i0 * nh, parts, nb * nh, hd);
  }
}

void CompressedAttender::merge(Tensor out, float* lse, float* entropy, std::span<const AttentionPartial> parts) {
  const int64_t rows = out.shape[0] * hp_.n_heads;
  if (lse == nullptr) lse = lse_.floats(backend_, std::max<int64_t>(rows, 1));
  if (entropy == nullptr) entropy = ent_.floats(backend_, std::max<int64_t>(rows, 1));
  Tensor o32 = out;
  if (out.dtype != DType::kF32) o32 = out32_.view(backend_, DType::kF32, {out.shape[0], hp_.n_heads, hp_.head_dim});
  backend_.merge_partials(o32.f32(), lse, entropy, parts, rows, hp_.head_dim);
  if (o32.data != out.data) backend_.convert(out, o32);
}

void CompressedAttender::attend_local(Tensor q, Tensor k, Tensor v, Tensor carry_row, std::span<const int32_t> qpos,
                                      std::span<const KvView> keys, std::span<const int32_t> key_pos, Tensor out) {
  const int64_t n = q.shape[0];
  const PartialBuffers b = buffers(0, n);
  const PartialBuffers c = buffers(1, n);
  band(q, k, v, carry_row, b);
  compressed(q, qpos, keys, key_pos, c);
  const AttentionPartial parts[2] = {b.part(), c.part()};
  merge(out, nullptr, nullptr, parts);
}

}  // namespace starserve
