#include "star/entropy_collector.h"

#include <utility>

namespace starserve {

void EntropyCollector::begin(int64_t max_rows, int n_heads) {
  pending_.clear();
  used_rows_ = 0;
  n_heads_ = n_heads;
  const int64_t bytes = max_rows * n_heads * static_cast<int64_t>(sizeof(float));
  staged_ = bytes > 0 && bytes <= kMaxStagedBytes;
  if (staged_) staging_.ensure(backend_, static_cast<size_t>(bytes));
}

void EntropyCollector::add(EntropyStats* stats, int layer, const float* entropy, int64_t n_rows,
                           std::vector<int64_t> visible) {
  SS_CHECK(static_cast<int64_t>(visible.size()) == n_rows, "{} rows, {} visible counts", n_rows, visible.size());
  const int64_t n = n_rows * n_heads_;
  if (!staged_) {
    host_.resize(static_cast<size_t>(n));
    backend_.download_bytes(host_.data(), entropy, host_.size() * sizeof(float));
    stats->add(layer, host_.data(), n_rows, visible.data());
    return;
  }
  float* base = static_cast<float*>(staging_.ensure(backend_, 0));
  backend_.copy(Tensor::make(base + used_rows_ * n_heads_, DType::kF32, {n}),
                Tensor::make(const_cast<float*>(entropy), DType::kF32, {n}));
  pending_.push_back({stats, layer, used_rows_, n_rows, std::move(visible)});
  used_rows_ += n_rows;
}

void EntropyCollector::flush() {
  if (pending_.empty()) return;
  host_.resize(static_cast<size_t>(used_rows_ * n_heads_));
  backend_.download_bytes(host_.data(), staging_.ensure(backend_, 0), host_.size() * sizeof(float));
  for (const Pending& p : pending_) p.stats->add(p.layer, host_.data() + p.first_row * n_heads_, p.n_rows, p.visible.data());
  pending_.clear();
  used_rows_ = 0;
}

}  // namespace starserve
