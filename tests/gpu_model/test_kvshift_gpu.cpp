// KV-shifting attention on the CUDA backend (bf16) against the CPU backend (fp32) and the
// reference goldens (tests/golden/kvshift, starref in fp32): prompt logits on the fused and
// unfused paths, prefill then decode, and Star Attention on one process with the halo. Tolerance:
// 4% of the prompt's largest |logit|, the family GPU tests' bound (bf16 weights and activations,
// 2^-9 relative per rounding, through 3 layers; the mix adds one rounding of the same size to k
// and v). Where the golden's top-1 leads by more than twice the tolerance, the GPU's argmax must
// be it. SKIPPED without a CUDA device.
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

namespace starserve {
namespace {

constexpr double kRelTol = 0.04;

struct Pair {
  std::unique_ptr<WeightSource> source;
  std::unique_ptr<Backend> cpu, gpu;
  std::unique_ptr<Model> cpu_model, gpu_model;
};

std::unique_ptr<Pair> load(const ModelOptions& options) {
  auto p = std::make_unique<Pair>();
  auto s = HfWeightSource::open(std::string(STARSERVE_GOLDEN_DIR) + "/kvshift/hf");
  EXPECT_TRUE(s.ok()) << s.status().to_string();
  if (!s.ok()) return nullptr;
  p->source = std::move(s).value();
  p->cpu = make_cpu_backend();
  auto g = make_cuda_backend(0);
  EXPECT_TRUE(g.ok()) << g.status().to_string();
  if (!g.ok()) return nullptr;
  p->gpu = std::move(g).value();
  auto cm = create_model(*p->source, *p->cpu, options);
  auto gm = create_model(*p->source, *p->gpu, options);
  EXPECT_TRUE(cm.ok() && gm.ok()) << (cm.ok() ? gm.status().to_string() : cm.status().to_string());
  if (!cm.ok() || !gm.ok()) return nullptr;
  p->cpu_model = std::move(cm).value();
  p->gpu_model = std::move(gm).value();
  return p;
}

nlohmann::json golden() {
  std::ifstream in(std::string(STARSERVE_GOLDEN_DIR) + "/kvshift/golden.json");
  EXPECT_TRUE(in.good());
  return nlohmann::json::parse(in);
}

std::vector<int32_t> iota_from(int64_t n, int64_t start) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), static_cast<int32_t>(start));
  return v;
}

// Every row of the prompt in `prefill`-token forwards then one token per forward (0 = all at once).
std::vector<float> run_global(Model& m, const std::vector<int32_t>& ids, int64_t prefill) {
  const ModelHParams& hp = m.hparams();
  KvCache cache(m.backend(), {hp.n_layers, hp.n_kv_heads, hp.head_dim, 64, 64});
  LocalAttention attn(m.backend(), cache, hp);
  std::vector<float> out;
  const int64_t n = static_cast<int64_t>(ids.size());
  for (int64_t t = 0; t < n;) {
    const int64_t len = prefill == 0 ? n : (t == 0 ? prefill : 1);
    const std::vector<int32_t> toks(ids.begin() + t, ids.begin() + t + len);
    const auto pos = iota_from(len, t);
    BatchSeq bs{1, toks, pos, true};
    std::vector<float> lg;
    EXPECT_TRUE(m.forward({&bs, 1}, attn, &lg).ok());
    out.insert(out.end(), lg.begin(), lg.end());
    t += len;
  }
  return out;
}

float max_abs(const float* a, int n) {
  float m = 0.0f;
  for (int i = 0; i < n; ++i) m = std::max(m, std::fabs(a[i]));
  return m;
}

// scale: the largest |logit| of the prompt (the bound's scale in the family GPU tests: a row whose
// own logits are small still carries the rounding of the activations that made the large ones).
// floor: a bound of its own when larger than kRelTol * scale (0 = none).
void expect_row(const float* got, const float* want, int nv, float scale, const std::string& what,
                float floor = 0.0f) {
  const float tol = std::max(static_cast<float>(kRelTol) * scale, floor);
  float worst = 0.0f;
  for (int c = 0; c < nv; ++c) worst = std::max(worst, std::fabs(got[c] - want[c]));
  EXPECT_LE(worst, tol) << what;
  std::vector<float> s(want, want + nv);
  std::partial_sort(s.begin(), s.begin() + 2, s.end(), std::greater<>());
  if (s[0] - s[1] > 2.0f * tol) {
    EXPECT_EQ(std::max_element(got, got + nv) - got, std::max_element(want, want + nv) - want) << what;
  }
}

TEST(KvShiftGpu, PromptLogitsMatchCpuAndReference) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const nlohmann::json g = golden();
  for (int64_t fused_max : {int64_t{1024}, int64_t{0}}) {
    auto p = load(ModelOptions{fused_max});
    ASSERT_TRUE(p);
    const int nv = p->gpu_model->hparams().n_vocab;
    for (const auto& pr : g["prompts"]) {
      const auto ids = pr["token_ids"].get<std::vector<int32_t>>();
      const auto want = pr["last_logits"].get<std::vector<float>>();
      const auto got = run_global(*p->gpu_model, ids, 0);
      const auto cpu = run_global(*p->cpu_model, ids, 0);
      const size_t last = (ids.size() - 1) * nv;
      const float scale = max_abs(cpu.data(), static_cast<int>(cpu.size()));
      expect_row(got.data() + last, want.data(), nv, scale, "reference, fused_max " + std::to_string(fused_max));
      // Mid-prompt rows of this random-weight model (weights ~0.25, so activations grow through the layers) are
      // sensitive to bf16 itself: the reference run in bfloat16 (golden.py) moves them by bf16_max_abs_diff, up to
      // 0.85 where 4% of the largest logit is 0.38, and the plain Llama block with the same weights moves by 0.46.
      // A bf16 backend is held to 1.25x what the independent bf16 run shows.
      const float bf16 = 1.25f * pr["bf16_max_abs_diff"].get<float>();
      for (size_t r = 0; r < ids.size(); ++r) {
        expect_row(got.data() + r * nv, cpu.data() + r * nv, nv, scale, "cpu row " + std::to_string(r), bf16);
      }
    }
  }
}

// Prefill 9 tokens, then decode one at a time (the decode state on the device): each row as the
// CPU backend's one forward.
TEST(KvShiftGpu, PrefillThenDecodeMatchesCpuForward) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto p = load({});
  ASSERT_TRUE(p);
  const nlohmann::json g = golden();
  const auto ids = g["prompts"][1]["token_ids"].get<std::vector<int32_t>>();
  const int nv = p->gpu_model->hparams().n_vocab;
  const auto got = run_global(*p->gpu_model, ids, 9);
  const auto cpu = run_global(*p->cpu_model, ids, 0);
  ASSERT_EQ(got.size(), cpu.size());
  const float scale = max_abs(cpu.data(), static_cast<int>(cpu.size()));
  for (size_t r = 8; r < ids.size(); ++r) {
    expect_row(got.data() + r * nv, cpu.data() + r * nv, nv, scale, "row " + std::to_string(r));
  }
}

// Star on one process with the golden blocks: the GPU's query logits against the reference.
TEST(KvShiftGpu, StarOneProcessMatchesReference) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  auto p = load({});
  ASSERT_TRUE(p);
  Model& m = *p->gpu_model;
  const ModelHParams& hp = m.hparams();
  auto comm = make_local_communicator();
  for (const auto& e : golden()["star"]) {
    const auto ctx = e["context_ids"].get<std::vector<int32_t>>();
    const auto query = e["query_ids"].get<std::vector<int32_t>>();
    KvCache cache(m.backend(), {hp.n_layers, hp.n_kv_heads, hp.head_dim, 64, 64});
    ContextEncoder enc(m, cache, *comm);
    ContextPlan plan;
    plan.mode = AttentionMode::kStar;
    plan.block_size = e["block"].get<int>();
    plan.anchor_size = e["anchor"].get<int>();
    auto lay = enc.layout_for(static_cast<int64_t>(ctx.size()), plan);
    ASSERT_TRUE(lay.ok());
    ASSERT_TRUE(enc.encode(7, ctx, *lay, AttentionMode::kStar).ok());
    Phase2Attention p2(m.backend(), cache, hp, *comm, MergeAlgo::kAllGather);
    p2.register_sequence(7, true, static_cast<int64_t>(ctx.size()));
    const auto pos = iota_from(static_cast<int64_t>(query.size()), static_cast<int64_t>(ctx.size()));
    BatchSeq bs{7, query, pos, false};
    std::vector<float> lg;
    ASSERT_TRUE(m.forward({&bs, 1}, p2, &lg).ok());
    const auto want = e["last_logits"].get<std::vector<float>>();
    expect_row(lg.data(), want.data(), hp.n_vocab, max_abs(want.data(), hp.n_vocab), "star block " + std::to_string(e["block"].get<int>()));
  }
}

}  // namespace
}  // namespace starserve
