// Phi-3: Llama's pre-norm blocks (arch_prenorm.h) with q|k|v in one matrix (attn_qkv: rows
// [q | k | v]) and gate|up in one (ffn_up: 2 ffn rows, gate first), partial rotary embeddings
// (rope_dim = partial_rotary_factor * head_dim, halves rotated) and an optional sliding window on
// every layer. LongRoPE ("longrope" / "su" scaling: per-pair frequency divisors and an attention
// factor) is in the RoPE table and the score scale (model/layers.cpp, ModelHParams), not here.
#include "model/arch_prenorm.h"
#include "model/arch_registry.h"

namespace starserve {

Result<std::unique_ptr<Model>> build_phi3(const WeightSource& source, Backend& backend, const ModelOptions& options) {
  if (!source.has("blk.0.attn_qkv.weight")) {
    return data_loss("phi3: layer 0 has no attn_qkv.weight (Phi-3 stores q, k and v in one matrix)");
  }
  if (source.has("blk.0.ffn_gate.weight")) {
    return data_loss("phi3: layer 0 has a separate ffn_gate.weight (Phi-3 stores gate and up in ffn_up)");
  }
  return build_prenorm(source, backend, options);
}

}  // namespace starserve
