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

// A small Llama shape with head_dim 64, the smallest the CUDA attention kernels take: 3 layers,
// hidden 256, 4 heads / 2 KV heads, FFN 512, vocab 512.
ModelHParams small_llama_hd64_hparams();

// Llama-3-8B's shape (hidden 4096, 32 heads / 8 KV heads of 128, FFN 14336, vocab 128256,
// RoPE theta 500000) with n_layers layers (32 in the real model). Context limit set to 512K.
ModelHParams llama3_8b_hparams(int n_layers = 32);
// SmolLM2-135M's shape (30 layers, hidden 576, 9 heads over 3 KV heads of 64, tied embeddings).
ModelHParams smollm2_135m_hparams(int n_layers = 30);

// The KV-shifting variant of a Llama shape (arch kvshift, model/arch_kvshift.cpp): the same blocks,
// and RandomWeightSource adds each layer's blk.N.attn_k_shift / attn_v_shift, (n_kv_heads, 2) fp32.
ModelHParams kvshift_hparams(ModelHParams llama);

}  // namespace starserve
