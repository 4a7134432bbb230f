// A WeightSource with deterministic pseudo-random weights for any hyper-parameters: fast tests of
// the distributed logic on tiny models, and speed work on large shapes (an 8B-shaped model
// without an 8B download). Values depend only on (seed, tensor name, element index).
#pragma once

#include <cstdint>
#include <memory>

#include "model/weight_source.h"

namespace starserve {

class RandomWeightSource final : public WeightSource {
 public:
  RandomWeightSource(const ModelHParams& hp, uint64_t seed);
  const ModelHParams& hparams() const override { return hp_; }
  bool has(const std::string& name) const override;
  Result<HostTensor> load(const std::string& name) const override;
  std::string describe() const override;

 private:
  ModelHParams hp_;
  uint64_t seed_;
};

// A small Llama-shaped configuration for tests: 2 layers, hidden 64, 4 heads, 2 KV heads, vocab 256.
ModelHParams tiny_llama_hparams();

}  // namespace starserve
