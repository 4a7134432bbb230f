#include "star/kv_shift_state.h"

#include <cstring>

namespace starserve {

void shift_rows_from_cache(Backend& backend, KvCache& cache, int layer, std::span<const BatchSeq> batch, Tensor last,
                           Tensor prev, bool keep) {
  SS_CHECK(last.shape[0] == static_cast<int64_t>(batch.size()) && prev.shape[0] == last.shape[0],
           "shift rows: {} last and {} prev rows for {} sequences", last.shape[0], prev.shape[0], batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    const Tensor state = cache.shift_rows(layer, batch[i].seq_id);
    backend.copy(prev.slice_rows(static_cast<int64_t>(i), 1), state);
    if (keep) backend.copy(state, last.slice_rows(static_cast<int64_t>(i), 1));
  }
}

Status ShiftHalo::exchange(Backend& backend, Communicator& comm, Tensor mine, int source, Tensor dst,
                           int64_t row_elems) {
  return exchange_bytes(backend, comm, mine, source, dst,
                        static_cast<size_t>(row_elems) * dtype_size(backend.compute_dtype()));
}

Status ShiftHalo::exchange_f32(Backend& backend, Communicator& comm, Tensor mine, int source, Tensor dst,
                               int64_t floats) {
  return exchange_bytes(backend, comm, mine, source, dst, static_cast<size_t>(floats) * sizeof(float));
}

Status ShiftHalo::exchange_bytes(Backend& backend, Communicator& comm, Tensor mine, int source, Tensor dst,
                                 size_t bytes) {
  send_.assign(bytes, 0);
  recv_.resize(bytes * static_cast<size_t>(comm.world_size()));
  if (mine.data != nullptr) {
    SS_CHECK(mine.bytes() == bytes, "halo row of {} bytes, expected {}", mine.bytes(), bytes);
    backend.download_bytes(send_.data(), mine.data, bytes);
  }
  SS_RETURN_IF_ERROR(comm.all_gather(send_.data(), recv_.data(), bytes));
  if (source >= 0) {
    SS_CHECK(source < comm.world_size() && dst.bytes() == bytes, "halo from rank {} of {} into {} bytes", source,
             comm.world_size(), dst.bytes());
    backend.upload_bytes(dst.data, recv_.data() + static_cast<size_t>(source) * bytes, bytes);
  }
  return Status();
}

}  // namespace starserve
