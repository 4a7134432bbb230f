// Hyper-parameters read from the weights file (GGUF metadata or config.json). They describe the
// model and never change; user settings (block size, sampling, ...) live in Config, not here.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/ref/rope_style.h"

namespace starserve {

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3, kLongRope };
  Type type = Type::kNone;
  float factor = 1.0f;            // linear and llama3: wavelength stretch
  float low_freq_factor = 1.0f;   // llama3 only
  float high_freq_factor = 4.0f;  // llama3 only
  int original_context = 8192;    // llama3 and longrope: tokens the model was pre-trained at
  // LongRoPE (Phi-3): per rotated pair, a divisor of the frequency, theta_i = theta^(-2i/d) / f_i,
  // one set for contexts up to original_context (short) and one beyond (long). From config.json;
  // empty from GGUF, whose rope_factors_{short,long}.weight tensors Rope::load reads.
  std::vector<float> short_factor, long_factor;
  // LongRoPE's attention factor: cos and sin are multiplied by it, so the rotated dimensions' q.k
  // by its square; sqrt(1 + ln(s) / ln(original_context)) for s = max_context / original_context.
  float attn_factor = 1.0f;
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

  // ---- features of families beyond Llama (model/arch_*.cpp); the defaults are Llama's.
  // Sliding-window attention: a layer with a window sees keys at positions p - window < j <= p.
  int sliding_window = 0;              // tokens; 0 = none
  std::vector<uint8_t> sliding_layers;  // per layer 1 = windowed; empty = every layer when sliding_window > 0
  float rope_theta_local = 0.0f;       // RoPE base of windowed layers (Gemma 3); 0 = rope_theta
  float attn_scale = 0.0f;             // score scale; 0 = 1/sqrt(head_dim) (Gemma: query_pre_attn_scalar^-1/2)
  float attn_softcap = 0.0f;           // attention logit soft-capping (Gemma 2); 0 = none
  float final_softcap = 0.0f;          // final logit soft-capping (Gemma 2); 0 = none
  float embed_scale = 1.0f;            // token embeddings are multiplied by it (Gemma: sqrt(hidden))
  // Added to every RMSNorm weight at load: Gemma's checkpoints store w of x * (1 + w); llama.cpp's
  // converter has already added the 1 in GGUF files (0 there).
  float norm_weight_offset = 0.0f;
  // KV-shifting attention (arXiv 2411.19574; arch kvshift): each token's raw k and v are mixed with
  // the previous token's before RoPE, by per-layer attn_{k,v}_shift weights (n_kv_heads, 2).
  bool kv_shift = false;

  // The window of layer `layer` (0 = full causal attention).
  int64_t window_of(int layer) const {
    if (sliding_window <= 0) return 0;
    if (sliding_layers.empty()) return sliding_window;
    return layer >= 0 && layer < static_cast<int>(sliding_layers.size()) && sliding_layers[layer] ? sliding_window : 0;
  }
  int64_t max_window() const {
    for (int l = 0; l < n_layers; ++l) {
      if (window_of(l) > 0) return sliding_window;
    }
    return 0;
  }
  // LongRoPE uses its long factors for a model whose context exceeds the pre-training one, for
  // every position (llama.cpp's rule for a context longer than the original; transformers picks
  // per forward by the sequence's length, which a KV cache cannot follow).
  bool rope_long_factors() const {
    return rope_scaling.type == RopeScaling::Type::kLongRope && max_context > rope_scaling.original_context;
  }
  // Score scale. LongRoPE's attention factor scales the rotated part of q and of k, so the scores
  // by its square when every dimension rotates (Rope::load refuses it with partial rotation).
  float attention_scale() const {
    const float base = attn_scale > 0.0f ? attn_scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
    const float m = rope_scaling.type == RopeScaling::Type::kLongRope ? rope_scaling.attn_factor : 1.0f;
    return base * m * m;
  }
};

}  // namespace starserve
