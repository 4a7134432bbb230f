#include "model/token_scores.h"

#include <algorithm>
#include <cmath>

#include "common/check.h"

namespace starserve {

int64_t score_slice_rows(int n_vocab) {
  const int64_t row_bytes = static_cast<int64_t>(std::max(n_vocab, 1)) * static_cast<int64_t>(sizeof(float));
  return std::max<int64_t>(1, static_cast<int64_t>(kScoreSliceBytes) / row_bytes);
}

void score_logits_row(std::span<const float> logits, int32_t target, int top_k, ScoredToken* out) {
  const int64_t n = static_cast<int64_t>(logits.size());
  SS_CHECK(target >= 0 && target < n, "scored target {} outside the vocabulary of {}", target, n);
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float x : logits) sum += std::exp(x - max_logit);
  const double log_z = static_cast<double>(max_logit) + std::log(sum);
  out->target = target;
  out->logprob = static_cast<float>(static_cast<double>(logits[target]) - log_z);
  out->top.clear();
  const size_t k = static_cast<size_t>(std::clamp<int64_t>(top_k, 0, n));
  if (k == 0) return;
  // Running top-k kept sorted (k is small): higher logit first, lower id first on ties.
  const auto before = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::vector<int32_t> best;
  best.reserve(k + 1);
  for (int32_t i = 0; i < static_cast<int32_t>(n); ++i) {
    if (best.size() == k && !before(i, best.back())) continue;
    best.insert(std::upper_bound(best.begin(), best.end(), i, before), i);
    if (best.size() > k) best.pop_back();
  }
  out->top.reserve(best.size());
  for (int32_t id : best) out->top.push_back({id, static_cast<float>(static_cast<double>(logits[id]) - log_z)});
}

}  // namespace starserve
