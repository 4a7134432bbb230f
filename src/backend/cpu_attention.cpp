#include "backend/cpu_attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/check.h"

namespace starserve {

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kQueryTile = 64;   // query rows per tile: S tile of 64 x 256 fp32 = 64 KiB, L2-resident
constexpr int64_t kKeyTile = 256;    // keys per tile (a segment longer than this is cut)
}  // namespace

void partial_attention_cpu(const PartialAttentionParams& p) {
  SS_CHECK(p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0, "heads {} / kv heads {}", p.n_heads,
           p.n_kv_heads);
  const int group = p.n_heads / p.n_kv_heads;
  const int d = p.head_dim;
  const int64_t q_stride = static_cast<int64_t>(p.n_heads) * d;     // between query rows of one head
  const int64_t kv_stride = static_cast<int64_t>(p.n_kv_heads) * d;  // between key rows of one kv head

  // Key tiles: (segment, first token, count, logical index of the first key).
  struct KeyTile {
    const float* k;
    const float* v;
    int64_t n;
    int64_t j0;
  };
  std::vector<KeyTile> tiles;
  int64_t j = 0;
  for (const KvSegment& seg : p.kv) {
    for (int64_t t = 0; t < seg.n_tokens; t += kKeyTile) {
      const int64_t n = std::min(kKeyTile, seg.n_tokens - t);
      tiles.push_back({seg.k + t * kv_stride, seg.v + t * kv_stride, n, j + t});
    }
    j += seg.n_tokens;
  }

  std::vector<float> s(kQueryTile * kKeyTile), acc(kQueryTile * d);
  std::vector<float> m(kQueryTile), l(kQueryTile), u(kQueryTile);
  for (int h = 0; h < p.n_heads; ++h) {
    const int kvh = h / group;
    for (int64_t i0 = 0; i0 < p.n_q; i0 += kQueryTile) {
      const int64_t nq = std::min(kQueryTile, p.n_q - i0);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(u.begin(), u.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      const float* q = p.q + i0 * q_stride + static_cast<int64_t>(h) * d;
      for (const KeyTile& kt : tiles) {
        // Skip tiles no row of this query tile can see (causal: key j visible iff j <= i + offset).
        if (p.mask.causal && kt.j0 > i0 + nq - 1 + p.mask.causal_offset) continue;
        // ... or tiles wholly behind every row's sliding window (the bound grows with the row).
        if (kt.j0 + kt.n <= p.mask.first_visible(i0)) continue;
        // S (nq x n) = scale * Q_h (nq x d) . K_kvh (n x d)^T
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(nq), static_cast<int>(kt.n), d,
                    p.scale, q, static_cast<int>(q_stride), kt.k + static_cast<int64_t>(kvh) * d,
                    static_cast<int>(kv_stride), 0.0f, s.data(), static_cast<int>(kt.n));
        for (int64_t r = 0; r < nq; ++r) {
          float* row = s.data() + r * kt.n;
            // Visible keys of this row within the tile: [lo, vis) (the window's bound, then causal).
          int64_t vis = kt.n;
          if (p.mask.causal) vis = std::clamp<int64_t>(i0 + r + p.mask.causal_offset - kt.j0 + 1, 0, kt.n);
          if (p.mask.key_limit) vis = std::min(vis, std::clamp<int64_t>(p.mask.key_limit[i0 + r] - kt.j0, 0, kt.n));
          const int64_t lo = std::clamp<int64_t>(p.mask.first_visible(i0 + r) - kt.j0, 0, kt.n);
          if (p.softcap > 0.0f) {
            for (int64_t c = lo; c < vis; ++c) row[c] = p.softcap * std::tanh(row[c] / p.softcap);
          }
          float tile_max = kNegInf;
          for (int64_t c = lo; c < vis; ++c) tile_max = std::max(tile_max, row[c]);
          if (vis <= lo) {
            std::fill(row, row + kt.n, 0.0f);
            continue;
          }
          const float m_new = std::max(m[r], tile_max);
          // Rescale the running state (docs/specs/entropy.md): u <- a (u + (m - m') l), l <- a l, acc <- a acc.
          if (m[r] != kNegInf && m_new != m[r]) {
            const float a = std::exp(m[r] - m_new);
            u[r] = a * (u[r] + (m[r] - m_new) * l[r]);
            l[r] *= a;
            float* ar = acc.data() + r * d;
            for (int c = 0; c < d; ++c) ar[c] *= a;
          }
          m[r] = m_new;
          float sum_p = 0.0f, sum_ps = 0.0f;
          for (int64_t c = lo; c < vis; ++c) {
            const float shifted = row[c] - m_new;
            const float e = std::exp(shifted);
            row[c] = e;
            sum_p += e;
            sum_ps += e * shifted;
          }
          std::fill(row, row + lo, 0.0f);  // masked keys: exactly zero weight
          std::fill(row + vis, row + kt.n, 0.0f);
          l[r] += sum_p;
          u[r] += sum_ps;
        }
        // acc (nq x d) += P (nq x n) . V_kvh (n x d)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(nq), d, static_cast<int>(kt.n), 1.0f,
                    s.data(), static_cast<int>(kt.n), kt.v + static_cast<int64_t>(kvh) * d,
                    static_cast<int>(kv_stride), 1.0f, acc.data(), d);
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t row = (i0 + r) * p.n_heads + h;
        float* o = p.out + row * d;
        if (l[r] == 0.0f) {
          std::fill(o, o + d, 0.0f);
          p.lse[row] = kNegInf;
          if (p.entropy) p.entropy[row] = 0.0f;
          continue;
        }
        const float inv = 1.0f / l[r];
        for (int c = 0; c < d; ++c) o[c] = acc[r * d + c] * inv;
        p.lse[row] = m[r] + std::log(l[r]);
        if (p.entropy) p.entropy[row] = std::max(0.0f, std::log(l[r]) - u[r] * inv);
      }
    }
  }
}

}  // namespace starserve
