#include "kernels/ref/ssm_ref.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace starserve {
namespace {

float silu(float v) { return v / (1.0f + std::exp(-v)); }

float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }

}  // namespace

void causal_conv1d_silu_ref(float* out, const float* in, int64_t in_stride, const float* weight, const float* bias,
                            float* tail, int64_t n_rows, int64_t conv_dim, int width, SsmRows rows) {
  const int64_t hist = width - 1;  // rows of tail per sequence
  for (int64_t t = 0; t < n_rows; ++t) {
    float* tl = tail + static_cast<int64_t>(rows.seq[t]) * hist * conv_dim;
    if (rows.reset[t]) std::fill(tl, tl + hist * conv_dim, 0.0f);
    const float* cur = in + t * in_stride;
    for (int64_t c = 0; c < conv_dim; ++c) {
      const float* w = weight + c * width;
      double acc = bias[c];  // double: the reference's sums should not depend on the tap order
      for (int64_t k = 0; k < hist; ++k) acc += static_cast<double>(w[k]) * tl[k * conv_dim + c];
      acc += static_cast<double>(w[hist]) * cur[c];
      out[t * conv_dim + c] = silu(static_cast<float>(acc));
    }
    // Slide the window: drop the oldest input, append the current one.
    if (hist > 0) {
      std::copy(tl + conv_dim, tl + hist * conv_dim, tl);
      std::copy(cur, cur + conv_dim, tl + (hist - 1) * conv_dim);
    }
  }
}

void ssd_scan_ref(float* y, const float* x, int64_t x_stride, const float* B, const float* C, int64_t bc_stride,
                  const float* dt_raw, int64_t dt_stride, const float* A_log, const float* D, const float* dt_bias,
                  float* state, int64_t n_rows, int H, int Pd, int G, int N, SsmRows rows) {
  const int heads_per_group = H / G;
  const int64_t seq_state = static_cast<int64_t>(H) * Pd * N;
  for (int64_t t = 0; t < n_rows; ++t) {
    float* st = state + static_cast<int64_t>(rows.seq[t]) * seq_state;
    if (rows.reset[t]) std::fill(st, st + seq_state, 0.0f);
    for (int h = 0; h < H; ++h) {
      const float dt = softplus(dt_raw[t * dt_stride + h] + dt_bias[h]);
      const float decay = std::exp(dt * -std::exp(A_log[h]));
      const int g = h / heads_per_group;
      const float* b = B + t * bc_stride + static_cast<int64_t>(g) * N;
      const float* c = C + t * bc_stride + static_cast<int64_t>(g) * N;
      for (int p = 0; p < Pd; ++p) {
        const float xv = x[t * x_stride + static_cast<int64_t>(h) * Pd + p];
        float* s = st + (static_cast<int64_t>(h) * Pd + p) * N;
        double acc = 0.0;
        for (int n = 0; n < N; ++n) {
          s[n] = decay * s[n] + dt * xv * b[n];
          acc += static_cast<double>(s[n]) * c[n];
        }
        y[t * H * Pd + static_cast<int64_t>(h) * Pd + p] = static_cast<float>(acc) + D[h] * xv;
      }
    }
  }
}

void gated_rms_norm_ref(float* out, const float* y, const float* z, int64_t z_stride, const float* weight,
                        int64_t n_rows, int64_t d, float eps) {
  std::vector<float> g(static_cast<size_t>(d));
  for (int64_t t = 0; t < n_rows; ++t) {
    double ss = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      g[i] = y[t * d + i] * silu(z[t * z_stride + i]);
      ss += static_cast<double>(g[i]) * g[i];
    }
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / d) + eps);
    for (int64_t i = 0; i < d; ++i) out[t * d + i] = g[i] * inv * weight[i];
  }
}

}  // namespace starserve
