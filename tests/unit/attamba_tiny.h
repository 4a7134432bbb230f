// A tiny Attamba model held in memory (random weights from a fixed seed, canonical tensor names)
// and a dense reference of the layer written straight from docs/specs/attamba.md, independent of
// starserve's carry, cache and partial-attention machinery: per layer every token's k/v are
// computed from the h of its whole chunk (the SSM restarted at the chunk start, loops as the spec
// writes them), and attention is one dense softmax per query over the keys a visibility rule
// admits. Global attention is the spec's mask; Star Attention is the same forward with the mask of
// star_visible (a block >= 2 sees the anchor's and its own boundaries, and the band), since every
// token of a star layout has one representation per layer.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "model/hparams.h"
#include "model/weight_source.h"

namespace starserve::attamba_tiny {

// 3 layers (offsets 0, 1, 2 with P = 4), hidden 32 = 4 heads x 8, FFN 48, vocab 61, L = 5, SSM
// d_inner 16 = 4 heads x 4, N = 8, G = 1, W = 4.
inline ModelHParams tiny_hparams(int chunk = 4, int leading = 5, bool cyclic = true) {
  ModelHParams hp;
  hp.arch = "attamba";
  hp.arch_name = "attamba";
  hp.name = "attamba-tiny";
  hp.n_layers = 3;
  hp.hidden = 32;
  hp.n_heads = 4;
  hp.n_kv_heads = 4;
  hp.head_dim = 8;
  hp.rope_dim = 8;
  hp.ffn_hidden = 48;
  hp.n_vocab = 61;
  hp.max_context = 1024;
  hp.rms_eps = 1e-5f;
  hp.rope_theta = 10000.0f;
  hp.tied_embeddings = true;
  hp.attamba.chunk = chunk;
  hp.attamba.leading = leading;
  hp.attamba.cyclic_offsets = cyclic;
  hp.attamba.d_inner = 16;
  hp.attamba.d_state = 8;
  hp.attamba.n_heads = 4;
  hp.attamba.n_groups = 1;
  hp.attamba.conv_width = 4;
  return hp;
}

class TinySource final : public WeightSource {
 public:
  explicit TinySource(const ModelHParams& hp, uint32_t seed = 7) : hp_(hp) {
    std::mt19937 rng(seed);
    auto uni = [&](float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); };
    auto mat = [&](const std::string& name, int64_t rows, int64_t cols) {
      HostTensor t{{rows, cols}, std::vector<float>(static_cast<size_t>(rows * cols))};
      const float s = 1.0f / std::sqrt(static_cast<float>(cols));
      for (float& v : t.data) v = uni(-1.5f * s, 1.5f * s);
      t_[name] = t;
    };
    auto vec = [&](const std::string& name, std::vector<int64_t> shape, float lo, float hi) {
      HostTensor t{shape, {}};
      t.data.resize(static_cast<size_t>(t.numel()));
      for (float& v : t.data) v = uni(lo, hi);
      t_[name] = t;
    };
    const AttambaHParams& a = hp.attamba;
    mat("token_embd.weight", hp.n_vocab, hp.hidden);
    for (float& v : t_["token_embd.weight"].data) v *= 4.0f;
    vec("output_norm.weight", {hp.hidden}, 0.8f, 1.2f);
    for (int l = 0; l < hp.n_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      vec(p + "attn_norm.weight", {hp.hidden}, 0.8f, 1.2f);
      vec(p + "ffn_norm.weight", {hp.hidden}, 0.8f, 1.2f);
      mat(p + "attn_q.weight", hp.hidden, hp.hidden);
      mat(p + "attn_output.weight", hp.hidden, hp.hidden);
      mat(p + "ffn_gate.weight", hp.ffn_hidden, hp.hidden);
      mat(p + "ffn_up.weight", hp.ffn_hidden, hp.hidden);
      mat(p + "ffn_down.weight", hp.hidden, hp.ffn_hidden);
      for (const char* s : {"k_ssm.", "v_ssm."}) {
        const std::string q = p + s;
        mat(q + "in_proj.weight", a.in_proj_rows(), hp.hidden);
        vec(q + "conv1d.weight", {a.conv_dim(), 1, a.conv_width}, -0.6f, 0.6f);
        vec(q + "conv1d.bias", {a.conv_dim()}, -0.2f, 0.2f);
        vec(q + "dt_bias", {a.n_heads}, -2.0f, 0.5f);
        vec(q + "A_log", {a.n_heads}, -1.0f, 1.5f);
        vec(q + "D", {a.n_heads}, 0.5f, 1.5f);
        vec(q + "norm.weight", {a.d_inner}, 0.8f, 1.2f);
        mat(q + "out_proj.weight", hp.hidden, a.d_inner);
      }
    }
  }
  const ModelHParams& hparams() const override { return hp_; }
  bool has(const std::string& name) const override { return t_.count(name) != 0; }
  Result<HostTensor> load(const std::string& name) const override {
    auto it = t_.find(name);
    if (it == t_.end()) return not_found("tiny attamba: no {}", name);
    return it->second;
  }
  std::string describe() const override { return "tiny attamba (random)"; }
  const std::map<std::string, HostTensor>& tensors() const { return t_; }

 private:
  ModelHParams hp_;
  std::map<std::string, HostTensor> t_;
};

// Whether query t sees key j at layer l under the spec's mask.
inline bool global_visible(const ModelHParams& hp, int l, int64_t t, int64_t j) {
  const int64_t L = hp.attamba.leading;
  if (j > t) return false;
  if (j >= t - L) return true;
  return hp.attamba.boundary(l, hp.n_layers, j);
}

// Star Attention's mask for context blocks of `block` tokens (anchor `anchor`) over n_context
// context tokens: a context token of block b >= 1 sees the band and the boundaries of the anchor
// and of its own block; block 0 and the query tokens see as global_visible.
inline bool star_visible(const ModelHParams& hp, int64_t block, int64_t anchor, int64_t n_context, int l, int64_t t,
                         int64_t j) {
  if (!global_visible(hp, l, t, j)) return false;
  if (t >= n_context || t < block || j >= t - hp.attamba.leading) return true;
  const int64_t s0 = t / block * block;
  return j < anchor || j >= s0;
}

using Visible = std::function<bool(int, int64_t, int64_t)>;

// Logits (T, n_vocab) of every token of ids at positions 0.. under the visibility rule.
inline std::vector<float> dense_logits(const TinySource& src, const std::vector<int32_t>& ids, const Visible& vis) {
  const ModelHParams& hp = src.hparams();
  const AttambaHParams& a = hp.attamba;
  const auto& W = src.tensors();
  auto w = [&](const std::string& n) -> const std::vector<float>& { return W.at(n).data; };
  const int64_t T = static_cast<int64_t>(ids.size()), D = hp.hidden, HD = hp.head_dim, NH = hp.n_heads;
  auto rms = [&](const std::vector<float>& x, const std::vector<float>& g, int64_t n, int64_t d) {
    std::vector<float> y(x.size());
    for (int64_t t = 0; t < n; ++t) {
      double ss = 0;
      for (int64_t i = 0; i < d; ++i) ss += double(x[t * d + i]) * x[t * d + i];
      const float r = 1.0f / std::sqrt(static_cast<float>(ss / d) + hp.rms_eps);
      for (int64_t i = 0; i < d; ++i) y[t * d + i] = x[t * d + i] * r * g[i];
    }
    return y;
  };
  auto matmul = [&](const std::vector<float>& x, const std::vector<float>& m, int64_t n, int64_t in, int64_t out) {
    std::vector<float> y(static_cast<size_t>(n * out));
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t o = 0; o < out; ++o) {
        double s = 0;
        for (int64_t i = 0; i < in; ++i) s += double(x[t * in + i]) * m[o * in + i];
        y[t * out + o] = static_cast<float>(s);
      }
    }
    return y;
  };
  auto silu = [](float v) { return v / (1.0f + std::exp(-v)); };
  std::vector<float> x(static_cast<size_t>(T * D));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < D; ++i) x[t * D + i] = w("token_embd.weight")[ids[t] * D + i];
  }
  const int64_t H = a.n_heads, Pd = a.head_dim(), N = a.d_state, G = a.n_groups, CD = a.conv_dim(),
                R = a.in_proj_rows(), DI = a.d_inner, Wc = a.conv_width;
  for (int l = 0; l < hp.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    const std::vector<float> h = rms(x, w(p + "attn_norm.weight"), T, D);
    std::vector<float> q = matmul(h, w(p + "attn_q.weight"), T, D, D);
    std::vector<float> kv[2];
    for (int s = 0; s < 2; ++s) {
      const std::string sp = p + (s == 0 ? "k_ssm." : "v_ssm.");
      const std::vector<float> zx = matmul(h, w(sp + "in_proj.weight"), T, D, R);
      std::vector<float> y(static_cast<size_t>(T * DI));
      std::vector<double> S(static_cast<size_t>(H * Pd * N));
      int64_t c0 = 0;  // the current chunk's first position
      for (int64_t t = 0; t < T; ++t) {
        if (a.chunk_start(l, hp.n_layers, t)) {
          c0 = t;
          std::fill(S.begin(), S.end(), 0.0);
        }
        std::vector<float> xbc(static_cast<size_t>(CD));
        for (int64_t c = 0; c < CD; ++c) {
          double v = w(sp + "conv1d.bias")[c];
          for (int64_t k = 0; k < Wc; ++k) {
            const int64_t src_t = t - (Wc - 1) + k;  // tap W - 1 is the current input
            if (src_t < c0) continue;
            v += double(w(sp + "conv1d.weight")[c * Wc + k]) * zx[src_t * R + DI + c];
          }
          xbc[c] = silu(static_cast<float>(v));
        }
        for (int64_t hh = 0; hh < H; ++hh) {
          const int64_t g = hh / (H / G);
          const float raw = zx[t * R + 2 * DI + 2 * G * N + hh] + w(sp + "dt_bias")[hh];
          const double dt = raw > 20.0f ? raw : std::log1p(std::exp(double(raw)));
          const double A = -std::exp(double(w(sp + "A_log")[hh]));
          const double decay = std::exp(dt * A);
          for (int64_t i = 0; i < Pd; ++i) {
            const double xi = xbc[hh * Pd + i];
            double acc = 0;
            for (int64_t n = 0; n < N; ++n) {
              double& st = S[(hh * Pd + i) * N + n];
              st = decay * st + dt * xi * xbc[DI + g * N + n];
              acc += st * xbc[DI + G * N + g * N + n];
            }
            y[t * DI + hh * Pd + i] = static_cast<float>(acc + double(w(sp + "D")[hh]) * xi);
          }
        }
      }
      std::vector<float> gy(y.size());
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < DI; ++i) gy[t * DI + i] = y[t * DI + i] * silu(zx[t * R + i]);
      }
      const std::vector<float> yn = rms(gy, w(sp + "norm.weight"), T, DI);
      kv[s] = matmul(yn, w(sp + "out_proj.weight"), T, DI, D);
      for (size_t i = 0; i < kv[s].size(); ++i) kv[s][i] += h[i];
    }
    // RoPE (pairs i, i + HD/2) on q and k at position t.
    for (std::vector<float>* m : {&q, &kv[0]}) {
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t hh = 0; hh < NH; ++hh) {
          float* r = m->data() + t * D + hh * HD;
          for (int64_t i = 0; i < HD / 2; ++i) {
            const double f = std::pow(double(hp.rope_theta), -2.0 * double(i) / double(HD));
            const double ang = double(t) * f;
            const float c = static_cast<float>(std::cos(ang)), sn = static_cast<float>(std::sin(ang));
            const float x1 = r[i], x2 = r[i + HD / 2];
            r[i] = x1 * c - x2 * sn;
            r[i + HD / 2] = x2 * c + x1 * sn;
          }
        }
      }
    }
    std::vector<float> att(static_cast<size_t>(T * D), 0.0f);
    const double scale = 1.0 / std::sqrt(double(HD));
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t hh = 0; hh < NH; ++hh) {
        std::vector<double> sc;
        std::vector<int64_t> js;
        for (int64_t j = 0; j <= t; ++j) {
          if (!vis(l, t, j)) continue;
          double d = 0;
          for (int64_t i = 0; i < HD; ++i) d += double(q[t * D + hh * HD + i]) * kv[0][j * D + hh * HD + i];
          sc.push_back(d * scale);
          js.push_back(j);
        }
        const double mx = *std::max_element(sc.begin(), sc.end());
        double z = 0;
        for (double& v : sc) z += (v = std::exp(v - mx));
        for (size_t k = 0; k < js.size(); ++k) {
          for (int64_t i = 0; i < HD; ++i) {
            att[t * D + hh * HD + i] += static_cast<float>(sc[k] / z * kv[1][js[k] * D + hh * HD + i]);
          }
        }
      }
    }
    const std::vector<float> o = matmul(att, w(p + "attn_output.weight"), T, D, D);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    const std::vector<float> h2 = rms(x, w(p + "ffn_norm.weight"), T, D);
    const std::vector<float> g = matmul(h2, w(p + "ffn_gate.weight"), T, D, hp.ffn_hidden);
    const std::vector<float> u = matmul(h2, w(p + "ffn_up.weight"), T, D, hp.ffn_hidden);
    std::vector<float> gu(g.size());
    for (size_t i = 0; i < g.size(); ++i) gu[i] = silu(g[i]) * u[i];
    const std::vector<float> dn = matmul(gu, w(p + "ffn_down.weight"), T, hp.ffn_hidden, D);
    for (size_t i = 0; i < x.size(); ++i) x[i] += dn[i];
  }
  const std::vector<float> xf = rms(x, w("output_norm.weight"), T, D);
  return matmul(xf, w("token_embd.weight"), T, D, hp.n_vocab);
}

inline std::vector<float> dense_global(const TinySource& src, const std::vector<int32_t>& ids) {
  const ModelHParams& hp = src.hparams();
  return dense_logits(src, ids, [&](int l, int64_t t, int64_t j) { return global_visible(hp, l, t, j); });
}

inline std::vector<float> dense_star(const TinySource& src, const std::vector<int32_t>& ids, int64_t block,
                                     int64_t anchor, int64_t n_context) {
  const ModelHParams& hp = src.hparams();
  return dense_logits(src, ids, [&, block, anchor, n_context](int l, int64_t t, int64_t j) {
    return star_visible(hp, block, anchor, n_context, l, t, j);
  });
}

}  // namespace starserve::attamba_tiny
