// Qwen2/2.5 and Qwen3: Llama's pre-norm blocks (arch_prenorm.h) with, for Qwen2, biases on the
// q, k and v projections (attn_{q,k,v}.bias, none on the output projection) and, for Qwen3, an
// RMSNorm over each head of q and k (attn_{q,k}_norm.weight, head_dim values) before RoPE and no
// biases. Qwen3's head_dim may differ from hidden / n_heads. RoPE rotates halves (the GGUF
// converter keeps Hugging Face's row order for these architectures).
#include "model/arch_prenorm.h"
#include "model/arch_registry.h"

namespace starserve {

Result<std::unique_ptr<Model>> build_qwen(const WeightSource& source, Backend& backend, const ModelOptions& options) {
  const ModelHParams& hp = source.hparams();
  if (hp.arch == "qwen2" && !source.has("blk.0.attn_q.bias")) {
    return data_loss("qwen2: layer 0 has no attn_q.bias (Qwen2 projects q, k and v with biases)");
  }
  if (hp.arch == "qwen3" && (!source.has("blk.0.attn_q_norm.weight") || !source.has("blk.0.attn_k_norm.weight"))) {
    return data_loss("qwen3: layer 0 lacks attn_q_norm / attn_k_norm (Qwen3 normalises q and k per head)");
  }
  return build_prenorm(source, backend, options);
}

}  // namespace starserve
