// GPT-2 (arch gpt2) beyond the family goldens of test_families.cpp (logits, greedy continuations,
// global / exact / star on tests/golden/gpt2): both weight formats hold the same tensors once
// Hugging Face's Conv1D weights are transposed, the learned position table bounds the context
// (a position past n_positions is refused, naming the limit), Star Attention's phase-1 blocks take
// their tokens' global positions for the position embeddings, and the config keys GPT-2 has that
// the blocks here do not implement are refused by name.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "kernels/ref/ops_ref.h"
#include "model/gguf_source.h"
#include "model/hf_source.h"
#include "star/context_encoder.h"
#include "star/local_attention.h"
#include "family_golden.h"
#include "forwarding_backend.h"

namespace starserve {
namespace {

using namespace family_golden;

struct Gpt2 {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  std::unique_ptr<WeightSource> source;
  std::unique_ptr<Model> model;
};

std::unique_ptr<WeightSource> open_source(const std::string& format) {
  if (format == "gguf") {
    auto s = GgufWeightSource::open(family_dir("gpt2") + "/model.gguf");
    EXPECT_TRUE(s.ok()) << s.status().to_string();
    return s.ok() ? std::unique_ptr<WeightSource>(std::move(s).value()) : nullptr;
  }
  auto s = HfWeightSource::open(family_dir("gpt2") + "/hf");
  EXPECT_TRUE(s.ok()) << s.status().to_string();
  return s.ok() ? std::unique_ptr<WeightSource>(std::move(s).value()) : nullptr;
}

std::unique_ptr<Gpt2> load(const std::string& format) {
  auto g = std::make_unique<Gpt2>();
  g->source = open_source(format);
  if (!g->source) return nullptr;
  auto m = create_model(*g->source, *g->backend);
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  if (!m.ok()) return nullptr;
  g->model = std::move(m).value();
  return g;
}

KvCache make_cache(Model& model, int64_t pages = 64) {
  const ModelHParams& hp = model.hparams();
  return KvCache(model.backend(), {hp.n_layers, hp.n_kv_heads, hp.head_dim, 16, pages});
}

// The references of GPT-2's two ops on hand cases: LayerNorm's closed form, and the plain GELU
// equal to GeGLU's with up = 1.
TEST(Gpt2Ops, LayerNormAndGeluReferences) {
  // Row [1, 2, 3, 4]: mean 2.5, biased variance 1.25; a constant row gives the bias.
  const std::vector<float> x = {1, 2, 3, 4, 7, 7, 7, 7}, w = {1, 2, -1, 0.5f}, b = {0, 1, 0, -1};
  std::vector<float> y(8);
  layer_norm_ref(y.data(), x.data(), w.data(), b.data(), 2, 4, 1e-5f);
  const double inv = 1.0 / std::sqrt(1.25 + 1e-5);
  for (int c = 0; c < 4; ++c) {
    EXPECT_NEAR(y[c], (x[c] - 2.5) * inv * w[c] + b[c], 1e-6) << c;
    EXPECT_FLOAT_EQ(y[4 + c], b[c]) << c;
  }
  std::vector<float> in_place = x;  // in place: the same result
  layer_norm_ref(in_place.data(), in_place.data(), w.data(), b.data(), 2, 4, 1e-5f);
  EXPECT_EQ(in_place, y);
  const std::vector<float> g = {-6.0f, -1.0f, -0.1f, 0.0f, 0.3f, 1.0f, 2.5f, 8.0f}, ones(g.size(), 1.0f);
  std::vector<float> a(g.size()), m(g.size());
  gelu_tanh_ref(a.data(), g.data(), static_cast<int64_t>(g.size()));
  gelu_tanh_mul_ref(m.data(), g.data(), ones.data(), static_cast<int64_t>(g.size()));
  EXPECT_EQ(a, m);
  EXPECT_EQ(a[3], 0.0f);
  EXPECT_NEAR(a[5], 0.841192, 1e-5);  // 0.5 (1 + tanh(sqrt(2/pi) 1.044715))
}

TEST(Gpt2, HyperParametersFromBothFormats) {
  const nlohmann::json cfg = nlohmann::json::parse(std::ifstream(family_dir("gpt2") + "/hf/config.json"));
  for (const char* format : {"gguf", "hf"}) {
    auto g = load(format);
    ASSERT_TRUE(g) << format;
    const ModelHParams& hp = g->model->hparams();
    EXPECT_EQ(hp.arch, "gpt2") << format;
    EXPECT_EQ(hp.n_layers, cfg["n_layer"].get<int>()) << format;
    EXPECT_EQ(hp.hidden, cfg["n_embd"].get<int>()) << format;
    EXPECT_EQ(hp.n_heads, cfg["n_head"].get<int>()) << format;
    EXPECT_EQ(hp.n_kv_heads, hp.n_heads) << format;
    EXPECT_EQ(hp.ffn_hidden, 4 * hp.hidden) << format;  // n_inner null: 4 n_embd
    EXPECT_EQ(hp.max_context, cfg["n_positions"].get<int>()) << format;
    EXPECT_FLOAT_EQ(hp.rms_eps, cfg["layer_norm_epsilon"].get<float>()) << format;
    EXPECT_TRUE(hp.learned_positions && hp.layer_norm && hp.tied_embeddings) << format;
    EXPECT_EQ(hp.rope_dim, 0) << format;
  }
}

// llama.cpp's GGUF holds the projections as (out, in); the Hugging Face checkpoint as Conv1D
// (in, out). After the source's transposition every tensor of one equals the other's (the weights
// are float16-exact in both files), so the model sees the same matrices from either.
TEST(Gpt2, HfConv1DWeightsAreTransposedToTheGgufLayout) {
  auto gguf = open_source("gguf");
  auto hf = open_source("hf");
  ASSERT_TRUE(gguf && hf);
  const ModelHParams& hp = hf->hparams();
  std::vector<std::string> names = {"token_embd.weight", "position_embd.weight", "output_norm.weight",
                                    "output_norm.bias"};
  for (int l = 0; l < hp.n_layers; ++l) {
    for (const char* leaf : {"attn_norm.weight", "attn_norm.bias", "attn_qkv.weight", "attn_qkv.bias",
                             "attn_output.weight", "attn_output.bias", "ffn_norm.weight", "ffn_norm.bias",
                             "ffn_up.weight", "ffn_up.bias", "ffn_down.weight", "ffn_down.bias"}) {
      names.push_back("blk." + std::to_string(l) + "." + leaf);
    }
  }
  for (const std::string& n : names) {
    auto a = gguf->load(n);
    auto b = hf->load(n);
    ASSERT_TRUE(a.ok() && b.ok()) << n << ": " << a.status().to_string() << " / " << b.status().to_string();
    EXPECT_EQ(a->shape, b->shape) << n;
    EXPECT_EQ(a->data, b->data) << n;
  }
  // The (out, in) shapes of the fused projection and the MLP.
  auto qkv = hf->load("blk.0.attn_qkv.weight");
  ASSERT_TRUE(qkv.ok());
  EXPECT_EQ(qkv->shape, (std::vector<int64_t>{3 * int64_t{hp.hidden}, hp.hidden}));
  auto up = hf->load("blk.0.ffn_up.weight");
  ASSERT_TRUE(up.ok());
  EXPECT_EQ(up->shape, (std::vector<int64_t>{hp.ffn_hidden, hp.hidden}));
  EXPECT_FALSE(hf->has("output.weight"));
  EXPECT_FALSE(gguf->has("output.weight"));
}

// n_positions tokens fit; one more is refused with INVALID_ARGUMENT naming the table, in a prefill
// and in a decode step past the end, before anything runs.
TEST(Gpt2, PositionsPastTheLearnedTableAreRefused) {
  for (const char* format : {"gguf", "hf"}) {
    auto g = load(format);
    ASSERT_TRUE(g);
    Model& m = *g->model;
    const int n = m.hparams().max_context;
    {
      KvCache cache = make_cache(m);
      LocalAttention attn(m.backend(), cache, m.hparams());
      const auto ids = random_tokens(n + 1, 5, m.hparams().n_vocab);
      const auto pos = iota_from(n + 1, 0);
      BatchSeq bs{1, ids, pos, false};
      std::vector<float> logits;
      const Status st = m.forward({&bs, 1}, attn, &logits);
      ASSERT_FALSE(st.ok()) << format;
      EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.to_string();
      EXPECT_NE(st.message().find("position " + std::to_string(n)), std::string::npos) << st.to_string();
      EXPECT_NE(st.message().find(std::to_string(n) + " learned positions"), std::string::npos) << st.to_string();
      EXPECT_FALSE(cache.has(1)) << "nothing was written for the refused call";
    }
    KvCache cache = make_cache(m);
    LocalAttention attn(m.backend(), cache, m.hparams());
    const auto ids = random_tokens(n, 6, m.hparams().n_vocab);
    const auto pos = iota_from(n, 0);
    BatchSeq full{1, ids, pos, false};
    std::vector<float> logits;
    const Status ok = m.forward({&full, 1}, attn, &logits);
    ASSERT_TRUE(ok.ok()) << ok.to_string();
    ASSERT_EQ(logits.size(), static_cast<size_t>(m.hparams().n_vocab));
    for (float v : logits) ASSERT_TRUE(std::isfinite(v));
    const std::vector<int32_t> next = {ids[0]}, next_pos = {n};
    BatchSeq step{1, next, next_pos, false};
    const Status st = m.forward({&step, 1}, attn, &logits);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.to_string();
  }
}

// Star phase 1 runs each block as [anchor ; block] with the block's tokens at their places in the
// context. Layer 0's keys and values depend on nothing but each token's own embedding plus its
// position row, so they equal global attention's for every block token only if the block took its
// global positions (with positions counted from the anchor they would be another table row's).
// Deeper layers attend to an anchor in place of the whole past and differ, which shows the
// comparison can fail.
TEST(Gpt2, StarBlocksTakeTheirGlobalPositions) {
  auto g = load("hf");
  ASSERT_TRUE(g);
  Model& m = *g->model;
  const ModelHParams& hp = m.hparams();
  const int64_t n_context = 72, block = 24;
  const auto ctx = random_tokens(n_context, 31, hp.n_vocab);
  auto comm = make_local_communicator();
  auto encode = [&](KvCache& cache, const ContextPlan& plan) {
    ContextEncoder enc(m, cache, *comm);
    auto lay = enc.layout_for(n_context, plan);
    ASSERT_TRUE(lay.ok()) << lay.status().to_string();
    const Status st = enc.encode(7, ctx, *lay, plan.mode);
    ASSERT_TRUE(st.ok()) << st.to_string();
    enc.finish(7);
  };
  KvCache global = make_cache(m), star = make_cache(m);
  encode(global, {AttentionMode::kGlobal, 0, -1, 0});
  encode(star, {AttentionMode::kStar, static_cast<int>(block), -1, 0});
  auto rows = [&](const KvCache& cache, int layer, int64_t begin, int64_t end) {
    std::vector<float> k, v;
    for (const KvView& s : cache.segments(layer, 7, begin, end)) {
      k.insert(k.end(), s.k.f32(), s.k.f32() + s.k.numel());
      v.insert(v.end(), s.v.f32(), s.v.f32() + s.v.numel());
    }
    k.insert(k.end(), v.begin(), v.end());
    return k;
  };
  // The third block (positions 48..71): its anchor is the first block, not its past.
  const auto g0 = rows(global, 0, 2 * block, n_context), s0 = rows(star, 0, 2 * block, n_context);
  ASSERT_EQ(g0.size(), static_cast<size_t>(block * 2 * hp.n_kv_heads * hp.head_dim));
  EXPECT_LE(max_abs_diff(s0, g0), logit_tolerance(g0));
  // The same tokens at positions 0.. (as a block would have them counted from its own start) give
  // other layer-0 rows: the comparison above tells positions apart.
  KvCache local = make_cache(m);
  {
    LocalAttention attn(m.backend(), local, hp);
    const std::vector<int32_t> tokens(ctx.begin() + 2 * block, ctx.end());
    const auto pos = iota_from(block, 0);
    BatchSeq bs{7, tokens, pos, false};
    ASSERT_TRUE(m.forward({&bs, 1}, attn, nullptr).ok());
  }
  const auto l0 = rows(local, 0, 0, block);
  ASSERT_EQ(l0.size(), g0.size());
  EXPECT_GT(max_abs_diff(l0, g0), 100 * logit_tolerance(g0));
  const int last = hp.n_layers - 1;
  const auto gl = rows(global, last, 2 * block, n_context), sl = rows(star, last, 2 * block, n_context);
  EXPECT_GT(max_abs_diff(sl, gl), 100 * logit_tolerance(gl));
}

TEST(Gpt2, UnsupportedConfigKeysAreRefusedByName) {
  const std::string base = R"({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32)";
  auto ok = parse_hf_config(base + "}");
  ASSERT_TRUE(ok.ok()) << ok.status().to_string();
  EXPECT_EQ(ok->ffn_hidden, 256);
  EXPECT_EQ(ok->n_vocab, 50257);  // GPT2Config's default
  for (const auto& [extra, needle] : std::vector<std::pair<std::string, std::string>>{
           {R"("activation_function": "gelu")", "activation_function 'gelu'"},
           {R"("activation_function": "relu")", "relu"},
           {R"("scale_attn_by_inverse_layer_idx": true)", "scale_attn_by_inverse_layer_idx"},
           {R"("scale_attn_weights": false)", "scale_attn_weights"},
           {R"("add_cross_attention": true)", "add_cross_attention"}}) {
    auto r = parse_hf_config(base + ", " + extra + "}");
    ASSERT_FALSE(r.ok()) << extra;
    EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented) << r.status().to_string();
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().to_string();
  }
  auto bad = parse_hf_config(R"({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 5})");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("n_head 5"), std::string::npos) << bad.status().to_string();
}

// A backend without LayerNorm / GELU (Backend's default check_features) refuses the model before
// uploading it; the CPU backend has both.
TEST(Gpt2, BackendWithoutTheOpsRefusesTheModel) {
  auto src = open_source("gguf");
  ASSERT_TRUE(src);
  testing_backend::ForwardingBackend plain(make_cpu_backend());
  auto m = create_model(*src, plain);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kUnimplemented);
  BackendFeatures ln;
  ln.layer_norm = true;
  const Status st = plain.check_features(ln);
  EXPECT_EQ(st.code(), StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("layer_norm"), std::string::npos) << st.to_string();
  EXPECT_TRUE(make_cpu_backend()->check_features(ln).ok());
}

}  // namespace
}  // namespace starserve
