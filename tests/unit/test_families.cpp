// Model families beyond Llama (Qwen2, Qwen3, Mistral's sliding window, Gemma 2, Gemma 3, Phi-3, GPT-2)
// against Hugging Face transformers: tiny random-weight models written both as safetensors +
// config.json and as GGUF with llama.cpp's names by scripts/golden/make_family_goldens.py
// (tests/golden/<family>/), their last-position logits and 32-token greedy continuations in fp32.
// Also the attention modes (global / exact / star, ContextEncoder + Phase2Attention on one CPU
// rank) on the same models, the sliding-window rule of the attention references, and the errors
// for unsupported architectures and features.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <random>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "backend/cpu_attention.h"
#include "comm/communicator.h"
#include "kernels/ref/attention_ref.h"
#include "model/gguf_source.h"
#include "model/hf_source.h"
#include "model/layers.h"
#include "star/context_encoder.h"
#include "star/local_attention.h"
#include "family_golden.h"
#include "forwarding_backend.h"

namespace starserve {
namespace {

using nlohmann::json;
using namespace family_golden;

constexpr const char* kFamilies[] = {"qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "phi3_longrope", "gpt2"};

struct Loaded {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  std::unique_ptr<WeightSource> source;
  std::unique_ptr<Model> model;
};

// format: "gguf" (model.gguf) or "hf" (hf/ checkpoint).
std::unique_ptr<Loaded> load(const std::string& family, const std::string& format) {
  auto l = std::make_unique<Loaded>();
  if (format == "gguf") {
    auto s = GgufWeightSource::open(family_dir(family) + "/model.gguf");
    EXPECT_TRUE(s.ok()) << s.status().to_string();
    if (!s.ok()) return nullptr;
    l->source = std::move(s).value();
  } else {
    auto s = HfWeightSource::open(family_dir(family) + "/hf");
    EXPECT_TRUE(s.ok()) << s.status().to_string();
    if (!s.ok()) return nullptr;
    l->source = std::move(s).value();
  }
  auto m = create_model(*l->source, *l->backend);
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  if (!m.ok()) return nullptr;
  l->model = std::move(m).value();
  return l;
}

KvCache make_cache(Model& model) {
  const ModelHParams& hp = model.hparams();
  return KvCache(model.backend(), {hp.n_layers, hp.n_kv_heads, hp.head_dim, 16, 64});
}

std::vector<int32_t> ids_of(const json& a) { return a.get<std::vector<int32_t>>(); }

// Last-position logits of `ids` in one forward (global attention).
std::vector<float> last_logits(Model& model, const std::vector<int32_t>& ids) {
  KvCache cache = make_cache(model);
  LocalAttention attn(model.backend(), cache, model.hparams());
  const auto pos = iota_from(static_cast<int64_t>(ids.size()), 0);
  BatchSeq bs{1, ids, pos, false};
  std::vector<float> logits;
  EXPECT_TRUE(model.forward({&bs, 1}, attn, &logits).ok());
  return logits;
}

// Greedy continuation: the prompt in one forward, then one token per step through the KV cache
// (so windows over cached keys are exercised, unlike the reference's full recomputation).
std::vector<int32_t> greedy(Model& model, const std::vector<int32_t>& prompt, int n_new) {
  KvCache cache = make_cache(model);
  LocalAttention attn(model.backend(), cache, model.hparams());
  std::vector<int32_t> out;
  std::vector<int32_t> toks = prompt;
  std::vector<int32_t> pos = iota_from(static_cast<int64_t>(prompt.size()), 0);
  for (int i = 0; i < n_new; ++i) {
    BatchSeq bs{1, toks, pos, false};
    std::vector<float> logits;
    EXPECT_TRUE(model.forward({&bs, 1}, attn, &logits).ok());
    const int32_t next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.push_back(next);
    const int32_t p = pos.back() + 1;
    toks = {next};
    pos = {p};
  }
  return out;
}

class FamilyGolden : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(FamilyGolden, LastPositionLogitsMatchTransformers) {
  const auto& [family, format] = GetParam();
  const json g = read_golden(family);
  auto l = load(family, format);
  ASSERT_TRUE(l);
  EXPECT_EQ(l->model->hparams().n_vocab, g["n_vocab"].get<int>());
  for (const json& p : g["prompts"]) {
    const std::vector<int32_t> ids = ids_of(p["token_ids"]);
    const std::vector<float> want = p["last_logits"].get<std::vector<float>>();
    const std::vector<float> got = last_logits(*l->model, ids);
    ASSERT_EQ(got.size(), want.size());
    const float tol = logit_tolerance(want);
    float worst = 0.0f;
    for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]));
    EXPECT_LE(worst, tol) << family << " " << format << ", prompt of " << ids.size() << " tokens";
  }
}

TEST_P(FamilyGolden, GreedyContinuationsMatchTransformers) {
  const auto& [family, format] = GetParam();
  const json g = read_golden(family);
  auto l = load(family, format);
  ASSERT_TRUE(l);
  for (const json& r : g["greedy"]) {
    // The script keeps only seeds whose every step has a top-2 margin far above the tolerance, so
    // the continuation is determined and must be reproduced token for token.
    ASSERT_GT(r["min_margin"].get<float>(), 0.01f);
    const std::vector<int32_t> want = ids_of(r["generated_ids"]);
    EXPECT_EQ(greedy(*l->model, ids_of(r["prompt_ids"]), static_cast<int>(want.size())), want)
        << family << " " << format;
  }
}

INSTANTIATE_TEST_SUITE_P(Families, FamilyGolden,
                         ::testing::Combine(::testing::Values(std::string("qwen2"), std::string("qwen3"),
                                                              std::string("mistral"), std::string("gemma2"),
                                                              std::string("gemma3"), std::string("phi3"),
                                                              std::string("phi3_longrope"), std::string("gpt2")),
                                            ::testing::Values(std::string("gguf"), std::string("hf"))),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

// ---------------------------------------------------------------- hyper-parameters from both formats

TEST(Families, BothFormatsGiveTheSameHyperParameters) {
  for (const char* family : kFamilies) {
    auto g = load(family, "gguf");
    auto h = load(family, "hf");
    ASSERT_TRUE(g && h) << family;
    const ModelHParams& a = g->model->hparams();
    const ModelHParams& b = h->model->hparams();
    EXPECT_EQ(a.arch, b.arch) << family;
    EXPECT_EQ(a.n_layers, b.n_layers) << family;
    EXPECT_EQ(a.head_dim, b.head_dim) << family;
    EXPECT_EQ(a.rope_dim, b.rope_dim) << family;
    EXPECT_EQ(a.tied_embeddings, b.tied_embeddings) << family;
    EXPECT_EQ(a.max_window(), b.max_window()) << family;
    for (int l = 0; l < a.n_layers; ++l) EXPECT_EQ(a.window_of(l), b.window_of(l)) << family << " layer " << l;
    EXPECT_FLOAT_EQ(a.attention_scale(), b.attention_scale()) << family;
    EXPECT_FLOAT_EQ(a.attn_softcap, b.attn_softcap) << family;
    EXPECT_FLOAT_EQ(a.final_softcap, b.final_softcap) << family;
    EXPECT_FLOAT_EQ(a.embed_scale, b.embed_scale) << family;
    // GGUF stores Gemma's 1 + w, the checkpoint w.
    EXPECT_EQ(a.norm_weight_offset, 0.0f) << family;
    EXPECT_EQ(b.norm_weight_offset, std::string(family).rfind("gemma", 0) == 0 ? 1.0f : 0.0f) << family;
  }
  // The family rules: Gemma 2 windows layers 0, 2, ...; Gemma 3 five of every six.
  auto g2 = load("gemma2", "hf");
  ASSERT_TRUE(g2);
  for (int l = 0; l < 4; ++l) EXPECT_EQ(g2->model->hparams().window_of(l), l % 2 == 0 ? 8 : 0) << l;
  auto g3 = load("gemma3", "gguf");
  ASSERT_TRUE(g3);
  for (int l = 0; l < 6; ++l) EXPECT_EQ(g3->model->hparams().window_of(l), l == 5 ? 0 : 8) << l;
  EXPECT_FLOAT_EQ(g3->model->hparams().rope_theta_local, 10000.0f);
  EXPECT_FLOAT_EQ(g3->model->hparams().rope_theta, 1000000.0f);
}

// ---------------------------------------------------------------- attention modes

// Context encoded in `plan`'s mode by ContextEncoder on one CPU rank, then the query through
// Phase2Attention: the logits of every query position (n_query x n_vocab).
std::vector<float> run_mode(Model& model, const std::vector<int32_t>& context, const std::vector<int32_t>& query,
                            const ContextPlan& plan) {
  auto comm = make_local_communicator();
  const ModelHParams& hp = model.hparams();
  KvCache cache(model.backend(), {hp.n_layers, hp.n_kv_heads, hp.head_dim, 16, 64});
  ContextEncoder enc(model, cache, *comm);
  auto lay = enc.layout_for(static_cast<int64_t>(context.size()), plan);
  EXPECT_TRUE(lay.ok());
  const SeqId seq = 3;
  const Status st = enc.encode(seq, context, *lay, plan.mode);
  EXPECT_TRUE(st.ok()) << st.to_string();
  enc.finish(seq);
  Phase2Attention p2(model.backend(), cache, hp, *comm, MergeAlgo::kAllReduce);
  p2.register_sequence(seq, comm->rank() == lay->query_host, static_cast<int64_t>(context.size()));
  const auto pq = iota_from(static_cast<int64_t>(query.size()), static_cast<int64_t>(context.size()));
  BatchSeq q{seq, query, pq, true};
  std::vector<float> logits;
  EXPECT_TRUE(model.forward({&q, 1}, p2, &logits).ok());
  return logits;
}

// Between our own modes only the order of fp32 sums differs (tiling, the LSE merge of segments),
// so the same bound as against transformers holds with room to spare.
constexpr int64_t kContext = 72, kQuery = 8;

TEST(FamilyModes, ExactEqualsGlobalForEveryFamily) {
  for (const char* family : kFamilies) {
    auto l = load(family, "gguf");
    ASSERT_TRUE(l);
    const auto ctx = random_tokens(kContext, 11, l->model->hparams().n_vocab);
    const auto qry = random_tokens(kQuery, 12, l->model->hparams().n_vocab);
    const auto global = run_mode(*l->model, ctx, qry, {AttentionMode::kGlobal, 0, -1, 0});
    const auto exact = run_mode(*l->model, ctx, qry, {AttentionMode::kExact, 0, -1, 0});
    EXPECT_LE(max_abs_diff(exact, global), logit_tolerance(global)) << family;
    // Two star blocks: the second one's anchor is the whole first block, which is all the context
    // before it, so star is exact too, windowed layers or not.
    const auto star2 = run_mode(*l->model, ctx, qry, {AttentionMode::kStar, kContext / 2, -1, 0});
    EXPECT_LE(max_abs_diff(star2, global), logit_tolerance(global)) << family;
  }
}

// Sliding-window-only models (every layer windowed: Mistral w = 8 over 3 layers, Phi-3 w = 12 over
// 2): after L layers a token depends on the L (w - 1) positions before it. Star phase 1 computes a
// block token exactly when that receptive field lies inside its block (docs/design.md, "Model
// families"), so every query token's logits are exact when L (w - 1) <= the last block's length,
// whatever the number of blocks before it.
TEST(FamilyModes, StarIsExactWhenTheReceptiveFieldFitsTheLastBlock) {
  for (const char* family : {"mistral", "phi3"}) {
    auto l = load(family, "hf");
    ASSERT_TRUE(l);
    const ModelHParams& hp = l->model->hparams();
    for (int layer = 0; layer < hp.n_layers; ++layer) ASSERT_GT(hp.window_of(layer), 0) << family;
    const int64_t field = hp.n_layers * (hp.sliding_window - 1);
    const int block = kContext / 3;  // three blocks: the third one's anchor is not its past
    ASSERT_LE(field, block) << family;
    const auto ctx = random_tokens(kContext, 21, hp.n_vocab);
    const auto qry = random_tokens(kQuery, 22, hp.n_vocab);
    const auto global = run_mode(*l->model, ctx, qry, {AttentionMode::kGlobal, 0, -1, 0});
    const auto star = run_mode(*l->model, ctx, qry, {AttentionMode::kStar, block, -1, 0});
    EXPECT_LE(max_abs_diff(star, global), logit_tolerance(global)) << family;
    // The same comparison with blocks shorter than the receptive field is not exact: the test
    // can tell the two apart.
    const int short_block = static_cast<int>(field / 3);
    const auto star_short = run_mode(*l->model, ctx, qry, {AttentionMode::kStar, short_block, -1, 0});
    EXPECT_GT(max_abs_diff(star_short, global), 100 * logit_tolerance(global)) << family;
  }
}

// ---------------------------------------------------------------- the window and soft-cap in attention

TEST(SlidingWindowMask, VisibleKeysFollowPositions) {
  // Contiguous keys, queries at the end: key j visible to row i iff j <= i + off and i + off - j < w.
  AttentionMask m{true, 10, 4, 10, 0, 0};
  for (int64_t i = 0; i < 5; ++i) {
    for (int64_t j = 0; j < 15; ++j) EXPECT_EQ(m.visible(i, j), j <= i + 10 && i + 10 - j < 4) << i << " " << j;
  }
  // [anchor of 4 at 0..3 ; block at 20..]: the block's keys jump by 16.
  AttentionMask a{true, 4, 6, 20, 4, 16};
  EXPECT_EQ(a.first_visible(0), 4);   // position 20 sees 15..20: the block's first key only
  EXPECT_EQ(a.first_visible(3), 4);
  AttentionMask near{true, 4, 24, 20, 4, 16};
  EXPECT_EQ(near.first_visible(0), 0);  // 20 - 24 + 1 < 0: the whole anchor is inside the window
  AttentionMask mid{true, 4, 19, 20, 4, 16};
  EXPECT_EQ(mid.first_visible(0), 2);   // positions 2.. visible
}

// The tiled CPU attention against the reference with windows, gaps, soft-capping, and tiles
// wider than the window (so whole key tiles are skipped).
TEST(SlidingWindowMask, CpuAttentionMatchesReference) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int nh = 4, nkv = 2, d = 16;
  for (const auto& [n_anchor, n_keys, n_q, window, softcap] :
       std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, float>>{
           {0, 300, 300, 8, 0.0f}, {0, 600, 40, 100, 0.0f}, {16, 280, 280, 30, 2.0f}, {16, 40, 40, 0, 3.0f}}) {
    const int64_t n = n_anchor + n_keys;
    std::vector<float> q(n_q * nh * d), k(n * nkv * d), v(n * nkv * d);
    for (auto* x : {&q, &k, &v}) {
      for (float& f : *x) f = 2.0f * nd(rng);
    }
    const KvSegment seg{k.data(), v.data(), n};
    PartialAttentionParams p;
    p.q = q.data();
    p.kv = {&seg, 1};
    p.n_q = n_q;
    p.n_heads = nh;
    p.n_kv_heads = nkv;
    p.head_dim = d;
    p.scale = 0.25f;
    p.softcap = softcap;
    const int64_t block_pos = 500;  // the block's first position (its keys after the anchor)
    p.mask = {true, n - n_q, window, n_anchor > 0 ? block_pos : n - n_q, n_anchor, n_anchor > 0 ? block_pos - n_anchor : 0};
    std::vector<float> o1(n_q * nh * d), o2(o1.size()), l1(n_q * nh), l2(l1.size()), e1(l1.size()), e2(l1.size());
    p.out = o1.data();
    p.lse = l1.data();
    p.entropy = e1.data();
    partial_attention_ref(p);
    p.out = o2.data();
    p.lse = l2.data();
    p.entropy = e2.data();
    partial_attention_cpu(p);
    // fp32 sums over at most a few hundred keys in another order: 1e-4 of O(1) values.
    for (size_t i = 0; i < o1.size(); ++i) ASSERT_NEAR(o1[i], o2[i], 1e-4f) << i;
    for (size_t i = 0; i < l1.size(); ++i) {
      ASSERT_NEAR(l1[i], l2[i], 1e-4f) << i;
      ASSERT_NEAR(e1[i], e2[i], 1e-4f) << i;
    }
    if (window > 0 && n_anchor == 0) {
      // With a window of w and no gap a row sees min(w, row + 1 + offset) keys; entropy is at most
      // the log of that count.
      for (int64_t i = 0; i < n_q; ++i) {
        const double n_vis = std::min<int64_t>(window, i + 1 + n - n_q);
        EXPECT_LE(e1[i * nh], std::log(n_vis) + 1e-4) << i;
      }
    }
  }
}

TEST(SoftCap, CapsScoresBeforeTheSoftmax) {
  // One query, two keys with scores 10 and 0: capped at 2 they become 2 tanh(5) and 0.
  const int d = 1;
  std::vector<float> q = {1.0f}, k = {10.0f, 0.0f}, v = {1.0f, 0.0f};
  const KvSegment seg{k.data(), v.data(), 2};
  PartialAttentionParams p;
  float o = 0, lse = 0, ent = 0;
  p.out = &o;
  p.lse = &lse;
  p.entropy = &ent;
  p.q = q.data();
  p.kv = {&seg, 1};
  p.n_q = 1;
  p.n_heads = p.n_kv_heads = 1;
  p.head_dim = d;
  p.scale = 1.0f;
  p.softcap = 2.0f;
  p.mask = {false, 0};
  partial_attention_ref(p);
  const double s = 2.0 * std::tanh(5.0);
  const double w = std::exp(s) / (std::exp(s) + 1.0);
  EXPECT_NEAR(o, w, 1e-6);
  EXPECT_NEAR(lse, std::log(std::exp(s) + 1.0), 1e-6);
  EXPECT_NEAR(ent, -(w * std::log(w) + (1 - w) * std::log(1 - w)), 1e-6);
}

// ---------------------------------------------------------------- unsupported architectures and features

TEST(FamilyErrors, UnsupportedArchitecturesAndFeaturesNameThemselves) {
  auto expect_unimplemented = [](const std::string& cfg, const std::string& needle) {
    auto r = parse_hf_config(cfg);
    ASSERT_FALSE(r.ok()) << cfg;
    EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented) << r.status().to_string();
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().to_string();
  };
  const std::string base = R"("num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                               "num_attention_heads": 4)";
  expect_unimplemented(R"({"model_type": "falcon", )" + base + "}", "falcon");
  expect_unimplemented(R"({"model_type": "qwen2", )" + base + R"(, "rope_scaling": {"rope_type": "yarn", "factor": 4}})",
                       "yarn");
  expect_unimplemented(R"({"model_type": "gemma2", )" + base + R"(, "hidden_activation": "relu"})", "relu");
  expect_unimplemented(R"({"model_type": "qwen3", )" + base + R"(, "attention_bias": true})", "attention_bias");
}

// ---------------------------------------------------------------- LongRoPE (Phi-3)

// The tiny longrope model (tests/golden/phi3_longrope: original context 32, context 128, every
// dimension rotated) from both formats: the same scaling, the long factors in the RoPE table, and
// the attention factor of transformers' rule in the score scale. Its goldens above check the
// logits against transformers with prompts longer than 32 tokens.
TEST(FamilyLongRope, BothFormatsReadTheScaling) {
  const json cfg = json::parse(std::ifstream(family_dir("phi3_longrope") + "/hf/config.json"));
  const auto long_f = cfg["rope_parameters"]["long_factor"].get<std::vector<float>>();
  const auto short_f = cfg["rope_parameters"]["short_factor"].get<std::vector<float>>();
  const int orig = cfg["original_max_position_embeddings"].get<int>();
  const int ctx = cfg["max_position_embeddings"].get<int>();
  ASSERT_GT(ctx, orig);
  const double m = std::sqrt(1.0 + std::log(static_cast<double>(ctx) / orig) / std::log(static_cast<double>(orig)));
  for (const char* format : {"gguf", "hf"}) {
    auto l = load("phi3_longrope", format);
    ASSERT_TRUE(l) << format;
    const ModelHParams& hp = l->model->hparams();
    EXPECT_EQ(hp.rope_scaling.type, RopeScaling::Type::kLongRope) << format;
    EXPECT_EQ(hp.rope_scaling.original_context, orig) << format;
    EXPECT_TRUE(hp.rope_long_factors()) << format;
    EXPECT_NEAR(hp.rope_scaling.attn_factor, m, 1e-6) << format;
    EXPECT_NEAR(hp.attention_scale(), m * m / std::sqrt(static_cast<double>(hp.head_dim)), 1e-6) << format;
  }
  // The table: theta^(-2i/d) / long_i beyond the original context, / short_i within it.
  auto h = load("phi3_longrope", "hf");
  ASSERT_TRUE(h);
  ModelHParams hp = h->model->hparams();
  ASSERT_EQ(static_cast<int>(long_f.size()), hp.rope_dim / 2);
  for (const bool beyond : {true, false}) {
    hp.max_context = beyond ? ctx : orig;
    const std::vector<float> inv = rope_inv_freq(hp, {});
    ASSERT_EQ(inv.size(), long_f.size());
    for (size_t i = 0; i < inv.size(); ++i) {
      const double plain = std::pow(static_cast<double>(hp.rope_theta), -2.0 * static_cast<double>(i) / hp.rope_dim);
      EXPECT_NEAR(inv[i], plain / (beyond ? long_f[i] : short_f[i]), 1e-6 * plain) << i << " beyond " << beyond;
    }
  }
}

TEST(FamilyLongRope, MalformedScalingIsRefusedByName) {
  const std::string base = R"({"model_type": "phi3", "num_hidden_layers": 2, "hidden_size": 64,
                               "intermediate_size": 128, "num_attention_heads": 4, "max_position_embeddings": 128)";
  // Without the original context, or without a factor list.
  auto a = parse_hf_config(base + R"(, "rope_scaling": {"type": "longrope", "long_factor": [1], "short_factor": [1]}})");
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.status().message().find("original_max_position_embeddings"), std::string::npos) << a.status().to_string();
  auto b = parse_hf_config(base + R"(, "original_max_position_embeddings": 32,
                                     "rope_scaling": {"type": "longrope", "short_factor": [1]}})");
  ASSERT_FALSE(b.ok());
  EXPECT_NE(b.status().message().find("long_factor"), std::string::npos) << b.status().to_string();
  // "su" is the older name; the attention factor given explicitly wins over the derived one.
  auto c = parse_hf_config(base + R"(, "original_max_position_embeddings": 32,
                                     "rope_scaling": {"type": "su", "long_factor": [2], "short_factor": [1],
                                                      "attention_factor": 1.5}})");
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLongRope);
  EXPECT_FLOAT_EQ(c->rope_scaling.attn_factor, 1.5f);
  EXPECT_EQ(c->rope_scaling.long_factor, std::vector<float>{2.0f});
}

// A backend that keeps Backend's default check_features (as the CUDA backend does for now) refuses
// each family's model before uploading it, naming the first feature it lacks; the CPU backend
// has them all.
TEST(FamilyErrors, BackendWithoutTheFeaturesRefusesTheModel) {
  const std::pair<const char*, const char*> cases[] = {{"qwen2", "bias"},      {"mistral", "sliding attention window"},
                                                       {"gemma2", "GeGLU"},    {"gemma3", "GeGLU"},
                                                       {"phi3", "sliding attention window"}};
  for (const auto& [family, needle] : cases) {
    auto src = GgufWeightSource::open(family_dir(family) + "/model.gguf");
    ASSERT_TRUE(src.ok());
    testing_backend::ForwardingBackend plain(make_cpu_backend());
    auto m = create_model(**src, plain);
    ASSERT_FALSE(m.ok()) << family;
    EXPECT_EQ(m.status().code(), StatusCode::kUnimplemented) << family;
    EXPECT_NE(m.status().message().find(needle), std::string::npos) << m.status().to_string();
  }
  // Qwen3 needs nothing beyond the Llama ops: it loads on such a backend.
  auto q3 = GgufWeightSource::open(family_dir("qwen3") + "/model.gguf");
  ASSERT_TRUE(q3.ok());
  testing_backend::ForwardingBackend plain(make_cpu_backend());
  EXPECT_TRUE(create_model(**q3, plain).ok());
}

}  // namespace
}  // namespace starserve
