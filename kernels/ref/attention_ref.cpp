#include "kernels/ref/attention_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/check.h"

namespace starserve {

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
}

void partial_attention_ref(const PartialAttentionParams& p) {
  SS_CHECK(p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0, "heads {} / kv heads {}",
           p.n_heads, p.n_kv_heads);
  const int group = p.n_heads / p.n_kv_heads;
  const int d = p.head_dim;
  const int64_t kv_row = static_cast<int64_t>(p.n_kv_heads) * d;
  std::vector<float> acc(d);
  for (int64_t i = 0; i < p.n_q; ++i) {
    for (int h = 0; h < p.n_heads; ++h) {
      const float* q = p.q + (i * p.n_heads + h) * d;
      const int kvh = h / group;
      // Running state per entropy.md: m = max score, l = sum e^{s-m}, u = sum e^{s-m} (s-m).
      float m = kNegInf, l = 0.0f, u = 0.0f;
      for (int c = 0; c < d; ++c) acc[c] = 0.0f;
      int64_t j = 0;
      for (const KvSegment& seg : p.kv) {
        for (int64_t t = 0; t < seg.n_tokens; ++t, ++j) {
          if (!p.mask.visible(i, j)) continue;  // masked keys contribute nothing (no 0 * -inf)
          const float* k = seg.k + t * kv_row + kvh * d;
          const float* v = seg.v + t * kv_row + kvh * d;
          float s = 0.0f;
          for (int c = 0; c < d; ++c) s += q[c] * k[c];
          s *= p.scale;
          if (p.softcap > 0.0f) s = p.softcap * std::tanh(s / p.softcap);
          if (s > m) {
            // New running maximum m' = s: rescale by alpha = e^{m - m'} and shift u by (m - m') l.
            // On the first visible key (m = -inf) the sums are still empty; skip the -inf * 0.
            if (!std::isinf(m)) {
              const float alpha = std::exp(m - s);
              u = alpha * (u + (m - s) * l);
              l = alpha * l;
              for (int c = 0; c < d; ++c) acc[c] *= alpha;
            }
            m = s;
          }
          const float e = std::exp(s - m);
          l += e;
          u += e * (s - m);
          for (int c = 0; c < d; ++c) acc[c] += e * v[c];
        }
      }
      const int64_t row = i * p.n_heads + h;
      float* o = p.out + row * d;
      if (l == 0.0f) {
        for (int c = 0; c < d; ++c) o[c] = 0.0f;
        p.lse[row] = kNegInf;
        if (p.entropy) p.entropy[row] = 0.0f;
      } else {
        const float inv = 1.0f / l;
        for (int c = 0; c < d; ++c) o[c] = acc[c] * inv;
        p.lse[row] = m + std::log(l);
        // H = ln l - u / l (u <= 0). Clamp rounding below 0.
        if (p.entropy) p.entropy[row] = std::max(0.0f, std::log(l) - u * inv);
      }
    }
  }
}

void merge_partials_ref(float* out, float* lse, float* entropy, std::span<const AttentionPartial> parts,
                        int64_t n_rows, int head_dim) {
  for (int64_t r = 0; r < n_rows; ++r) {
    float m = kNegInf;
    for (const auto& part : parts) m = std::max(m, part.lse[r]);
    float* o = out + r * head_dim;
    for (int c = 0; c < head_dim; ++c) o[c] = 0.0f;
    if (std::isinf(m)) {  // every shard empty for this row
      lse[r] = kNegInf;
      if (entropy) entropy[r] = 0.0f;
      continue;
    }
    float den = 0.0f, h_sum = 0.0f, shift_sum = 0.0f;
    for (const auto& part : parts) {
      const float l = part.lse[r];
      if (std::isinf(l)) continue;  // empty shard: e = 0, drops out
      const float e = std::exp(l - m);
      den += e;
      const float* po = part.out + r * head_dim;
      for (int c = 0; c < head_dim; ++c) o[c] += e * po[c];
      if (part.entropy) h_sum += e * part.entropy[r];
      shift_sum += e * (l - m);
    }
    const float inv = 1.0f / den;
    for (int c = 0; c < head_dim; ++c) o[c] *= inv;
    const float log_den = std::log(den);
    lse[r] = m + log_den;
    if (entropy) entropy[r] = std::max(0.0f, h_sum * inv - shift_sum * inv + log_den);
  }
}

void merge_sum_terms_ref(float* terms, const float* out, const float* lse, const float* entropy,
                         const float* max_lse, int64_t n_rows, int head_dim) {
  const int64_t w = merge_sum_width(head_dim);
  for (int64_t r = 0; r < n_rows; ++r) {
    float* row = terms + r * w;
    if (std::isinf(max_lse[r]) || std::isinf(lse[r])) {  // this shard (or every shard) is empty here
      std::fill(row, row + w, 0.0f);
      continue;
    }
    const float e = std::exp(lse[r] - max_lse[r]);
    for (int c = 0; c < head_dim; ++c) row[c] = e * out[r * head_dim + c];
    row[head_dim] = e;
    row[head_dim + 1] = entropy ? e * entropy[r] : 0.0f;
    row[head_dim + 2] = e * (lse[r] - max_lse[r]);
  }
}

void merge_sum_finish_ref(float* out, float* lse, float* entropy, const float* terms, const float* max_lse,
                          int64_t n_rows, int head_dim) {
  const int64_t w = merge_sum_width(head_dim);
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* row = terms + r * w;
    const float den = row[head_dim];
    float* o = out + r * head_dim;
    if (den == 0.0f) {
      std::fill(o, o + head_dim, 0.0f);
      lse[r] = kNegInf;
      if (entropy) entropy[r] = 0.0f;
      continue;
    }
    const float inv = 1.0f / den;  // den >= 1: the shard holding the max has e = 1
    for (int c = 0; c < head_dim; ++c) o[c] = row[c] * inv;
    const float log_den = std::log(den);
    lse[r] = max_lse[r] + log_den;
    if (entropy) entropy[r] = std::max(0.0f, row[head_dim + 1] * inv - row[head_dim + 2] * inv + log_den);
  }
}

}  // namespace starserve
