#include "kv/kv_cache.h"

#include <algorithm>

namespace starserve {

KvCache::KvCache(Backend& backend, const KvCacheShape& shape)
    : backend_(backend), shape_(shape), dtype_(backend.compute_dtype()) {
  SS_CHECK(shape.page_size > 0 && shape.n_pages >= 0, "page_size {} n_pages {}", shape.page_size, shape.n_pages);
  const size_t bytes = static_cast<size_t>(shape.n_pages) * shape.page_size * token_elems() * dtype_size(dtype_);
  for (int l = 0; l < shape.n_layers; ++l) {
    k_pool_.push_back(backend.alloc(bytes));
    v_pool_.push_back(backend.alloc(bytes));
  }
  // Hand out low page numbers first (stack order) so a small workload stays compact.
  for (int64_t p = shape.n_pages - 1; p >= 0; --p) free_pages_.push_back(p);
  page_refs_.assign(static_cast<size_t>(shape.n_pages), 0);
}

Status KvCache::reserve(SeqId seq, int64_t n_tokens) {
  SeqState& st = seqs_[seq];
  const int64_t need = pages_for(n_tokens) - static_cast<int64_t>(st.pages.size());
  if (need <= 0) return Status();
  if (need > pages_free()) {
    if (st.pages.empty() && st.length == 0) seqs_.erase(seq);
    return resource_exhausted("KV cache full: {} tokens need {} more pages of {} tokens, {} of {} pages free",
                              n_tokens, need, shape_.page_size, pages_free(), pages_total());
  }
  for (int64_t i = 0; i < need; ++i) {
    st.pages.push_back(free_pages_.back());
    page_refs_[static_cast<size_t>(free_pages_.back())] = 1;
    free_pages_.pop_back();
  }
  return Status();
}

Status KvCache::fork(SeqId src, SeqId dst) {
  SS_CHECK(src != dst && seqs_.count(dst) == 0, "fork: sequence {} exists", dst);
  auto it = seqs_.find(src);
  if (it == seqs_.end()) return not_found("fork: sequence {} holds no KV", src);
  const SeqState& from = it->second;
  const int64_t rows_used = shape_.rows_for(from.length);
  const int64_t whole = rows_used / shape_.page_size;
  const int64_t tail_rows = rows_used % shape_.page_size;
  if (tail_rows > 0 && free_pages_.empty()) {
    return resource_exhausted("KV cache full: forking sequence {} needs 1 page, none of {} is free", src,
                              pages_total());
  }
  SeqState to;
  to.length = from.length;
  for (int64_t i = 0; i < whole; ++i) {
    to.pages.push_back(from.pages[static_cast<size_t>(i)]);
    ++page_refs_[static_cast<size_t>(to.pages.back())];
  }
  if (tail_rows > 0) {
    const int64_t page = free_pages_.back();
    free_pages_.pop_back();
    page_refs_[static_cast<size_t>(page)] = 1;
    const int64_t src_page = from.pages[static_cast<size_t>(whole)];
    for (int l = 0; l < shape_.n_layers; ++l) {
      backend_.copy(rows(page_ptr(k_pool_[l], page), tail_rows), rows(page_ptr(k_pool_[l], src_page), tail_rows));
      backend_.copy(rows(page_ptr(v_pool_[l], page), tail_rows), rows(page_ptr(v_pool_[l], src_page), tail_rows));
    }
    to.pages.push_back(page);
  }
  seqs_.emplace(dst, std::move(to));
  if (auto sh = shift_.find(src); sh != shift_.end()) {
    const int64_t n = shape_.n_layers * 2 * token_elems();
    DeviceBuffer buf = backend_.alloc(static_cast<size_t>(n) * dtype_size(dtype_));
    backend_.copy(buf.view(dtype_, {n}), sh->second.view(dtype_, {n}));
    shift_.emplace(dst, std::move(buf));
  }
  if (auto c = compressed_.find(src); c != compressed_.end()) {
    Compressed copy;
    copy.floats = c->second.floats;
    copy.positions = c->second.positions;
    if (c->second.carry.data() != nullptr) {
      const int64_t n = shape_.n_layers * copy.floats;
      copy.carry = backend_.alloc(static_cast<size_t>(n) * sizeof(float));
      backend_.copy(copy.carry.view(DType::kF32, {n}), c->second.carry.view(DType::kF32, {n}));
    }
    compressed_.emplace(dst, std::move(copy));
  }
  return Status();
}

int64_t KvCache::shared_pages(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return 0;
  return std::count_if(it->second.pages.begin(), it->second.pages.end(),
                       [&](int64_t p) { return page_refs_[static_cast<size_t>(p)] > 1; });
}

int64_t KvCache::length(SeqId seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? 0 : it->second.length;
}

void KvCache::set_length(SeqId seq, int64_t n_tokens) {
  SeqState& st = seqs_.at(seq);
  SS_CHECK(shape_.rows_for(n_tokens) <= static_cast<int64_t>(st.pages.size()) * shape_.page_size,
           "length {} beyond {} pages", n_tokens, st.pages.size());
  st.length = n_tokens;
}

int64_t KvCache::bytes_per_token() const {
  return int64_t{2} * shape_.n_layers * token_elems() * static_cast<int64_t>(dtype_size(dtype_));
}

char* KvCache::page_ptr(const DeviceBuffer& pool, int64_t page) const {
  return static_cast<char*>(pool.data()) +
         page * shape_.page_size * token_elems() * static_cast<int64_t>(dtype_size(dtype_));
}

Tensor KvCache::rows(char* base, int64_t n) const {
  return Tensor::make(base, dtype_, {n, shape_.n_kv_heads, shape_.head_dim});
}

void KvCache::write(int layer, SeqId seq, int64_t start, Tensor k, Tensor v) {
  const SeqState& st = seqs_.at(seq);
  const int64_t n = k.shape[0];
  SS_CHECK(k.dtype == dtype_ && v.dtype == dtype_ && k.numel() == n * token_elems() && v.numel() == k.numel(),
           "KV write of {} rows with the wrong dtype or shape", n);
  SS_CHECK(start + n <= static_cast<int64_t>(st.pages.size()) * shape_.page_size, "write [{}, {}) beyond capacity",
           start, start + n);
  const int64_t row_bytes = token_elems() * static_cast<int64_t>(dtype_size(dtype_));
  char* const k_src = static_cast<char*>(k.data);
  char* const v_src = static_cast<char*>(v.data);
  int64_t done = 0;
  while (done < n) {
    const int64_t pos = start + done;
    const int64_t page = st.pages[pos / shape_.page_size];
    SS_CHECK(page_refs_[static_cast<size_t>(page)] == 1, "KV write of row {} into page {}, which {} sequences share",
             pos, page, page_refs_[static_cast<size_t>(page)]);
    const int64_t off = pos % shape_.page_size;
    const int64_t take = std::min<int64_t>(n - done, shape_.page_size - off);
    backend_.copy(rows(page_ptr(k_pool_[layer], page) + off * row_bytes, take), rows(k_src + done * row_bytes, take));
    backend_.copy(rows(page_ptr(v_pool_[layer], page) + off * row_bytes, take), rows(v_src + done * row_bytes, take));
    done += take;
  }
}

void KvCache::write_batch(int layer, std::span<const RowsWrite> writes, Tensor k, Tensor v) {
  const int64_t n_src = k.ndim >= 1 ? k.shape[0] : 0;
  SS_CHECK(k.dtype == dtype_ && v.dtype == dtype_ && k.numel() == n_src * token_elems() && v.numel() == k.numel(),
           "KV write of {} rows with the wrong dtype or shape", n_src);
  if (writes.empty()) return;
  // Long runs (a prefill) are a few page-sized copies each; a row table would only add to them.
  constexpr int64_t kScatterMaxRows = 4096;
  if (n_src > kScatterMaxRows) {
    for (const RowsWrite& w : writes)
      write(layer, w.seq, w.start, k.slice_rows(w.src_row, w.n), v.slice_rows(w.src_row, w.n));
    return;
  }
  const int64_t row_bytes = token_elems() * static_cast<int64_t>(dtype_size(dtype_));
  k_dst_.assign(static_cast<size_t>(n_src), nullptr);
  v_dst_.assign(static_cast<size_t>(n_src), nullptr);
  for (const RowsWrite& w : writes) {
    const SeqState& st = seqs_.at(w.seq);
    SS_CHECK(w.n >= 0 && w.src_row >= 0 && w.src_row + w.n <= n_src, "KV write of source rows [{}, {}) of {}",
             w.src_row, w.src_row + w.n, n_src);
    SS_CHECK(w.start >= 0 && w.start + w.n <= static_cast<int64_t>(st.pages.size()) * shape_.page_size,
             "write [{}, {}) beyond capacity", w.start, w.start + w.n);
    for (int64_t i = 0; i < w.n; ++i) {
      const int64_t pos = w.start + i;
      const int64_t page = st.pages[pos / shape_.page_size];
      SS_CHECK(page_refs_[static_cast<size_t>(page)] == 1,
               "KV write of row {} into page {}, which {} sequences share", pos, page,
               page_refs_[static_cast<size_t>(page)]);
      const int64_t at = (pos % shape_.page_size) * row_bytes;
      const size_t r = static_cast<size_t>(w.src_row + i);
      SS_CHECK(k_dst_[r] == nullptr, "KV write: source row {} named twice", r);
      k_dst_[r] = page_ptr(k_pool_[layer], page) + at;
      v_dst_[r] = page_ptr(v_pool_[layer], page) + at;
    }
  }
  backend_.scatter_rows(k_dst_, k);
  backend_.scatter_rows(v_dst_, v);
}

std::vector<KvView> KvCache::segments(int layer, SeqId seq, int64_t begin, int64_t end) const {
  std::vector<KvView> out;
  segments_into(layer, seq, begin, end, &out);
  return out;
}

void KvCache::segments_into(int layer, SeqId seq, int64_t begin, int64_t end, std::vector<KvView>* out) const {
  out->clear();
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  const SeqState& st = it->second;
  const int64_t row_bytes = token_elems() * static_cast<int64_t>(dtype_size(dtype_));
  for (int64_t pos = begin; pos < end;) {
    const int64_t page = st.pages[pos / shape_.page_size];
    const int64_t off = pos % shape_.page_size;
    const int64_t take = std::min<int64_t>(end - pos, shape_.page_size - off);
    out->push_back({rows(page_ptr(k_pool_[layer], page) + off * row_bytes, take),
                    rows(page_ptr(v_pool_[layer], page) + off * row_bytes, take)});
    pos += take;
  }
}

Tensor KvCache::shift_rows(int layer, SeqId seq) {
  SS_CHECK(layer >= 0 && layer < shape_.n_layers, "shift_rows: layer {} of {}", layer, shape_.n_layers);
  const int64_t per_layer = 2 * token_elems();
  auto it = shift_.find(seq);
  if (it == shift_.end()) {
    DeviceBuffer buf = backend_.alloc(static_cast<size_t>(shape_.n_layers * per_layer) * dtype_size(dtype_));
    const std::vector<float> zeros(static_cast<size_t>(shape_.n_layers * per_layer), 0.0f);
    backend_.upload_f32(buf.view(dtype_, {shape_.n_layers * per_layer}), zeros.data());
    it = shift_.emplace(seq, std::move(buf)).first;
  }
  char* base = static_cast<char*>(it->second.data()) + layer * per_layer * static_cast<int64_t>(dtype_size(dtype_));
  return Tensor::make(base, dtype_, {2, shape_.n_kv_heads, shape_.head_dim});
}

Tensor KvCache::carry(int layer, SeqId seq, int64_t floats) {
  SS_CHECK(layer >= 0 && layer < shape_.n_layers && floats > 0, "carry: layer {} of {}, {} floats", layer,
           shape_.n_layers, floats);
  Compressed& c = compressed_[seq];
  if (c.carry.data() == nullptr) {
    c.floats = floats;
    c.carry = backend_.alloc(static_cast<size_t>(shape_.n_layers * floats) * sizeof(float));
    const std::vector<float> zeros(static_cast<size_t>(shape_.n_layers * floats), 0.0f);
    backend_.upload_f32(c.carry.view(DType::kF32, {shape_.n_layers * floats}), zeros.data());
  }
  SS_CHECK(c.floats == floats, "carry of {} floats asked of one of {}", floats, c.floats);
  return Tensor::make(static_cast<float*>(c.carry.data()) + layer * floats, DType::kF32, {floats});
}

std::vector<int32_t>& KvCache::stored_positions(int layer, SeqId seq) {
  SS_CHECK(layer >= 0 && layer < shape_.n_layers, "stored_positions: layer {} of {}", layer, shape_.n_layers);
  Compressed& c = compressed_[seq];
  if (c.positions.empty()) c.positions.resize(static_cast<size_t>(shape_.n_layers));
  return c.positions[static_cast<size_t>(layer)];
}

void KvCache::free_sequence(SeqId seq) {
  shift_.erase(seq);
  compressed_.erase(seq);
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  for (int64_t p : it->second.pages) {
    if (--page_refs_[static_cast<size_t>(p)] == 0) free_pages_.push_back(p);
  }
  seqs_.erase(it);
}

}  // namespace starserve
