#include "kernels/ref/ops_ref.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <cstring>

namespace starserve {

void rms_norm_ref(float* out, const float* in, const float* weight, int64_t n_tokens, int hidden, float eps) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* x = in + t * hidden;
    float* y = out + t * hidden;
    double ss = 0.0;  // double: hidden can be 8K+ and fp32 sums drift; cheap next to the GEMMs
    for (int c = 0; c < hidden; ++c) ss += static_cast<double>(x[c]) * x[c];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / hidden) + eps);
    for (int c = 0; c < hidden; ++c) y[c] = x[c] * inv * weight[c];
  }
}

void rope_ref(float* x, const int32_t* positions, const float* inv_freq, int64_t n_tokens, int n_heads,
              int head_dim, int rope_dim, RopeStyle style) {
  const int half = rope_dim / 2;
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float pos = static_cast<float>(positions[t]);
    for (int i = 0; i < half; ++i) {
      // Angle in fp32 like the references (HF computes position * inv_freq in fp32).
      const float angle = pos * inv_freq[i];
      const float c = std::cos(angle), s = std::sin(angle);
      for (int h = 0; h < n_heads; ++h) {
        float* v = x + (t * n_heads + h) * head_dim;
        const int a = style == RopeStyle::kInterleaved ? 2 * i : i;
        const int b = style == RopeStyle::kInterleaved ? 2 * i + 1 : i + half;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
      }
    }
  }
}

void swiglu_ref(float* out, const float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void split_qkv_rope_ref(float* q, float* k, float* v, const float* qkv, const int32_t* positions,
                        const float* inv_freq, int64_t n_tokens, int n_heads, int n_kv_heads, int head_dim,
                        int rope_dim, RopeStyle style) {
  const int64_t qd = static_cast<int64_t>(n_heads) * head_dim, kvd = static_cast<int64_t>(n_kv_heads) * head_dim;
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* row = qkv + t * (qd + 2 * kvd);
    std::copy(row, row + qd, q + t * qd);
    std::copy(row + qd, row + qd + kvd, k + t * kvd);
    std::copy(row + qd + kvd, row + qd + 2 * kvd, v + t * kvd);
  }
  rope_ref(q, positions, inv_freq, n_tokens, n_heads, head_dim, rope_dim, style);
  rope_ref(k, positions, inv_freq, n_tokens, n_kv_heads, head_dim, rope_dim, style);
}

void kv_shift_ref(float* k, float* v, const float* k_raw, const float* v_raw, int64_t raw_stride, const float* prev,
                  const int32_t* prev_index, const float* k_shift, const float* v_shift, int64_t n_tokens,
                  int n_kv_heads, int head_dim) {
  const int64_t kvd = static_cast<int64_t>(n_kv_heads) * head_dim;
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* kc = k_raw + t * raw_stride;
    const float* vc = v_raw + t * raw_stride;
    const float* kp = prev_index[t] < 0 ? kc - raw_stride : prev + static_cast<int64_t>(prev_index[t]) * 2 * kvd;
    const float* vp = prev_index[t] < 0 ? vc - raw_stride : prev + static_cast<int64_t>(prev_index[t]) * 2 * kvd + kvd;
    for (int h = 0; h < n_kv_heads; ++h) {
      for (int d = 0; d < head_dim; ++d) {
        const int64_t i = static_cast<int64_t>(h) * head_dim + d;
        k[t * kvd + i] = k_shift[2 * h + 1] * kc[i] + k_shift[2 * h] * kp[i];
        v[t * kvd + i] = v_shift[2 * h + 1] * vc[i] + v_shift[2 * h] * vp[i];
      }
    }
  }
}

void split_qkv_shift_rope_ref(float* q, float* k, float* v, const float* qkv, const float* prev,
                              const int32_t* prev_index, const float* k_shift, const float* v_shift,
                              const int32_t* positions, const float* inv_freq, int64_t n_tokens, int n_heads,
                              int n_kv_heads, int head_dim, int rope_dim, RopeStyle style) {
  const int64_t qd = static_cast<int64_t>(n_heads) * head_dim, kvd = static_cast<int64_t>(n_kv_heads) * head_dim;
  const int64_t row = qd + 2 * kvd;
  for (int64_t t = 0; t < n_tokens; ++t) std::copy(qkv + t * row, qkv + t * row + qd, q + t * qd);
  kv_shift_ref(k, v, qkv + qd, qkv + qd + kvd, row, prev, prev_index, k_shift, v_shift, n_tokens, n_kv_heads,
               head_dim);
  rope_ref(q, positions, inv_freq, n_tokens, n_heads, head_dim, rope_dim, style);
  rope_ref(k, positions, inv_freq, n_tokens, n_kv_heads, head_dim, rope_dim, style);
}

void swiglu_fused_ref(float* out, const float* gate_up, int64_t n_tokens, int64_t ffn) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* row = gate_up + t * 2 * ffn;
    swiglu_ref(out + t * ffn, row, row + ffn, ffn);
  }
}

void add_rms_norm_ref(float* out, float* x, const float* h, const float* weight, int64_t n_tokens, int hidden,
                      float eps) {
  add_ref(x, x, h, n_tokens * hidden);
  rms_norm_ref(out, x, weight, n_tokens, hidden, eps);
}

void matmul_ref(float* out, const float* in, const float* weight, int64_t n_tokens, int64_t n, int64_t k) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int64_t i = 0; i < k; ++i) acc += static_cast<double>(in[t * k + i]) * weight[j * k + i];
      out[t * n + j] = static_cast<float>(acc);
    }
  }
}

void add_ref(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void add_bias_ref(float* x, const float* bias, int64_t n_rows, int64_t n_cols) {
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t c = 0; c < n_cols; ++c) x[r * n_cols + c] += bias[c];
  }
}

void gelu_tanh_mul_ref(float* out, const float* gate, const float* up, int64_t n) {
  const float k = std::sqrt(2.0f / std::numbers::pi_v<float>);
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = 0.5f * g * (1.0f + std::tanh(k * (g + 0.044715f * g * g * g))) * up[i];
  }
}

void gelu_tanh_ref(float* out, const float* in, int64_t n) {
  const float k = std::sqrt(2.0f / std::numbers::pi_v<float>);
  for (int64_t i = 0; i < n; ++i) {
    const float g = in[i];
    out[i] = 0.5f * g * (1.0f + std::tanh(k * (g + 0.044715f * g * g * g)));
  }
}

void layer_norm_ref(float* out, const float* in, const float* weight, const float* bias, int64_t n_tokens, int hidden,
                    float eps) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* x = in + t * hidden;
    float* y = out + t * hidden;
    // Two passes in double: the mean first, then the squares about it (no cancellation of
    // E[x^2] - mean^2 when |mean| is large against the spread).
    double sum = 0.0;
    for (int c = 0; c < hidden; ++c) sum += x[c];
    const double mean = sum / hidden;
    double ss = 0.0;
    for (int c = 0; c < hidden; ++c) ss += (x[c] - mean) * (x[c] - mean);
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / hidden + static_cast<double>(eps)));
    const float m = static_cast<float>(mean);
    for (int c = 0; c < hidden; ++c) y[c] = (x[c] - m) * inv * weight[c] + bias[c];
  }
}

void scale_softcap_ref(float* x, float scale, float cap, int64_t n) {
  if (cap > 0.0f) {
    for (int64_t i = 0; i < n; ++i) x[i] = cap * std::tanh(x[i] * scale / cap);
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] *= scale;
  }
}

void head_temperature_ref(float* x, const float* temperature, const int32_t* positions, int64_t n_tokens, int n_heads,
                          int head_dim, int64_t n_positions) {
  for (int64_t i = 0; i < n_tokens; ++i) {
    for (int h = 0; h < n_heads; ++h) {
      const float t = temperature[h * n_positions + positions[i]];
      float* row = x + (i * n_heads + h) * head_dim;
      for (int d = 0; d < head_dim; ++d) row[d] /= t;
    }
  }
}

void embedding_ref(float* out, const float* table, const int32_t* ids, int64_t n_tokens, int hidden) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    std::memcpy(out + t * hidden, table + static_cast<int64_t>(ids[t]) * hidden, sizeof(float) * hidden);
  }
}

}  // namespace starserve
