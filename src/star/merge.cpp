#include "star/merge.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/ref/attention_ref.h"

namespace starserve {

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
  // All-reduce: M = max LSE over ranks; then sums of e*O, e, e*H, e*(LSE - M) with e = exp(LSE - M).
  buf_.assign(lse, lse + n_rows);
  SS_RETURN_IF_ERROR(comm_.all_reduce_max(buf_.data(), n_rows));
  const std::vector<float> m(buf_.begin(), buf_.begin() + n_rows);
  const int64_t width = d + 3;
  buf_.assign(n_rows * width, 0.0f);
  for (int64_t r = 0; r < n_rows; ++r) {
    if (std::isinf(m[r]) || std::isinf(lse[r])) continue;  // this rank (or every rank) is empty here
    const float e = std::exp(lse[r] - m[r]);
    float* row = buf_.data() + r * width;
    for (int64_t c = 0; c < d; ++c) row[c] = e * out[r * d + c];
    row[d] = e;
    row[d + 1] = e * entropy[r];
    row[d + 2] = e * (lse[r] - m[r]);
  }
  SS_RETURN_IF_ERROR(comm_.all_reduce_sum(buf_.data(), buf_.size()));
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* row = buf_.data() + r * width;
    const float den = row[d];
    if (den == 0.0f) {
      std::fill(out + r * d, out + (r + 1) * d, 0.0f);
      lse[r] = -std::numeric_limits<float>::infinity();
      entropy[r] = 0.0f;
      continue;
    }
    const float inv = 1.0f / den;
    for (int64_t c = 0; c < d; ++c) out[r * d + c] = row[c] * inv;
    const float log_den = std::log(den);
    lse[r] = m[r] + log_den;
    entropy[r] = std::max(0.0f, row[d + 1] * inv - row[d + 2] * inv + log_den);
  }
  return Status();
}

Status RankMerger::merge_on(Backend& backend, float* out, float* lse, float* entropy, int64_t n_rows, int head_dim) {
  const int world = comm_.world_size();
  if (world == 1) return Status();
  if (backend.kind() == DeviceKind::kCpu) return merge(out, lse, entropy, n_rows, head_dim);
  const int64_t d = head_dim;
  if (comm_.has_device_collectives() && world <= kMaxDeviceMergeParts) {
    // Pack [O | LSE | H], all-gather, merge the world's partials on the device.
    const int64_t per_rank = n_rows * (d + 2);
    float* send = dev_send_.floats(backend, per_rank);
    float* recv = dev_recv_.floats(backend, per_rank * world);
    auto f32 = [](float* p, int64_t n) { return Tensor::make(p, DType::kF32, {n}); };
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
