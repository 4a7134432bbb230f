// The architecture registry: every architecture is one src/model/arch_<name>.cpp that builds a
// Model from shared layer pieces (model/layers.h), plus one entry in the table in
// arch_registry.cpp. create_model (model/model.h) looks the entry up by ModelHParams::arch, which
// the weight sources set from the file (GGUF general.architecture, config.json model_type).
#pragma once

#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "backend/backend.h"
#include "common/status.h"
#include "model/model.h"
#include "model/weight_source.h"

namespace starserve {

using ArchFactory = Result<std::unique_ptr<Model>> (*)(const WeightSource& source, Backend& backend,
                                                       const ModelOptions& options);

struct ArchEntry {
  std::string_view name;         // ModelHParams::arch
  ArchFactory build;             // uploads the weights and returns the model
  std::string_view description;  // the families it covers, for errors and GetModelInfo
};

std::span<const ArchEntry> architectures();
const ArchEntry* find_architecture(std::string_view name);
// "llama, ..." for messages.
std::string architecture_names();

// Factories, one per arch_*.cpp.
Result<std::unique_ptr<Model>> build_llama(const WeightSource& source, Backend& backend, const ModelOptions& options);
Result<std::unique_ptr<Model>> build_qwen(const WeightSource& source, Backend& backend, const ModelOptions& options);
Result<std::unique_ptr<Model>> build_gemma(const WeightSource& source, Backend& backend, const ModelOptions& options);
Result<std::unique_ptr<Model>> build_phi3(const WeightSource& source, Backend& backend, const ModelOptions& options);
Result<std::unique_ptr<Model>> build_kvshift(const WeightSource& source, Backend& backend,
                                             const ModelOptions& options);
Result<std::unique_ptr<Model>> build_gpt2(const WeightSource& source, Backend& backend, const ModelOptions& options);
Result<std::unique_ptr<Model>> build_gpt2_lnfree(const WeightSource& source, Backend& backend,
                                                 const ModelOptions& options);
Result<std::unique_ptr<Model>> build_attamba(const WeightSource& source, Backend& backend,
                                             const ModelOptions& options);

}  // namespace starserve
