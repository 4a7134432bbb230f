// Per-layer softmax entropy of a forward pass, on its way to EntropyStats. On a GPU, downloading
// each layer's rows as the layer runs would stop the host once per layer; the collector instead
// copies them into a device staging buffer (stream-ordered, no wait) and, when the pass ends,
// downloads all layers at once and adds them: one synchronisation per forward. Passes whose rows
// would need more than kMaxStagedBytes of staging (long prefills, where one wait per layer is
// negligible next to the layer's work) download each layer at once as before.
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "star/attention_stats.h"

namespace starserve {

class EntropyCollector {
 public:
  static constexpr int64_t kMaxStagedBytes = int64_t{64} << 20;

  explicit EntropyCollector(Backend& backend) : backend_(backend) {}
  // Starts a pass that will add at most max_rows rows of n_heads floats (all layers together).
  void begin(int64_t max_rows, int n_heads);
  // entropy: (n_rows, n_heads) fp32 on the backend's device for `layer`; visible[r]: keys row r saw.
  void add(EntropyStats* stats, int layer, const float* entropy, int64_t n_rows, std::vector<int64_t> visible);
  // Adds everything staged in this pass to its stats (one download); call when the pass ends.
  void flush();
  // Rows staged and not yet flushed (0 when the pass downloads layer by layer).
  int64_t staged_rows() const { return used_rows_; }

 private:
  struct Pending {
    EntropyStats* stats = nullptr;
    int layer = 0;
    int64_t first_row = 0, n_rows = 0;
    std::vector<int64_t> visible;
  };
  Backend& backend_;
  int n_heads_ = 0;
  bool staged_ = false;
  int64_t used_rows_ = 0;
  Scratch staging_;
  std::vector<Pending> pending_;
  std::vector<float> host_;
};

}  // namespace starserve
