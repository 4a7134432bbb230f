// Hyper-parameters read from the weights file (GGUF metadata or config.json). They describe the
// model and never change; user settings (block size, sampling, ...) live in Config, not here.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/ref/rope_style.h"

namespace starserve {

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  float factor = 1.0f;            // linear and llama3: wavelength stretch
  float low_freq_factor = 1.0f;   // llama3 only
  float high_freq_factor = 4.0f;  // llama3 only
  int original_context = 8192;    // llama3 only: tokens the model was pre-trained at
};

struct ModelHParams {
  std::string arch = "llama";  // the registry entry that builds it (model/arch_registry.h)
  std::string arch_name;     // as written in the file ("llama", "mistral")
  std::string name;          // human-readable model name, for logs and GetModelInfo
  int n_layers = 0;
  int hidden = 0;            // residual stream width
  int n_heads = 0;           // query heads
  int n_kv_heads = 0;        // key/value heads (GQA when < n_heads)
  int head_dim = 0;          // usually hidden / n_heads
  int ffn_hidden = 0;        // SwiGLU inner width
  int n_vocab = 0;
  int max_context = 0;       // tokens the model was trained for
  float rms_eps = 1e-5f;
  float rope_theta = 10000.0f;
  int rope_dim = 0;          // dimensions of each head that RoPE rotates (== head_dim for Llama)
  RopeStyle rope_style = RopeStyle::kHalf;
  RopeScaling rope_scaling;
  bool tied_embeddings = false;  // output projection reuses token_embd
};

}  // namespace starserve
