// Per-layer, per-head mean softmax entropy of a set of query rows (docs/specs/entropy.md: the health and
// Star-approximation signal). Accumulated by attention handlers, read by the API and evals.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace starserve {

struct EntropyStats {
  int n_layers = 0;
  int n_heads = 0;
  std::vector<double> sum;      // (n_layers, n_heads) sum of row entropies, nats
  std::vector<int64_t> count;   // (n_layers, n_heads) rows accumulated
  std::vector<double> max_sum;  // (n_layers, n_heads) sum of log(n_visible), the per-row maximum
  // Phase 2 across ranks (star/merge.h RankMerger::rank_entropy): the entropy of each row's attention mass over the
  // W ranks that merged it, summed like `sum`. Empty unless a merge over several ranks added to it.
  int n_ranks = 1;
  std::vector<double> rank_sum;    // (n_layers, n_heads)
  std::vector<int64_t> rank_count;  // (n_layers, n_heads)

  void reset(int layers, int heads) {
    n_layers = layers;
    n_heads = heads;
    sum.assign(static_cast<size_t>(layers) * heads, 0.0);
    count.assign(sum.size(), 0);
    max_sum.assign(sum.size(), 0.0);
    n_ranks = 1;
    rank_sum.clear();
    rank_count.clear();
  }
  bool enabled() const { return n_layers > 0; }
  // entropy: (n_rows, n_heads) for one layer; n_visible: keys each row saw.
  void add(int layer, const float* entropy, int64_t n_rows, const int64_t* n_visible) {
    for (int64_t r = 0; r < n_rows; ++r) {
      for (int h = 0; h < n_heads; ++h) {
        const size_t i = static_cast<size_t>(layer) * n_heads + h;
        sum[i] += entropy[r * n_heads + h];
        count[i] += 1;
        max_sum[i] += n_visible[r] > 0 ? std::log(static_cast<double>(n_visible[r])) : 0.0;
      }
    }
  }
  // rank_entropy: (n_rows, n_heads) for one layer, merged over `ranks` ranks (> 1).
  void add_rank_entropy(int layer, const float* rank_entropy, int64_t n_rows, int ranks) {
    if (rank_sum.empty()) {
      rank_sum.assign(sum.size(), 0.0);
      rank_count.assign(sum.size(), 0);
    }
    n_ranks = ranks;
    for (int64_t r = 0; r < n_rows; ++r) {
      for (int h = 0; h < n_heads; ++h) {
        const size_t i = static_cast<size_t>(layer) * n_heads + h;
        rank_sum[i] += rank_entropy[r * n_heads + h];
        rank_count[i] += 1;
      }
    }
  }
  bool has_rank_entropy() const { return !rank_sum.empty(); }
  double rank_mean(int layer, int head) const {
    return rank_sum.empty() ? 0.0 : cell_mean(rank_sum, rank_count, layer, head);
  }
  double rank_layer_mean(int layer) const {
    return over_heads([&](int h) { return rank_mean(layer, h); });
  }
  double mean(int layer, int head) const { return cell_mean(sum, count, layer, head); }
  double mean_max(int layer, int head) const { return cell_mean(max_sum, count, layer, head); }
  double layer_mean(int layer) const {
    return over_heads([&](int h) { return mean(layer, h); });
  }

 private:
  // (layer, head)'s sum over its rows' count (0 without rows).
  double cell_mean(const std::vector<double>& sums, const std::vector<int64_t>& counts, int layer, int head) const {
    const size_t i = static_cast<size_t>(layer) * n_heads + head;
    return counts[i] ? sums[i] / counts[i] : 0.0;
  }
  // The mean over heads of value(h).
  template <typename F>
  double over_heads(F value) const {
    double s = 0.0;
    for (int h = 0; h < n_heads; ++h) s += value(h);
    return n_heads ? s / n_heads : 0.0;
  }
};

}  // namespace starserve
