#include "star/merge.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/ref/attention_ref.h"

namespace starserve {

namespace {
// -sum_r w_r ln w_r from the summed terms of one row: den = sum_r e_r, shift = sum_r e_r (LSE_r - M), with
// e_r = exp(LSE_r - M). Since w_r = e_r / den and ln w_r = (LSE_r - M) - ln den, the entropy is
// ln den - shift / den. Rounding can push a single rank's value a hair below 0.
float rank_entropy_from_sums(float den, float shift) {
  if (!(den > 0.0f)) return 0.0f;
  return std::max(0.0f, std::log(den) - shift / den);
}

// The same from every rank's LSE of one row (lse[r * stride]); -inf is an empty shard.
float rank_entropy_from_lses(const float* lse, int64_t stride, int world) {
  float m = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < world; ++r) m = std::max(m, lse[r * stride]);
  if (std::isinf(m)) return 0.0f;
  float den = 0.0f, shift = 0.0f;
  for (int r = 0; r < world; ++r) {
    const float l = lse[r * stride];
    if (std::isinf(l)) continue;
    const float e = std::exp(l - m);
    den += e;
    shift += e * (l - m);
  }
  return rank_entropy_from_sums(den, shift);
}
}  // namespace

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
    keep(Kept::kHostGather, n_rows, head_dim, nullptr);
    return Status();
  }
  // All-reduce: M = max LSE over ranks, then one sum of each rank's terms (attention_ref.h).
  max_lse_.assign(lse, lse + n_rows);
  SS_RETURN_IF_ERROR(comm_.all_reduce_max(max_lse_.data(), n_rows));
  buf_.resize(n_rows * merge_sum_width(head_dim));
  merge_sum_terms_ref(buf_.data(), out, lse, entropy, max_lse_.data(), n_rows, head_dim);
  SS_RETURN_IF_ERROR(comm_.all_reduce_sum(buf_.data(), buf_.size()));
  merge_sum_finish_ref(out, lse, entropy, buf_.data(), max_lse_.data(), n_rows, head_dim);
  keep(Kept::kHostSum, n_rows, head_dim, nullptr);
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
    keep(Kept::kDeviceSum, n_rows, head_dim, terms);
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
    keep(Kept::kDeviceGather, n_rows, head_dim, recv);
    return Status();
  }
  host_out_.resize(n_rows * d);  // through host memory: merge() keeps what rank_entropy reads
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

void RankMerger::keep(Kept kept, int64_t n_rows, int head_dim, const float* device) {
  kept_ = kept;
  kept_rows_ = n_rows;
  kept_dim_ = head_dim;
  kept_device_ = device;
}

void RankMerger::rank_entropy(Backend& backend, int64_t first_row, int64_t n, float* out) {
  const int world = comm_.world_size();
  if (world == 1 || kept_ == Kept::kNone) {
    std::fill(out, out + n, 0.0f);
    return;
  }
  SS_CHECK(first_row >= 0 && first_row + n <= kept_rows_, "rows [{}, {}) of a merge of {}", first_row, first_row + n,
           kept_rows_);
  const int64_t d = kept_dim_;
  const int64_t width = merge_sum_width(kept_dim_);
  const int64_t per_rank = kept_rows_ * (d + 2);
  switch (kept_) {
    case Kept::kHostSum:
      for (int64_t i = 0; i < n; ++i) {
        const float* row = buf_.data() + (first_row + i) * width;
        out[i] = rank_entropy_from_sums(row[d], row[d + 2]);
      }
      return;
    case Kept::kHostGather:
      for (int64_t i = 0; i < n; ++i) {
        out[i] = rank_entropy_from_lses(gathered_.data() + kept_rows_ * d + first_row + i, per_rank, world);
      }
      return;
    case Kept::kDeviceSum:
      rank_host_.resize(static_cast<size_t>(n * width));
      backend.download_bytes(rank_host_.data(), kept_device_ + first_row * width, rank_host_.size() * sizeof(float));
      for (int64_t i = 0; i < n; ++i) {
        const float* row = rank_host_.data() + i * width;
        out[i] = rank_entropy_from_sums(row[d], row[d + 2]);
      }
      return;
    case Kept::kDeviceGather:
      // Each rank's LSE block of the gathered [O | LSE | H]: the rows wanted from each.
      rank_host_.resize(static_cast<size_t>(n * world));
      for (int r = 0; r < world; ++r) {
        backend.download_bytes(rank_host_.data() + r * n, kept_device_ + r * per_rank + kept_rows_ * d + first_row,
                               static_cast<size_t>(n) * sizeof(float));
      }
      for (int64_t i = 0; i < n; ++i) out[i] = rank_entropy_from_lses(rank_host_.data() + i, n, world);
      return;
    case Kept::kNone:
      return;
  }
}

}  // namespace starserve
