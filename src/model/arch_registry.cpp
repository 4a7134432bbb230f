#include "model/arch_registry.h"

namespace starserve {

namespace {
// One entry per architecture file; a new architecture adds its factory here.
constexpr ArchEntry kArchitectures[] = {
    {"llama", build_llama, "Llama 2/3 and the families that share its blocks (Mistral, SmolLM): RMSNorm, GQA with RoPE, SwiGLU"},
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
