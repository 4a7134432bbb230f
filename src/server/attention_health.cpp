#include "server/attention_health.h"

#include <cmath>

namespace starserve {

Status check_overload_ratio(double v, std::string_view name) {
  if (!(v > 0.0 && v <= 1.0)) return invalid_argument("{} = {} must be in (0, 1]", name, v);
  return Status();
}

Status check_collapse_nats(double v, std::string_view name) {
  if (!(std::isfinite(v) && v >= 0.0)) return invalid_argument("{} = {} must be a finite number >= 0 (nats)", name, v);
  return Status();
}

AttentionHealth attention_health(const EntropyStats& entropy, const HealthThresholds& t) {
  AttentionHealth out;
  out.thresholds = t;
  out.n_layers = entropy.n_layers;
  out.n_heads = entropy.n_heads;
  out.layer_ratio.resize(static_cast<size_t>(entropy.n_layers));
  for (int l = 0; l < entropy.n_layers; ++l) {
    double sum_h = 0.0, sum_max = 0.0;
    for (int h = 0; h < entropy.n_heads; ++h) {
      const double hv = static_cast<float>(entropy.mean(l, h));
      const double max = static_cast<float>(entropy.mean_max(l, h));
      sum_h += hv;
      sum_max += max;
      if (!(max > t.collapse_nats)) continue;
      ++out.n_judged;
      if (hv > t.overload_ratio * max) out.overloaded.push_back({l, h});
      if (hv < t.collapse_nats) out.collapsed.push_back({l, h});
    }
    if (sum_max > 0.0) out.layer_ratio[static_cast<size_t>(l)] = sum_h / sum_max;
  }
  if (entropy.has_rank_entropy() && entropy.n_ranks > 1 && entropy.n_layers > 0 && entropy.n_heads > 0) {
    double sum = 0.0;
    for (int l = 0; l < entropy.n_layers; ++l) {
      for (int h = 0; h < entropy.n_heads; ++h) sum += static_cast<float>(entropy.rank_mean(l, h));
    }
    out.rank_ratio = sum / (static_cast<double>(entropy.n_layers) * entropy.n_heads) / std::log(entropy.n_ranks);
  }
  return out;
}

}  // namespace starserve
