// Attamba (arch attamba, docs/specs/attamba.md) on the CUDA backend (bf16, the SSM kernels of
// kernels/ssm.h) against the CPU backend (fp32) and the reference golden (tests/golden/attamba,
// starref in fp32): prompt rows, prefill in pieces then decode (the carry and the compressed cache
// on the device), the cache's boundary positions, and Star Attention / exact on one process.
// Bound: 4% of the prompt's largest |logit| (the family GPU tests' bound), or 1.5x what the
// reference itself moves when run in bfloat16 (the golden's bf16_max_abs_diff) where that is
// larger. Where the reference's top-1 leads by more than twice the bound, the GPU's argmax must be
// it. SKIPPED without a CUDA device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "model/hf_source.h"
#include "star/context_encoder.h"
#include "star/local_attention.h"
#include "star/star_attention.h"

namespace starserve {
namespace {

using nlohmann::json;

constexpr float kRelTol = 0.04f;

json golden() {
  std::ifstream in(std::string(STARSERVE_GOLDEN_DIR) + "/attamba/golden.json");
  EXPECT_TRUE(in.good());
  return json::parse(in);
}

struct Pair {
  std::unique_ptr<WeightSource> source;
  std::unique_ptr<Backend> cpu, gpu;
  std::unique_ptr<Model> cpu_model, gpu_model;
};

std::unique_ptr<Pair> load() {
  auto p = std::make_unique<Pair>();
  auto s = HfWeightSource::open(std::string(STARSERVE_GOLDEN_DIR) + "/attamba/hf");
  EXPECT_TRUE(s.ok()) << s.status().to_string();
  if (!s.ok()) return nullptr;
  p->source = std::move(s).value();
  p->cpu = make_cpu_backend();
  auto g = make_cuda_backend(0);
  EXPECT_TRUE(g.ok()) << g.status().to_string();
  if (!g.ok()) return nullptr;
  p->gpu = std::move(g).value();
  auto cm = create_model(*p->source, *p->cpu);
  auto gm = create_model(*p->source, *p->gpu);
  EXPECT_TRUE(cm.ok() && gm.ok()) << (cm.ok() ? gm.status().to_string() : cm.status().to_string());
  if (!cm.ok() || !gm.ok()) return nullptr;
  p->cpu_model = std::move(cm).value();
  p->gpu_model = std::move(gm).value();
  return p;
}

KvCache make_cache(Model& m) {
  const ModelHParams& hp = m.hparams();
  KvCacheShape shape{hp.n_layers, hp.n_kv_heads, hp.head_dim, 16, 128};
  shape.compressed_chunk = hp.attamba.chunk;
  return KvCache(m.backend(), shape);
}

std::vector<int32_t> iota_from(int64_t n, int64_t start) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), static_cast<int32_t>(start));
  return v;
}

// Every row's logits, the prompt fed to one sequence in pieces of the given sizes (then one token
// per forward).
std::vector<float> in_pieces(Model& m, KvCache& cache, SeqId seq, const std::vector<int32_t>& ids,
                             const std::vector<int>& pieces) {
  LocalAttention attn(m.backend(), cache, m.hparams());
  std::vector<float> out;
  int64_t at = 0;
  for (size_t k = 0; at < static_cast<int64_t>(ids.size()); ++k) {
    const int64_t n = std::min<int64_t>(k < pieces.size() ? pieces[k] : 1, static_cast<int64_t>(ids.size()) - at);
    const std::vector<int32_t> toks(ids.begin() + at, ids.begin() + at + n);
    const auto pos = iota_from(n, at);
    BatchSeq bs{seq, toks, pos, true};
    std::vector<float> lg;
    EXPECT_TRUE(m.forward({&bs, 1}, attn, &lg).ok());
    out.insert(out.end(), lg.begin(), lg.end());
    at += n;
  }
  return out;
}

float max_abs(const float* a, size_t n) {
  float m = 0.0f;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(a[i]));
  return m;
}

void expect_row(const float* got, const float* want, int nv, float tol, const std::string& what) {
  float worst = 0.0f;
  for (int c = 0; c < nv; ++c) worst = std::max(worst, std::fabs(got[c] - want[c]));
  EXPECT_LE(worst, tol) << what;
  std::vector<float> s(want, want + nv);
  std::partial_sort(s.begin(), s.begin() + 2, s.end(), std::greater<>());
  if (s[0] - s[1] > 2.0f * tol) {
    EXPECT_EQ(std::max_element(got, got + nv) - got, std::max_element(want, want + nv) - want) << what;
  }
}

float bound(const json& prompt) {
  return std::max(kRelTol * prompt["max_abs_logit"].get<float>(), 1.5f * prompt["bf16_max_abs_diff"].get<float>());
}

TEST(AttambaGpu, PromptRowsMatchReferenceAndCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto p = load();
  ASSERT_TRUE(p);
  const json g = golden();
  const int nv = p->gpu_model->hparams().n_vocab;
  for (const json& pr : g["prompts"]) {
    const auto ids = pr["token_ids"].get<std::vector<int32_t>>();
    const float tol = bound(pr);
    KvCache gc = make_cache(*p->gpu_model), cc = make_cache(*p->cpu_model);
    const int whole = static_cast<int>(ids.size());
    const auto got = in_pieces(*p->gpu_model, gc, 1, ids, {whole});
    const auto cpu = in_pieces(*p->cpu_model, cc, 1, ids, {whole});
    ASSERT_EQ(got.size(), cpu.size());
    const auto rs = pr["rows"].get<std::vector<int64_t>>();
    for (size_t i = 0; i < rs.size(); ++i) {
      const auto want = pr["row_logits"][i].get<std::vector<float>>();
      expect_row(got.data() + rs[i] * nv, want.data(), nv, tol,
                 std::to_string(ids.size()) + " tokens, reference row " + std::to_string(rs[i]));
    }
    for (size_t r = 0; r < ids.size(); ++r) {
      expect_row(got.data() + r * nv, cpu.data() + r * nv, nv, tol, "cpu row " + std::to_string(r));
    }
  }
}

// Prefill in pieces that split chunks (11, 30, then one token per forward): every row as the CPU
// backend's single forward, and the cache keeps the reference's boundary positions.
TEST(AttambaGpu, PiecesThenDecodeMatchCpuAndKeepTheBoundaries) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto p = load();
  ASSERT_TRUE(p);
  const json g = golden();
  const json& cb = g["cache_boundaries"];
  const json& pr = g["prompts"][cb["prompt"].get<int>()];
  const auto ids = pr["token_ids"].get<std::vector<int32_t>>();
  const int nv = p->gpu_model->hparams().n_vocab;
  KvCache gc = make_cache(*p->gpu_model), cc = make_cache(*p->cpu_model);
  const auto got = in_pieces(*p->gpu_model, gc, 4, ids, {11, 30});
  const auto cpu = in_pieces(*p->cpu_model, cc, 4, ids, {static_cast<int>(ids.size())});
  ASSERT_EQ(got.size(), cpu.size());
  const float tol = bound(pr);
  for (size_t r = 0; r < ids.size(); ++r) {
    expect_row(got.data() + r * nv, cpu.data() + r * nv, nv, tol, "row " + std::to_string(r));
  }
  for (int l = 0; l < p->gpu_model->hparams().n_layers; ++l) {
    EXPECT_EQ(gc.stored_positions(l, 4), cb["positions"][l].get<std::vector<int32_t>>()) << "layer " << l;
  }
}

// Star (with the golden's blocks and anchors) and exact on one process: the query's last logits
// against the reference's, and its greedy continuation where the reference's margins are clear.
TEST(AttambaGpu, StarAndExactOnOneProcessMatchReference) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto p = load();
  ASSERT_TRUE(p);
  Model& m = *p->gpu_model;
  const ModelHParams& hp = m.hparams();
  const float tol_scale = bound(golden()["prompts"][0]);
  for (const json& e : golden()["star"]) {
    const auto ctx = e["context_ids"].get<std::vector<int32_t>>();
    const auto query = e["query_ids"].get<std::vector<int32_t>>();
    const bool exact = e["exact"].get<bool>();
    const std::string what = "block " + std::to_string(e["block"].get<int>()) + " anchor " +
                             std::to_string(e["anchor"].get<int>()) + (exact ? " exact" : "");
    auto comm = make_local_communicator();
    KvCache cache = make_cache(m);
    ContextEncoder enc(m, cache, *comm);
    const ContextPlan plan = exact ? ContextPlan{AttentionMode::kExact, 0, 0}
                                   : ContextPlan{AttentionMode::kStar, e["block"].get<int>(), e["anchor"].get<int>()};
    auto lay = enc.layout_for(static_cast<int64_t>(ctx.size()), plan);
    ASSERT_TRUE(lay.ok()) << what << ": " << lay.status().to_string();
    ASSERT_TRUE(enc.encode(9, ctx, *lay, plan.mode).ok()) << what;
    Phase2Attention p2(m.backend(), cache, hp, *comm, MergeAlgo::kAllGather);
    p2.register_sequence(9, true, static_cast<int64_t>(ctx.size()));
    const auto pos = iota_from(static_cast<int64_t>(query.size()), static_cast<int64_t>(ctx.size()));
    BatchSeq bs{9, query, pos, true};
    std::vector<float> lg;
    ASSERT_TRUE(m.forward({&bs, 1}, p2, &lg).ok()) << what;
    const auto want = e["last_logits"].get<std::vector<float>>();
    const float tol = std::max(tol_scale, kRelTol * max_abs(want.data(), want.size()));
    expect_row(lg.data() + (query.size() - 1) * hp.n_vocab, want.data(), hp.n_vocab, tol, what);
    // Teacher-forced along the reference's continuation: the GPU's argmax at each step where the
    // reference's margin is clear of the bound.
    const auto gen = e["generated_ids"].get<std::vector<int32_t>>();
    const auto margins = e["margins"].get<std::vector<float>>();
    std::vector<float> last(lg.end() - hp.n_vocab, lg.end());
    int32_t at = pos.back();
    for (size_t i = 0; i < gen.size(); ++i) {
      if (margins[i] > 2.0f * tol) {
        EXPECT_EQ(std::max_element(last.begin(), last.end()) - last.begin(), gen[i]) << what << ", step " << i;
      }
      const int32_t tk = gen[i];
      const int32_t next = ++at;
      BatchSeq d{9, {&tk, 1}, {&next, 1}, false};
      ASSERT_TRUE(m.forward({&d, 1}, p2, &last).ok()) << what;
    }
  }
}

}  // namespace
}  // namespace starserve
