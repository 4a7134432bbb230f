#include "model/arch_registry.h"

namespace starserve {

namespace {
// One entry per architecture file; a new architecture adds its factory here.
constexpr ArchEntry kArchitectures[] = {
    {"llama", build_llama,
     "Llama 2/3 and the families that share its blocks (Mistral with its sliding window, SmolLM): RMSNorm, GQA with "
     "RoPE, SwiGLU"},
    {"qwen2", build_qwen, "Qwen2 / Qwen2.5: Llama blocks with q/k/v projection biases"},
    {"qwen3", build_qwen, "Qwen3: Llama blocks with per-head q/k RMSNorm before RoPE"},
    {"gemma2", build_gemma,
     "Gemma 2: (1 + w) sandwich RMSNorms, GeGLU, scaled embeddings, attention and final logit soft-capping, "
     "alternating sliding-window layers"},
    {"gemma3", build_gemma,
     "Gemma 3 (text): Gemma 2's blocks with q/k RMSNorm, 5 local : 1 global layers, separate local RoPE base"},
    {"phi3", build_phi3, "Phi-3: Llama blocks with fused qkv and gate|up projections, partial RoPE, sliding window"},
    {"gpt2", build_gpt2,
     "GPT-2: learned absolute positions, LayerNorm with bias, fused q|k|v with biases, GELU (tanh) MLP, tied "
     "output"},
    {"gpt2_lnfree", build_gpt2_lnfree,
     "LayerNorm-free GPT-2 (arXiv 2501.03489): GPT-2 without LayerNorm, the linear FFN fused into one matrix with "
     "residual scalars alpha / beta, optional softmax temperature per head and position"},
    {"kvshift", build_kvshift,
     "KV-shifting attention (arXiv 2411.19574): Llama blocks whose raw k and v are mixed with the previous "
     "token's before RoPE"},
    {"attamba", build_attamba,
     "Attamba (arXiv 2411.17685): K and V from chunk-local Mamba-2 SSMs, attention over the chunk boundaries' "
     "k/v and a band of the last tokens"},
};
}  // namespace

std::span<const ArchEntry> architectures() { return kArchitectures; }

const ArchEntry* find_architecture(std::string_view name) {
  for (const ArchEntry& e : kArchitectures) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

std::string architecture_names() {
  std::string s;
  for (const ArchEntry& e : kArchitectures) s += (s.empty() ? "" : ", ") + std::string(e.name);
  return s;
}

Result<std::unique_ptr<Model>> create_model(const WeightSource& source, Backend& backend, const ModelOptions& options) {
  const ModelHParams& hp = source.hparams();
  const ArchEntry* e = find_architecture(hp.arch);
  if (e == nullptr) {
    return unimplemented("architecture '{}' ({}) is not supported (registered: {})", hp.arch, hp.arch_name,
                         architecture_names());
  }
  return e->build(source, backend, options);
}

}  // namespace starserve
