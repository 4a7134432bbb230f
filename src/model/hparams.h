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

// Attamba (arXiv 2411.17685; arch attamba, docs/specs/attamba.md "What starserve fixes"): attention
// over SSM-compressed chunks. chunk == 0 means the model is not Attamba.
struct AttambaHParams {
  int chunk = 0;              // P: tokens per chunk
  int leading = 0;            // L: tokens before the query kept at full resolution (the band t - L .. t)
  bool cyclic_offsets = true;  // off_l = min(P - 1, l * floor(P / n_layers)); false: every off_l = 0
  int d_inner = 0;            // SSM inner width (x and z)
  int d_state = 0;            // N
  int n_heads = 0;            // H: SSM heads, Pd = d_inner / H
  int n_groups = 1;           // G: B/C groups
  int conv_width = 4;         // W
  bool enabled() const { return chunk > 0; }
  int64_t head_dim() const { return n_heads > 0 ? d_inner / n_heads : 0; }
  int64_t conv_dim() const { return int64_t{d_inner} + 2 * int64_t{n_groups} * d_state; }
  int64_t in_proj_rows() const { return 2 * int64_t{d_inner} + 2 * int64_t{n_groups} * d_state + n_heads; }
  // Floats of one SSM's decode state: the conv tail (W - 1, conv_dim) and S (H, Pd, N).
  int64_t conv_tail_floats() const { return int64_t{conv_width - 1} * conv_dim(); }
  int64_t state_floats() const { return int64_t{d_inner} * d_state; }
  // Layer l's chunk offset.
  int offset(int layer, int n_layers) const {
    if (!cyclic_offsets || n_layers <= 0) return 0;
    const int64_t o = int64_t{layer} * (chunk / n_layers);
    return static_cast<int>(o < chunk - 1 ? o : chunk - 1);
  }
  // Whether position p starts a chunk of layer l (the SSM restarts from zero there).
  bool chunk_start(int layer, int n_layers, int64_t p) const { return (p + offset(layer, n_layers)) % chunk == 0; }
  // Whether position p is a boundary of layer l (its k/v are stored): a chunk's last position, and 0.
  bool boundary(int layer, int n_layers, int64_t p) const {
    return p == 0 || (p + offset(layer, n_layers)) % chunk == chunk - 1;
  }
  // Boundaries of layer l among positions [begin, end).
  int64_t boundaries(int layer, int n_layers, int64_t begin, int64_t end) const {
    if (end <= begin) return 0;
    const int64_t off = offset(layer, n_layers);
    // Positions p >= 0 with (p + off) % P == P - 1 below x (off < P): floor((x + off) / P).
    auto below = [&](int64_t x) { return x <= 0 ? int64_t{0} : (x + off) / chunk; };
    int64_t n = below(end) - below(begin);
    // Position 0 counts once even when it is also a chunk's last position (off = P - 1).
    if (begin == 0 && off != chunk - 1) ++n;
    return n;
  }
};

// The decode state ("carry") of one Attamba layer and sequence, fp32, as one row of floats:
//   [header (4): n_ring valid rows, 0, 0, 0]
//   [k_ssm conv tail (W-1, conv_dim)] [k_ssm state (H, Pd, N)] [v_ssm conv tail] [v_ssm state]
//   [ring k (L, hidden)] [ring v (L, hidden)]
// The ring holds the last L tokens' k (after RoPE) and v, right-aligned: its valid rows are
// [L - n_ring, L), oldest first. All zeros before a sequence's first token.
struct AttambaCarryLayout {
  int64_t conv = 0, state = 0, ring_rows = 0, row = 0;  // floats of a tail, a state, ring rows, one k/v row
  static AttambaCarryLayout of(const AttambaHParams& a, int hidden) {
    return {a.conv_tail_floats(), a.state_floats(), a.leading, hidden};
  }
  static constexpr int64_t kHeader = 4;
  int64_t tail_at(int ssm) const { return kHeader + ssm * (conv + state); }
  int64_t state_at(int ssm) const { return tail_at(ssm) + conv; }
  int64_t ring_k_at() const { return kHeader + 2 * (conv + state); }
  int64_t ring_v_at() const { return ring_k_at() + ring_rows * row; }
  int64_t floats() const { return ring_v_at() + ring_rows * row; }
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
  int max_context = 0;       // tokens the model was trained for (GPT-2: the rows of its position table)
  float rms_eps = 1e-5f;     // the norms' epsilon (RMSNorm, or LayerNorm where layer_norm)
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
  // GPT-2 (arch gpt2): learned absolute positions (position_embd.weight, max_context rows, added to
  // the token embeddings; no RoPE, rope_dim 0), so no position may reach max_context; and LayerNorm
  // with weight and bias in place of RMSNorm.
  bool learned_positions = false;
  bool layer_norm = false;
  // The LayerNorm-free GPT-2 (arch gpt2_lnfree, docs/specs/lnfree-gpt2.md) with a learned softmax
  // temperature per layer, head and query position (blk.N.attn_temperature, (n_heads, max_context)).
  bool attn_temperature = false;
  // Attamba (arch attamba): the K/V projections are chunk-local SSMs, the cache holds only chunk
  // boundaries' k/v and the decode state is a per-layer carry (AttambaCarryLayout).
  AttambaHParams attamba;

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
