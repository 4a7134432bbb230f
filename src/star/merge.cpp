#include "star/merge.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/ref/attention_ref.h"

namespace starserve {

MergeAlgo device_merge_algo(MergeAlgo algo, int64_t n_rows, int world_size) {
  if (algo != MergeAlgo::kAuto) return algo;
  // The device all-gather merges at most kMaxDeviceMergeParts ranks' partials in one launch.
  if (world_size > kMaxDeviceMergeParts) return MergeAlgo::kAllReduce;
  return n_rows * world_size <= kAutoAllGatherRows ? MergeAlgo::kAllGather : MergeAlgo::kAllReduce;
}

Status RankMerger::merge(float* out, float* lse, float* entropy, int64_t n_rows, int head_dim) {
  if (comm_.world_size() == 1) return Status();
  const int64_t d = head_dim;
  if (algo_ == MergeAlgo::kAllGather) {
    const int64_t per_rank = n_rows * (d + 2);
    buf_.resize(per_rank);
    std::copy(out, out + n_rows * d, buf_.begin());
    std::copy(lse, lse + n_rows, buf_.begin() + n_rows * d);
    std::copy(entropy, entropy + n_rows, buf_.begin() + n_rows * (d + 1));
    gathered_.resize(per_rank * comm_.world_size());
    SS_RETURN_IF_ERROR(comm_.all_gather(buf_.data(), gathered_.data(), per_rank * sizeof(float)));
    std::vector<AttentionPartial> parts;
    for (int r = 0; r < comm_.world_size(); ++r) {
      const float* base = gathered_.data() + r * per_rank;
      parts.push_back({base, base + n_rows * d, base + n_rows * (d + 1)});
    }
    merge_partials_ref(out, lse, entropy, parts, n_rows, head_dim);
    return Status();
  }
  // All-reduce: M = max LSE over ranks, then one sum of each rank's terms (attention_ref.h).
  max_lse_.assign(lse, lse + n_rows);
  SS_RETURN_IF_ERROR(comm_.all_reduce_max(max_lse_.data(), n_rows));
  buf_.resize(n_rows * merge_sum_width(head_dim));
  merge_sum_terms_ref(buf_.data(), out, lse, entropy, max_lse_.data(), n_rows, head_dim);
  SS_RETURN_IF_ERROR(comm_.all_reduce_sum(buf_.data(), buf_.size()));
  merge_sum_finish_ref(out, lse, entropy, buf_.data(), max_lse_.data(), n_rows, head_dim);
  return Status();
}

Status RankMerger::merge_on(Backend& backend, float* out, float* lse, float* entropy, int64_t n_rows, int head_dim) {
  const int world = comm_.world_size();
  if (world == 1) return Status();
  if (backend.kind() == DeviceKind::kCpu) return merge(out, lse, entropy, n_rows, head_dim);
  const int64_t d = head_dim;
  auto f32 = [](float* p, int64_t n) { return Tensor::make(p, DType::kF32, {n}); };
  const MergeAlgo algo = device_merge_algo(algo_, n_rows, world);
  if (comm_.has_device_collectives() && algo == MergeAlgo::kAllReduce) {
    // Two collectives on the stream: the max of LSE, then the sum of the rows of terms.
    const int64_t width = merge_sum_width(head_dim);
    float* max_lse = dev_max_.floats(backend, n_rows);
    float* terms = dev_send_.floats(backend, n_rows * width);
    backend.copy(f32(max_lse, n_rows), f32(lse, n_rows));
    SS_RETURN_IF_ERROR(comm_.all_reduce_max_device(max_lse, static_cast<size_t>(n_rows), backend.stream()));
    backend.merge_sum_terms(terms, out, lse, entropy, max_lse, n_rows, head_dim);
    SS_RETURN_IF_ERROR(comm_.all_reduce_sum_device(terms, static_cast<size_t>(n_rows * width), backend.stream()));
    backend.merge_sum_finish(out, lse, entropy, terms, max_lse, n_rows, head_dim);
    return Status();
  }
  if (comm_.has_device_collectives() && world <= kMaxDeviceMergeParts) {  // all-gather
    // Pack [O | LSE | H], all-gather, merge the world's partials on the device.
    const int64_t per_rank = n_rows * (d + 2);
    float* send = dev_send_.floats(backend, per_rank);
    float* recv = dev_recv_.floats(backend, per_rank * world);
    backend.copy(f32(send, n_rows * d), f32(out, n_rows * d));
    backend.copy(f32(send + n_rows * d, n_rows), f32(lse, n_rows));
    backend.copy(f32(send + n_rows * (d + 1), n_rows), f32(entropy, n_rows));
    SS_RETURN_IF_ERROR(comm_.all_gather_device(send, recv, per_rank * sizeof(float), backend.stream()));
    std::vector<AttentionPartial> parts;
    for (int r = 0; r < world; ++r) {
      const float* base = recv + r * per_rank;
      parts.push_back({base, base + n_rows * d, base + n_rows * (d + 1)});
    }
    backend.merge_partials(out, lse, entropy, parts, n_rows, head_dim);
    return Status();
  }
  host_out_.resize(n_rows * d);
  host_lse_.resize(n_rows);
  host_ent_.resize(n_rows);
  backend.download_bytes(host_out_.data(), out, host_out_.size() * sizeof(float));
  backend.download_bytes(host_lse_.data(), lse, host_lse_.size() * sizeof(float));
  backend.download_bytes(host_ent_.data(), entropy, host_ent_.size() * sizeof(float));
  SS_RETURN_IF_ERROR(merge(host_out_.data(), host_lse_.data(), host_ent_.data(), n_rows, head_dim));
  backend.upload_bytes(out, host_out_.data(), host_out_.size() * sizeof(float));
  backend.upload_bytes(lse, host_lse_.data(), host_lse_.size() * sizeof(float));
  backend.upload_bytes(entropy, host_ent_.data(), host_ent_.size() * sizeof(float));
  return Status();
}

}  // namespace starserve
