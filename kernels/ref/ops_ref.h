// CPU references for the element-wise and normalisation ops of a Llama-family block.
// Argument order follows the kernel launchers: outputs first, then inputs, then sizes.
#pragma once

#include <cstdint>

#include "kernels/ref/rope_style.h"

namespace starserve {

// out, in: (n_tokens, hidden); weight: (hidden). out = in / sqrt(mean(in^2) + eps) * weight. In-place allowed.
void rms_norm_ref(float* out, const float* in, const float* weight, int64_t n_tokens, int hidden, float eps);

// x: (n_tokens, n_heads, head_dim), rotated in place. positions: (n_tokens).
// inv_freq: (rope_dim / 2) angular frequency per pair, scaling already applied.
// Only the first rope_dim dimensions of each head rotate; pairing per RopeStyle.
void rope_ref(float* x, const int32_t* positions, const float* inv_freq, int64_t n_tokens, int n_heads,
              int head_dim, int rope_dim, RopeStyle style);

// out = silu(gate) * up, all (n) elements. out may alias gate.
void swiglu_ref(float* out, const float* gate, const float* up, int64_t n);

// One fused q|k|v projection's rows split into q, k, v, with RoPE on q and k (as rope_ref).
// qkv: (n_tokens, (n_heads + 2 n_kv_heads) * head_dim), each row [q heads | k heads | v heads];
// q: (n_tokens, n_heads, head_dim), k, v: (n_tokens, n_kv_heads, head_dim).
void split_qkv_rope_ref(float* q, float* k, float* v, const float* qkv, const int32_t* positions,
                        const float* inv_freq, int64_t n_tokens, int n_heads, int n_kv_heads, int head_dim,
                        int rope_dim, RopeStyle style);

// KV-shifting attention's mix (arXiv 2411.19574), before RoPE: for token t and KV head h,
//   k[t, h] = k_shift[h, 1] * k_raw[t, h] + k_shift[h, 0] * k_raw[t - 1, h]   (v likewise with v_shift)
// where the previous token's raw k/v is row t - 1 of the same input when prev_index[t] < 0, else
// row prev_index[t] of prev (a sequence's first token: the raw k/v of the token before it, zeros at
// its start). k_raw, v_raw: n_tokens rows of n_kv_heads * head_dim values, raw_stride values apart
// (n_kv_heads * head_dim for separate buffers, the whole q|k|v row for a fused projection);
// prev: (n_prev, 2, n_kv_heads, head_dim), rows [k, v]; k_shift, v_shift: (n_kv_heads, 2), column
// 0 weighing the previous token, column 1 the current one. k, v: (n_tokens, n_kv_heads, head_dim),
// not aliasing the inputs.
void kv_shift_ref(float* k, float* v, const float* k_raw, const float* v_raw, int64_t raw_stride, const float* prev,
                  const int32_t* prev_index, const float* k_shift, const float* v_shift, int64_t n_tokens,
                  int n_kv_heads, int head_dim);

// split_qkv_rope_ref with the KV-shifting mix between the split and RoPE: q as there, k and v
// mixed by kv_shift_ref from the q|k|v rows, then k rotated (RoPE applies to the mixed key).
void split_qkv_shift_rope_ref(float* q, float* k, float* v, const float* qkv, const float* prev,
                              const int32_t* prev_index, const float* k_shift, const float* v_shift,
                              const int32_t* positions, const float* inv_freq, int64_t n_tokens, int n_heads,
                              int n_kv_heads, int head_dim, int rope_dim, RopeStyle style);

// SwiGLU over one fused gate|up projection: out (n_tokens, ffn) = silu(gate_up[:, :ffn]) *
// gate_up[:, ffn:]; gate_up: (n_tokens, 2 ffn).
void swiglu_fused_ref(float* out, const float* gate_up, int64_t n_tokens, int64_t ffn);

// The residual add, then the next RMS norm: x += h, out = rms_norm(x) * weight.
// x, h, out: (n_tokens, hidden); weight: (hidden).
void add_rms_norm_ref(float* out, float* x, const float* h, const float* weight, int64_t n_tokens, int hidden,
                      float eps);

// out (n_tokens, n) = in (n_tokens, k) . weight (n, k)^T, sums in double.
void matmul_ref(float* out, const float* in, const float* weight, int64_t n_tokens, int64_t n, int64_t k);

// out = a + b over n elements. out may alias a.
void add_ref(float* out, const float* a, const float* b, int64_t n);

// x: (n_rows, n_cols) += bias (n_cols) on every row.
void add_bias_ref(float* x, const float* bias, int64_t n_rows, int64_t n_cols);

// out = gelu_tanh(gate) * up over n elements, with GELU's tanh approximation
// 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) (PyTorch's approximate="tanh"). out may alias gate.
void gelu_tanh_mul_ref(float* out, const float* gate, const float* up, int64_t n);

// out = gelu_tanh(in) over n elements, GELU's tanh approximation as in gelu_tanh_mul_ref (GPT-2's
// "gelu_new"). out may alias in.
void gelu_tanh_ref(float* out, const float* in, int64_t n);

// LayerNorm (GPT-2): out = (in - mean) / sqrt(var + eps) * weight + bias per row, with the row's
// mean and biased variance. out, in: (n_tokens, hidden); weight, bias: (hidden). In-place allowed.
void layer_norm_ref(float* out, const float* in, const float* weight, const float* bias, int64_t n_tokens, int hidden,
                    float eps);

// x = cap > 0 ? cap * tanh(x * scale / cap) : x * scale over n elements, in place.
void scale_softcap_ref(float* x, float scale, float cap, int64_t n);

// A softmax temperature per head and query position (the LayerNorm-free GPT-2's t[h, i],
// docs/specs/lnfree-gpt2.md): x[i, h, :] /= temperature[h, positions[i]], in place. Dividing a
// query row divides its logits q.k^T, so attention after this op sees the tempered scores.
// x: (n_tokens, n_heads, head_dim); temperature: (n_heads, n_positions); positions: (n_tokens),
// each in [0, n_positions).
void head_temperature_ref(float* x, const float* temperature, const int32_t* positions, int64_t n_tokens, int n_heads,
                          int head_dim, int64_t n_positions);

// out: (n_tokens, hidden) = table[ids[t]]; table: (n_vocab, hidden). ids must be in range.
void embedding_ref(float* out, const float* table, const int32_t* ids, int64_t n_tokens, int hidden);

}  // namespace starserve
