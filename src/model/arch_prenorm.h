// A pre-norm decoder shared by the families whose blocks are Llama's with extras on the attention
// side: RMSNorm -> attention (optional q/k/v biases, optional per-head q/k RMSNorm before RoPE,
// q|k|v stored apart or fused) -> residual, RMSNorm -> SwiGLU (gate|up apart or fused) -> residual;
// final RMSNorm and the output projection. Qwen2/2.5 and Qwen3 (arch_qwen.cpp) and Phi-3
// (arch_phi3.cpp) are this model with their own weight files; sliding windows live in the
// attention handlers (ModelHParams::window_of). It runs every op unfused (the fused decode path of
// arch_llama.cpp has no place for biases or q/k norms).
#pragma once

#include <memory>
#include <vector>

#include "model/layers.h"

namespace starserve {

class PreNormDecoder final : public DecoderModel {
 public:
  using DecoderModel::DecoderModel;
  // Uploads token_embd, the output head and every layer's attn_norm, attention (with the extras
  // the file holds), ffn_norm and SwiGLU weights.
  Status load();
  // The backend features these weights need (biases, the window).
  BackendFeatures features() const;

 private:
  Status layers(std::span<const BatchSeq> batch, AttentionHandler& attn, const FlatBatch& flat, int first, int last,
                Tensor x, LayerBuffers& b) override;

  Rope rope_;
  std::vector<DecoderLayerWeights> layers_;
};

// Checks the backend, loads the weights and returns the model (the factories of arch_qwen.cpp and
// arch_phi3.cpp).
Result<std::unique_ptr<Model>> build_prenorm(const WeightSource& source, Backend& backend,
                                             const ModelOptions& options);

}  // namespace starserve
