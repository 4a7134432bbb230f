// Paged KV cache on a backend, in the backend's compute dtype (fp32 on the CPU, bf16 on a GPU).
// Memory is a fixed pool of pages per layer, each page holding page_size tokens of K and V:
// pool (n_pages, page_size, n_kv_heads, head_dim) per layer and per K/V. A sequence owns a list
// of pages; its keys are handed to attention as one KvView per page (the CUDA backend reads such a
// list through a page table when the page size is a power of two >= 64).
// Admission control works in pages, so a request that does not fit is refused (kResourceExhausted)
// instead of running the process out of memory. Plain bookkeeping: one owner thread, no locking.
// Pages are reference-counted: fork() makes a sequence that shares another's whole pages (context
// reuse: a cached context's KV under several requests) and owns a copy of its last, partly filled
// one. A sequence writes only rows at or past its length, which lie in pages it owns alone.
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"
#include "common/status.h"

namespace starserve {

using SeqId = int64_t;

struct KvCacheShape {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int page_size = 256;  // tokens per page
  int64_t n_pages = 0;  // pages in the pool (shared by all sequences)
  // Attamba (ModelHParams::attamba.chunk, P): a layer stores only its chunk boundaries' k/v, at most
  // ceil(n / P) + 1 rows for any n consecutive tokens (the +1: position 0 is a boundary too). 0 =
  // every token is stored.
  int compressed_chunk = 0;
  // Cache rows a sequence of n_tokens tokens needs in each layer.
  int64_t rows_for(int64_t n_tokens) const {
    if (compressed_chunk <= 0 || n_tokens <= 0) return n_tokens;
    return (n_tokens + compressed_chunk - 1) / compressed_chunk + 1;
  }
};

class KvCache {
 public:
  KvCache(Backend& backend, const KvCacheShape& shape);

  const KvCacheShape& shape() const { return shape_; }
  int64_t pages_total() const { return shape_.n_pages; }
  int64_t pages_free() const { return static_cast<int64_t>(free_pages_.size()); }
  // Pages of rows_for(n_tokens) rows.
  int64_t pages_for(int64_t n_tokens) const {
    return (shape_.rows_for(n_tokens) + shape_.page_size - 1) / shape_.page_size;
  }

  // Ensures the sequence (created on first use) can hold n_tokens tokens in total (rows_for of them
  // in each layer). Fails without side
  // effects when the pool has too few free pages.
  Status reserve(SeqId seq, int64_t n_tokens);
  bool has(SeqId seq) const { return seqs_.count(seq) != 0; }
  int64_t length(SeqId seq) const;
  void set_length(SeqId seq, int64_t n_tokens);  // within the reserved capacity
  // length(): tokens (not rows) of the sequence. Writes rows [start, start + n) of one layer; k, v: (n, n_kv_heads, head_dim) on the backend,
  // in its compute dtype, n = k.shape[0].
  void write(int layer, SeqId seq, int64_t start, Tensor k, Tensor v);
  // Several sequences' rows of one layer at once: each entry writes rows [start, start + n) of its
  // sequence from rows [src_row, src_row + n) of k and v (rows of k and v no entry names are not
  // stored). The same checks as write(); a decode step's rows go in two backend ops (scatter_rows)
  // instead of two copies per sequence.
  struct RowsWrite {
    SeqId seq = 0;
    int64_t start = 0, n = 0, src_row = 0;
  };
  void write_batch(int layer, std::span<const RowsWrite> writes, Tensor k, Tensor v);
  // Keys [begin, end) of one layer, one view per page touched.
  std::vector<KvView> segments(int layer, SeqId seq, int64_t begin, int64_t end) const;
  // The same into *out (cleared first; its capacity kept: a decode step asks for every sequence's
  // keys in every layer).
  void segments_into(int layer, SeqId seq, int64_t begin, int64_t end, std::vector<KvView>* out) const;
  // KV-shifting attention's decode state (arch kvshift): per layer the raw (pre-mix, pre-RoPE) k
  // and v of the sequence's last token so far, (2, n_kv_heads, head_dim) rows [k, v] in the compute
  // dtype. Zeros until the layer's first store (a sequence's first token has no predecessor).
  // Allocated on first use, on the device, apart from the pages; freed with the sequence.
  Tensor shift_rows(int layer, SeqId seq);
  // Attamba's decode state (arch attamba): per layer the carry (AttambaCarryLayout), `floats` fp32
  // values, zeros until written; and the positions of the rows the layer stores (its boundaries,
  // appended in position order: row i of the layer holds position stored_positions(layer, seq)[i]).
  // Allocated on first use apart from the pages; freed with the sequence.
  Tensor carry(int layer, SeqId seq, int64_t floats);
  std::vector<int32_t>& stored_positions(int layer, SeqId seq);
  // Bytes of K and V one token takes over all layers.
  int64_t bytes_per_token() const;
  // A new sequence `dst` equal to `src` as it stands (its length, its KV-shifting and Attamba
  // state): src's whole pages are shared (both hold a reference; a page returns to the pool with
  // its last one), the last page, when partly filled, is copied into a page of dst's own, so that
  // either may then append. Fails without side effects when no page is free for that copy.
  Status fork(SeqId src, SeqId dst);
  // Pages of this sequence that another sequence also holds.
  int64_t shared_pages(SeqId seq) const;
  void free_sequence(SeqId seq);

 private:
  struct SeqState {
    std::vector<int64_t> pages;
    int64_t length = 0;
  };
  char* page_ptr(const DeviceBuffer& pool, int64_t page) const;
  Tensor rows(char* base, int64_t n) const;
  int64_t token_elems() const { return static_cast<int64_t>(shape_.n_kv_heads) * shape_.head_dim; }

  Backend& backend_;
  KvCacheShape shape_;
  DType dtype_;
  std::vector<DeviceBuffer> k_pool_, v_pool_;  // per layer
  std::vector<int64_t> free_pages_;
  std::vector<int32_t> page_refs_;  // per page: sequences holding it (0 = free)
  std::unordered_map<SeqId, SeqState> seqs_;
  std::vector<void*> k_dst_, v_dst_;  // write_batch's row destinations
  std::unordered_map<SeqId, DeviceBuffer> shift_;  // shift_rows: (n_layers, 2, n_kv_heads, head_dim) per sequence
  struct Compressed {
    DeviceBuffer carry;                          // (n_layers, floats) fp32
    int64_t floats = 0;
    std::vector<std::vector<int32_t>> positions;  // per layer
  };
  std::unordered_map<SeqId, Compressed> compressed_;
};

}  // namespace starserve
