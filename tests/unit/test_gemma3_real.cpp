// The real Gemma-3-270M (models/gemma-3-270m-q4_k_m.gguf: Q8_0 embeddings, Q5_0 / Q4_K / Q6_K /
// Q8_0 matrices) on the CPU backend against Hugging Face transformers, which loads the same GGUF
// through the gguf package: tests/golden/gemma3_real/golden.json, made by
// scripts/golden/make_gemma3_real_golden.py. scripts/test.sh fetches the model; without it the
// tests say SKIPPED.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "model/loader.h"
#include "star/context_encoder.h"
#include "star/local_attention.h"
#include "star/star_attention.h"

namespace starserve {
namespace {

using nlohmann::json;

const json& golden() {
  static const json g = [] {
    std::ifstream in(std::string(STARSERVE_GOLDEN_DIR) + "/gemma3_real/golden.json");
    EXPECT_TRUE(in.good()) << "cannot open tests/golden/gemma3_real/golden.json";
    return json::parse(in);
  }();
  return g;
}

struct Loaded {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  ModelFiles files;
  std::unique_ptr<Model> model;
  std::string error;
};

Loaded* gemma3() {
  static Loaded* loaded = [] {
    auto* l = new Loaded;
    auto files = open_model_files(STARSERVE_GEMMA3_MODEL);
    if (!files.ok()) {
      l->error = files.status().to_string();
      return l;
    }
    l->files = std::move(files).value();
    auto m = create_model(*l->files.weights, *l->backend);
    if (m.ok()) {
      l->model = std::move(m).value();
    } else {
      l->error = m.status().to_string();
    }
    return l;
  }();
  return loaded;
}

// Absent file: SKIPPED with what to run. A present file that does not load is a failure.
#define REQUIRE_GEMMA3()                                                                                \
  do {                                                                                                  \
    if (!std::filesystem::exists(STARSERVE_GEMMA3_MODEL)) {                                             \
      GTEST_SKIP() << STARSERVE_GEMMA3_MODEL " is absent (scripts/setup.sh or scripts/test.sh fetch it)"; \
    }                                                                                                   \
    ASSERT_TRUE(gemma3()->model) << "cannot load " STARSERVE_GEMMA3_MODEL ": " << gemma3()->error;      \
  } while (0)

// Tolerance. Both sides dequantize the same blocks to the same fp32 values (our dequantizers are
// bit-identical to gguf-py's, tests/unit/test_dequant.cpp) and compute in fp32, so they evaluate
// one function and differ only in summation order (BLAS blocking vs torch's, our tiled attention
// vs eager softmax(QK^T)V). A dot product of length K (640 .. 2048 here) carries a relative error
// of about sqrt(K) * 2^-24 ~ 3e-6; 18 sandwich blocks, each renormalising its input, keep that
// relative to the activation scale rather than compounding it, so logits agree to ~1e-5 of their
// magnitude. We allow 1e-4 of the position's largest |logit| (about 3e-3 at the |logit| ~ 30 of
// this model): ten times that estimate, and far below what a real error makes (a wrong RoPE base
// on the local layers, a missing (1 + w), the embedding scale or a mis-decoded quant block moves
// logits by whole units).
constexpr float kRelTol = 1e-4f;

float tolerance_for(float max_abs_logit) { return kRelTol * max_abs_logit; }

std::vector<int32_t> iota_from(int64_t n, int64_t start) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), static_cast<int32_t>(start));
  return p;
}

// Largest |ours - golden| over the golden's top-k list and its sampled ids (the last position's).
float worst_vs_golden(const float* logits, const json& top_k, const json* sample_logits) {
  float worst = 0.0f;
  for (const json& tk : top_k) worst = std::max(worst, std::abs(logits[tk[0].get<int>()] - tk[1].get<float>()));
  if (sample_logits != nullptr) {
    const auto ids = golden()["sample_ids"].get<std::vector<int32_t>>();
    const auto want = sample_logits->get<std::vector<float>>();
    for (size_t i = 0; i < ids.size(); ++i) worst = std::max(worst, std::abs(logits[ids[i]] - want[i]));
  }
  return worst;
}

// Every prompt tokenizes as transformers' tokenizer of the same GGUF does; the logits at the
// golden's positions (one forward, all positions) match its top-k, the last position also on 512
// sampled ids and in the full-vocabulary statistics.
TEST(Gemma3Real, PromptLogitsMatchTransformers) {
  REQUIRE_GEMMA3();
  const json& g = golden();
  Model& model = *gemma3()->model;
  const ModelHParams& hp = model.hparams();
  ASSERT_EQ(hp.n_vocab, g["n_vocab"].get<int64_t>());
  for (const json& p : g["prompts"]) {
    const std::string name = p["name"];
    const auto ids = p["token_ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(gemma3()->files.tokenizer->encode(p["text"].get<std::string>(), true, true), ids) << name;

    KvCache cache(model.backend(), {hp.n_layers, hp.n_kv_heads, hp.head_dim, 64, 64});
    LocalAttention attn(model.backend(), cache, hp);
    const auto pos = iota_from(static_cast<int64_t>(ids.size()), 0);
    BatchSeq bs{1, ids, pos, true};
    std::vector<float> logits;
    ASSERT_TRUE(model.forward({&bs, 1}, attn, &logits).ok()) << name;
    ASSERT_EQ(logits.size(), ids.size() * static_cast<size_t>(hp.n_vocab)) << name;

    const json& last = p["last"];
    const float tol = tolerance_for(last["max_abs"].get<float>());
    for (const json& at : p["positions"]) {
      const int at_pos = at["pos"];
      const float* row = logits.data() + static_cast<size_t>(at_pos) * hp.n_vocab;
      const bool is_last = at_pos == last["pos"].get<int>();
      const float worst = worst_vs_golden(row, at["top_k"], is_last ? &last["sample_logits"] : nullptr);
      EXPECT_LE(worst, tol) << name << " position " << at_pos << ": largest |ours - transformers|";
      std::printf("[gemma3] %s pos %d: max |diff| %.3g (tolerance %.3g)\n", name.c_str(), at_pos, worst, tol);
      EXPECT_EQ(std::max_element(row, row + hp.n_vocab) - row, at["top_k"][0][0].get<int>()) << name << " " << at_pos;
    }
    // Whole vocabulary at the last position: these statistics see every one of the 262144 logits.
    const float* row = logits.data() + static_cast<size_t>(last["pos"].get<int>()) * hp.n_vocab;
    double mx = row[0], mn = row[0], mx_abs = 0, sum = 0, sq = 0;
    for (int64_t v = 0; v < hp.n_vocab; ++v) {
      mx = std::max<double>(mx, row[v]);
      mn = std::min<double>(mn, row[v]);
      mx_abs = std::max<double>(mx_abs, std::abs(row[v]));
      sum += row[v];
      sq += static_cast<double>(row[v]) * row[v];
    }
    double z = 0;
    for (int64_t v = 0; v < hp.n_vocab; ++v) z += std::exp(row[v] - mx);
    EXPECT_EQ(std::max_element(row, row + hp.n_vocab) - row, last["argmax"].get<int>()) << name;
    EXPECT_NEAR(mx, last["max"].get<double>(), tol) << name;
    EXPECT_NEAR(mn, last["min"].get<double>(), tol) << name;
    EXPECT_NEAR(mx_abs, last["max_abs"].get<double>(), tol) << name;
    EXPECT_NEAR(sum / hp.n_vocab, last["mean"].get<double>(), tol) << name;
    EXPECT_NEAR(std::sqrt(sq / hp.n_vocab), last["rms"].get<double>(), tol) << name;
    EXPECT_NEAR(mx + std::log(z), last["logsumexp"].get<double>(), tol) << name;
  }
}

// Greedy decoding through the KV cache (one prompt forward, then one token per step) reproduces
// transformers' continuation, which recomputes the whole sequence each step, token for token.
TEST(Gemma3Real, GreedyContinuationsMatchTransformers) {
  REQUIRE_GEMMA3();
  Model& model = *gemma3()->model;
  const Tokenizer& tok = *gemma3()->files.tokenizer;
  const ModelHParams& hp = model.hparams();
  for (const json& p : golden()["prompts"]) {
    const std::string name = p["name"];
    const auto prompt = p["token_ids"].get<std::vector<int32_t>>();
    const auto want = p["greedy"]["generated_ids"].get<std::vector<int32_t>>();
    // The smallest top-1/top-2 margin must exceed the logit tolerance, or a tie could flip.
    ASSERT_GT(p["greedy"]["min_margin"].get<float>(), 2 * tolerance_for(p["last"]["max_abs"].get<float>())) << name;
    KvCache cache(model.backend(), {hp.n_layers, hp.n_kv_heads, hp.head_dim, 64, 64});
    LocalAttention attn(model.backend(), cache, hp);
    std::vector<int32_t> got, step = prompt;
    std::vector<float> logits;
    int32_t pos0 = 0;
    while (got.size() < want.size()) {
      const auto pos = iota_from(static_cast<int64_t>(step.size()), pos0);
      BatchSeq bs{1, step, pos, false};
      ASSERT_TRUE(model.forward({&bs, 1}, attn, &logits).ok()) << name;
      pos0 += static_cast<int32_t>(step.size());
      const auto next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      got.push_back(next);
      if (tok.is_end_of_generation(next)) break;
      step.assign(1, next);
    }
    EXPECT_EQ(got, want) << name << ": ours " << tok.decode(got);
    EXPECT_EQ(tok.decode(got), tok.decode(want)) << name;
  }
}

// The context/query split the engine uses: the prompt's context encoded by ContextEncoder in
// global, exact and star (two blocks, the second anchored on the first: exact for Gemma 3's
// windowed layers too while the context is shorter than the 512-token window) on one rank, the
// last tokens as the query through Phase2Attention. The last query position matches the golden.
TEST(Gemma3Real, AttentionModesMatchTransformers) {
  REQUIRE_GEMMA3();
  Model& model = *gemma3()->model;
  const ModelHParams& hp = model.hparams();
  auto comm = make_local_communicator();
  for (const json& p : golden()["prompts"]) {
    const std::string name = p["name"];
    const auto ids = p["token_ids"].get<std::vector<int32_t>>();
    const int64_t n_query = 4, n_context = static_cast<int64_t>(ids.size()) - n_query;
    const std::vector<int32_t> context(ids.begin(), ids.begin() + n_context), query(ids.begin() + n_context, ids.end());
    const json& last = p["last"];
    const float tol = tolerance_for(last["max_abs"].get<float>());
    const ContextPlan plans[] = {{AttentionMode::kGlobal, 0, -1, 0},
                                 {AttentionMode::kExact, 0, -1, 0},
                                 {AttentionMode::kStar, static_cast<int>((n_context + 1) / 2), -1, 0}};
    for (const ContextPlan& plan : plans) {
      KvCache cache(model.backend(), {hp.n_layers, hp.n_kv_heads, hp.head_dim, 16, 64});
      ContextEncoder enc(model, cache, *comm);
      auto lay = enc.layout_for(n_context, plan);
      ASSERT_TRUE(lay.ok()) << lay.status().to_string();
      const SeqId seq = 5;
      const Status st = enc.encode(seq, context, *lay, plan.mode);
      ASSERT_TRUE(st.ok()) << st.to_string();
      enc.finish(seq);
      Phase2Attention p2(model.backend(), cache, hp, *comm, MergeAlgo::kAllReduce);
      p2.register_sequence(seq, comm->rank() == lay->query_host, n_context);
      const auto pq = iota_from(n_query, n_context);
      BatchSeq q{seq, query, pq, false};
      std::vector<float> logits;
      ASSERT_TRUE(model.forward({&q, 1}, p2, &logits).ok()) << name;
      ASSERT_EQ(logits.size(), static_cast<size_t>(hp.n_vocab));
      const json& top = p["positions"].back();
      ASSERT_EQ(top["pos"].get<int>(), last["pos"].get<int>());
      const float worst = worst_vs_golden(logits.data(), top["top_k"], &last["sample_logits"]);
      EXPECT_LE(worst, tol) << name << " mode " << static_cast<int>(plan.mode);
      EXPECT_EQ(std::max_element(logits.begin(), logits.end()) - logits.begin(), last["argmax"].get<int>()) << name;
      std::printf("[gemma3] %s mode %d (%lld context + %lld query): max |diff| %.3g\n", name.c_str(),
                  static_cast<int>(plan.mode), static_cast<long long>(n_context), static_cast<long long>(n_query), worst);
    }
  }
}

}  // namespace
}  // namespace starserve
