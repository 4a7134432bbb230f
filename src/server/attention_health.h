// Attention health of one request (docs/specs/entropy.md; "Entropy-Guided Attention for Private LLMs", arXiv
// 2501.03489): from the merged per-layer, per-head entropy map on rank 0, which heads are in entropic overload
// (attention close to uniform over the visible keys) and which have collapsed (attention on about one key).
// Plain functions on native types: the gRPC and HTTP front ends and the metrics use the same result.
#pragma once

#include <optional>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "star/attention_stats.h"

namespace starserve {

struct HealthThresholds {
  double overload_ratio = 0.9;  // overload: H > overload_ratio * head_max (head_max = mean ln of visible keys)
  double collapse_nats = 0.1;   // collapse: H < collapse_nats
};

// overload_ratio in (0, 1] (0 would flag every head with any entropy; above 1 nothing, as H <= head_max);
// collapse_nats finite and >= 0. INVALID_ARGUMENT naming `name` (the field or flag), the value and the range.
Status check_overload_ratio(double v, std::string_view name = "entropy_overload_ratio");
Status check_collapse_nats(double v, std::string_view name = "entropy_collapse_nats");

struct HeadRef {
  int layer = 0, head = 0;
  bool operator==(const HeadRef& o) const { return layer == o.layer && head == o.head; }
};

struct AttentionHealth {
  HealthThresholds thresholds;
  int n_layers = 0, n_heads = 0;
  int n_judged = 0;                 // heads with head_max > collapse_nats
  std::vector<HeadRef> overloaded;  // layer-major
  std::vector<HeadRef> collapsed;
  // (n_layers) mean over heads of H / mean over heads of head_max, in [0, 1] up to rounding; nullopt for a layer
  // whose rows saw at most one key (head_max 0).
  std::vector<std::optional<double>> layer_ratio;
  // With several ranks: the mean over layers and heads of the rank entropy (each head's float value, as the
  // response carries it) over ln n_ranks, in [0, 1]: how evenly the query's attention mass divides among the ranks'
  // shards (docs/accuracy.md relates it to Star Attention's accuracy). nullopt on one rank.
  std::optional<double> rank_ratio;

  double overload_fraction() const { return n_judged ? static_cast<double>(overloaded.size()) / n_judged : 0.0; }
  double collapse_fraction() const { return n_judged ? static_cast<double>(collapsed.size()) / n_judged : 0.0; }
};

// H and head_max of each head are first rounded to float, as the responses carry them, then compared in double
// with the thresholds: a client that recomputes the health from a response's map gets exactly this result.
// A head is judged only when head_max > collapse_nats: below that every distribution over its keys would count
// as collapsed, so its entropy says nothing about the model (one visible key: head_max = H = 0).
AttentionHealth attention_health(const EntropyStats& entropy, const HealthThresholds& thresholds);

}  // namespace starserve
