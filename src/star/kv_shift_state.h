// KV-shifting attention's neighbour rows for the attention handlers (AttentionHandler::
// shift_neighbours): the token before a sequence's first new one is, on one process, the
// sequence's last token so far, whose raw k/v the KV cache keeps (KvCache::shift_rows); under
// Star Attention it may be the last token of a block another rank encodes, which arrives as a
// one-token halo per layer (docs/specs/kv-shifting.md).
#pragma once

#include <span>
#include <vector>

#include "comm/communicator.h"
#include "kv/kv_cache.h"
#include "model/model.h"

namespace starserve {

// For every sequence i of the batch: prev row i = the cache's shift rows of the sequence (zeros at
// its start), then, when keep, the cache's rows = last row i. last, prev: (n_seqs, 2, n_kv_heads,
// head_dim) in the compute dtype.
void shift_rows_from_cache(Backend& backend, KvCache& cache, int layer, std::span<const BatchSeq> batch, Tensor last,
                           Tensor prev, bool keep = true);

// One layer's halo across ranks: every rank contributes mine ((2, n_kv_heads, head_dim) rows
// [k, v], or an empty tensor for a rank that has none: zeros), and dst receives rank source's
// (source < 0: nothing is written). Collective over comm (host memory: a few KiB per layer).
// The same exchange carries an Attamba layer's carry (fp32, AttambaCarryLayout::floats() per rank):
// exchange_f32.
class ShiftHalo {
 public:
  Status exchange(Backend& backend, Communicator& comm, Tensor mine, int source, Tensor dst, int64_t row_elems);
  Status exchange_f32(Backend& backend, Communicator& comm, Tensor mine, int source, Tensor dst, int64_t floats);

 private:
  Status exchange_bytes(Backend& backend, Communicator& comm, Tensor mine, int source, Tensor dst, size_t bytes);
  std::vector<char> send_, recv_;
};

}  // namespace starserve
