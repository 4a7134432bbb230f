// Opens a model from a path: a GGUF file, or a Hugging Face directory (config.json,
// *.safetensors, tokenizer.json). Returns the weights and the tokenizer; the architecture is built
// from the weights by create_model (model.h).
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "model/tokenizer.h"
#include "model/weight_source.h"

namespace starserve {

struct ModelFiles {
  std::unique_ptr<WeightSource> weights;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string format;  // "gguf" or "hf"
};

Result<ModelFiles> open_model_files(const std::string& path);

}  // namespace starserve
