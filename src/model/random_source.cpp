#include "model/random_source.h"

#include <cmath>
#include <string_view>
#include <thread>
#include <vector>
#include <algorithm>

#include <fmt/format.h>

#include "common/check.h"

namespace starserve {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t hash_name(std::string_view s) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (char c : s) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return h;
}

// Maps the tensor name to (shape, init). Norm weights are near 1; linear weights ~ U(-a, a) with
// a = sqrt(3 / fan_in), i.e. unit-variance outputs, so activations stay O(1) through the layers.
// KV-shifting weights (n_kv_heads, 2): column 0 weighs the previous token, column 1 the current
// one (arch_kvshift.cpp); previous in [0, 0.5) and current in [0.5, 1), so the mix keeps k and v at
// the plain projections' scale while the previous token still counts.
enum class Init { kLinear, kNorm, kShift };

struct Spec {
  std::vector<int64_t> shape;
  Init init = Init::kLinear;
};

bool spec_for(const ModelHParams& hp, const std::string& name, Spec* out) {
  const int64_t q_dim = static_cast<int64_t>(hp.n_heads) * hp.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(hp.n_kv_heads) * hp.head_dim;
  if (name == "token_embd.weight") return *out = {{hp.n_vocab, hp.hidden}}, true;
  if (name == "output_norm.weight") return *out = {{hp.hidden}, Init::kNorm}, true;
  if (name == "output.weight") return hp.tied_embeddings ? false : (*out = {{hp.n_vocab, hp.hidden}}, true);
  int layer = -1;
  char rest[64] = {0};
  if (std::sscanf(name.c_str(), "blk.%d.%63s", &layer, rest) != 2 || layer < 0 || layer >= hp.n_layers) return false;
  const std::string r(rest);
  if (r == "attn_norm.weight" || r == "ffn_norm.weight") return *out = {{hp.hidden}, Init::kNorm}, true;
  if (r == "attn_q.weight") return *out = {{q_dim, hp.hidden}}, true;
  if (r == "attn_k.weight" || r == "attn_v.weight") return *out = {{kv_dim, hp.hidden}}, true;
  if (r == "attn_output.weight") return *out = {{hp.hidden, q_dim}}, true;
  if (r == "ffn_gate.weight" || r == "ffn_up.weight") return *out = {{hp.ffn_hidden, hp.hidden}}, true;
  if (r == "ffn_down.weight") return *out = {{hp.hidden, hp.ffn_hidden}}, true;
  if (hp.kv_shift && (r == "attn_k_shift" || r == "attn_v_shift")) return *out = {{hp.n_kv_heads, 2}, Init::kShift}, true;
  return false;
}

}  // namespace

RandomWeightSource::RandomWeightSource(const ModelHParams& hp, uint64_t seed) : hp_(hp), seed_(seed) {}

bool RandomWeightSource::has(const std::string& name) const {
  Spec s;
  return spec_for(hp_, name, &s);
}

Result<HostTensor> RandomWeightSource::load(const std::string& name) const {
  Spec s;
  if (!spec_for(hp_, name, &s)) return not_found("random model has no tensor {}", name);
  HostTensor t;
  t.shape = s.shape;
  t.data.resize(t.numel());
  const uint64_t base = splitmix64(seed_ ^ hash_name(name));
  const float a = s.init == Init::kLinear ? std::sqrt(3.0f / static_cast<float>(s.shape.back())) : 0.1f;
  auto fill = [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      // 24 random bits -> uniform in [-1, 1).
      const float u = static_cast<float>(splitmix64(base + i) >> 40) / static_cast<float>(1 << 23) - 1.0f;
      switch (s.init) {
        case Init::kLinear: t.data[i] = a * u; break;
        case Init::kNorm: t.data[i] = 1.0f + a * u; break;
        case Init::kShift: t.data[i] = (i % 2 == 0 ? 0.25f : 0.75f) + 0.25f * u; break;
      }
    }
  };
  // Element i depends on i alone, so large tensors (8B-shaped models) fill in parallel.
  const size_t n = t.data.size();
  const size_t n_threads = n < (size_t{1} << 22) ? 1 : std::clamp<size_t>(std::thread::hardware_concurrency(), 1, 32);
  std::vector<std::thread> workers;
  for (size_t w = 1; w < n_threads; ++w) workers.emplace_back(fill, n * w / n_threads, n * (w + 1) / n_threads);
  fill(0, n / n_threads);
  for (std::thread& th : workers) th.join();
  return t;
}

std::string RandomWeightSource::describe() const {
  return fmt::format("random weights (seed {}), arch {}, {} layers, hidden {}", seed_, hp_.arch, hp_.n_layers,
                     hp_.hidden);
}

ModelHParams tiny_llama_hparams() {
  ModelHParams hp;
  hp.arch = "llama";
  hp.arch_name = "llama";
  hp.name = "tiny-random-llama";
  hp.n_layers = 2;
  hp.hidden = 64;
  hp.n_heads = 4;
  hp.n_kv_heads = 2;
  hp.head_dim = 16;
  hp.ffn_hidden = 128;
  hp.n_vocab = 256;
  hp.max_context = 4096;
  hp.rms_eps = 1e-5f;
  hp.rope_theta = 10000.0f;
  hp.rope_dim = 16;
  hp.rope_style = RopeStyle::kHalf;
  hp.tied_embeddings = false;
  return hp;
}

ModelHParams small_llama_hd64_hparams() {
  ModelHParams hp = tiny_llama_hparams();
  hp.name = "small-random-llama-hd64";
  hp.n_layers = 3;
  hp.hidden = 256;
  hp.n_heads = 4;
  hp.n_kv_heads = 2;
  hp.head_dim = 64;
  hp.rope_dim = 64;
  hp.ffn_hidden = 512;
  hp.n_vocab = 512;
  return hp;
}

ModelHParams llama3_8b_hparams(int n_layers) {
  ModelHParams hp;
  hp.arch = "llama";
  hp.arch_name = "llama";
  hp.name = "random-llama-3-8b-shape";
  hp.n_layers = n_layers;
  hp.hidden = 4096;
  hp.n_heads = 32;
  hp.n_kv_heads = 8;
  hp.head_dim = 128;
  hp.ffn_hidden = 14336;
  hp.n_vocab = 128256;
  hp.max_context = 131072 * 4;
  hp.rms_eps = 1e-5f;
  hp.rope_theta = 500000.0f;
  hp.rope_dim = 128;
  hp.rope_style = RopeStyle::kHalf;
  hp.tied_embeddings = false;
  return hp;
}

ModelHParams smollm2_135m_hparams(int n_layers) {
  ModelHParams hp = llama3_8b_hparams(n_layers);
  hp.name = "random-smollm2-135m-shape";
  hp.hidden = 576;
  hp.n_heads = 9;
  hp.n_kv_heads = 3;
  hp.head_dim = 64;
  hp.ffn_hidden = 1536;
  hp.n_vocab = 49152;
  hp.max_context = 8192 * 4;
  hp.rope_theta = 100000.0f;
  hp.rope_dim = 64;
  hp.tied_embeddings = true;
  return hp;
}

ModelHParams kvshift_hparams(ModelHParams hp) {
  SS_CHECK(hp.arch == "llama", "kvshift_hparams: {} is not a Llama shape", hp.arch);
  hp.arch = "kvshift";
  hp.arch_name = "kvshift_llama";
  hp.name += "-kvshift";
  hp.kv_shift = true;
  return hp;
}

}  // namespace starserve
