// The LayerNorm-free GPT-2 (arch gpt2_lnfree, docs/specs/lnfree-gpt2.md) against
// tests/golden/lnfree (scripts/reference/starref/gpt2.py, float32, from the exported files): the
// last-position logits, prompt log-probabilities and the per-layer x head attention entropy of
// each prompt, and the greedy continuations through decode steps; the attention modes (global,
// exact, star) on one CPU rank against the same golden; the temperature op's reference; and the
// config and backend refusals.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "kernels/ref/ops_ref.h"
#include "model/gguf_source.h"
#include "model/hf_source.h"
#include "model/tokenizer_gguf.h"
#include "model/token_scores.h"
#include "star/attention_stats.h"
#include "star/context_encoder.h"
#include "star/local_attention.h"
#include "star/star_attention.h"
#include "family_golden.h"
#include "forwarding_backend.h"

namespace starserve {
namespace {

using nlohmann::json;
using namespace family_golden;

struct LnFree {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  std::unique_ptr<WeightSource> source;
  std::unique_ptr<Model> model;
};

// The golden's Hugging Face folder, or (gguf) the same weights in tests/golden/lnfree/model.gguf, written from it by
// scripts/lnfree_to_gguf.py in float32 (its README).
std::unique_ptr<LnFree> load(bool gguf = false) {
  auto g = std::make_unique<LnFree>();
  const auto opened = [&](auto r) -> bool {
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    if (r.ok()) g->source = std::move(r).value();
    return r.ok();
  };
  if (!(gguf ? opened(GgufWeightSource::open(family_dir("lnfree") + "/model.gguf"))
             : opened(HfWeightSource::open(family_dir("lnfree") + "/hf")))) {
    return nullptr;
  }
  auto m = create_model(*g->source, *g->backend);
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  if (!m.ok()) return nullptr;
  g->model = std::move(m).value();
  return g;
}

KvCache make_cache(Model& model) {
  const ModelHParams& hp = model.hparams();
  return KvCache(model.backend(), {hp.n_layers, hp.n_kv_heads, hp.head_dim, 16, 64});
}

std::vector<int32_t> ids_of(const json& a) { return a.get<std::vector<int32_t>>(); }

// One prefill of the prompt with global attention: its last-position logits, the log-probability
// of each next prompt token, and the entropy map of its rows.
struct PromptRun {
  std::vector<float> last_logits;
  std::vector<float> logprobs;
  EntropyStats entropy;
};

PromptRun run_prompt(Model& model, const std::vector<int32_t>& ids) {
  const ModelHParams& hp = model.hparams();
  KvCache cache = make_cache(model);
  LocalAttention attn(model.backend(), cache, hp);
  PromptRun r;
  r.entropy.reset(hp.n_layers, hp.n_heads);
  attn.track_entropy(1, &r.entropy);
  std::vector<int32_t> targets(ids.begin() + 1, ids.end());
  targets.push_back(-1);  // the last token has no next prompt token
  std::vector<ScoredToken> scored;
  ScoreRequest req{targets, 0, &scored};
  const auto pos = iota_from(static_cast<int64_t>(ids.size()), 0);
  BatchSeq bs{1, ids, pos, false, &req};
  const Status st = model.forward({&bs, 1}, attn, &r.last_logits);
  EXPECT_TRUE(st.ok()) << st.to_string();
  for (const ScoredToken& s : scored) r.logprobs.push_back(s.logprob);
  return r;
}

// The prompt in one forward, then one token per step through the KV cache: each step's query row
// takes the temperature column of its own position.
std::vector<int32_t> greedy(Model& model, const std::vector<int32_t>& prompt, int n_new) {
  KvCache cache = make_cache(model);
  LocalAttention attn(model.backend(), cache, model.hparams());
  std::vector<int32_t> out, toks = prompt;
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

// Tolerances. Logits: family_golden's logit_tolerance (2e-5 of the largest |logit|); the golden's
// fp64_max_abs_diff (float32 against float64 on the same files, <= 2.1e-5 with logits up to ~32)
// is the scale of an honest float32 error and lies well inside it, while a temperature not
// applied moves the logits by no_temperature_max_abs_diff (2.4 and more), checked to be far
// outside. Log-probabilities: logprob_t = z_t - logsumexp(z) moves by at most twice the largest
// logit error. Entropy: H = logsumexp(s) - sum_j a_j s_j of a row's attention scores s; a
// perturbation ds changes it by -sum_j a_j (s_j - mean_a s) ds_j, so |dH| <= (max s - min s) *
// max |ds|. The scores carry the same float32 relative error as the logits (~1e-6 of their scale
// after two layers) and span at most a few tens with t >= 0.3, which bounds |dH| by a few 1e-5;
// 2e-4 nats is several times that and still far below what a wrong temperature column, a missing
// bias or a wrong residual scale does to a head's mean entropy (tenths of a nat).
constexpr double kEntropyTolerance = 2e-4;

float logprob_tolerance(const std::vector<float>& last_logits) { return 2.0f * logit_tolerance(last_logits); }

TEST(Gpt2LnFreeOps, HeadTemperatureReferenceAndCpuBackend) {
  // x: 2 tokens x 2 heads x 3 dims; the temperature table has 4 positions per head.
  const std::vector<float> t = {0.5f, 2.0f, 4.0f, 0.25f,  // head 0
                                1.5f, -2.0f, 8.0f, 3.0f};  // head 1
  const std::vector<int32_t> positions = {3, 1};
  std::vector<float> x = {1, 2, 3, 4, 5, 6, -1, 0.5f, 7, 2, -4, 1};
  const std::vector<float> x0 = x;
  head_temperature_ref(x.data(), t.data(), positions.data(), 2, 2, 3, 4);
  for (int i = 0; i < 2; ++i) {
    for (int h = 0; h < 2; ++h) {
      const float div = t[h * 4 + positions[i]];
      for (int d = 0; d < 3; ++d) {
        const size_t k = static_cast<size_t>((i * 2 + h) * 3 + d);
        EXPECT_FLOAT_EQ(x[k], x0[k] / div) << i << " " << h << " " << d;
      }
    }
  }
  // The CPU backend's op gives the reference's values.
  auto be = make_cpu_backend();
  DeviceBuffer xb = be->alloc(x0.size() * sizeof(float)), tb = be->alloc(t.size() * sizeof(float));
  const Tensor xt = xb.view(DType::kF32, {2, 2, 3}), tt = tb.view(DType::kF32, {2, 4});
  be->upload_f32(xt, x0.data());
  be->upload_f32(tt, t.data());
  be->head_temperature(xt, tt, positions);
  std::vector<float> got(x0.size());
  be->download_f32(got.data(), xt);
  EXPECT_EQ(got, x);
}

TEST(Gpt2LnFree, HyperParametersFromTheConfig) {
  const json cfg = json::parse(std::ifstream(family_dir("lnfree") + "/hf/config.json"));
  auto g = load();
  ASSERT_TRUE(g);
  const ModelHParams& hp = g->model->hparams();
  EXPECT_EQ(hp.arch, "gpt2_lnfree");
  EXPECT_EQ(hp.n_layers, cfg["n_layer"].get<int>());
  EXPECT_EQ(hp.hidden, cfg["n_embd"].get<int>());
  EXPECT_EQ(hp.n_heads, cfg["n_head"].get<int>());
  EXPECT_EQ(hp.max_context, cfg["n_positions"].get<int>());
  EXPECT_EQ(hp.n_vocab, cfg["vocab_size"].get<int>());
  EXPECT_TRUE(hp.learned_positions && hp.tied_embeddings);
  EXPECT_FALSE(hp.layer_norm);
  EXPECT_EQ(hp.attn_temperature, cfg["lnfree_attn_temperature"].get<bool>());
  EXPECT_TRUE(hp.attn_temperature) << "the golden is meant to exercise the temperature";
  // The file's per-layer tensors under their canonical names.
  for (const char* leaf : {"ffn_fused.weight", "ffn_fused.bias", "ffn_alpha", "ffn_beta", "attn_temperature"}) {
    EXPECT_TRUE(g->source->has(std::string("blk.1.") + leaf)) << leaf;
  }
  EXPECT_FALSE(g->source->has("output_norm.weight"));
}

TEST(Gpt2LnFree, LastLogitsLogprobsAndEntropyMatchTheReference) {
  const json g = read_golden("lnfree");
  auto l = load();
  ASSERT_TRUE(l);
  const ModelHParams& hp = l->model->hparams();
  ASSERT_EQ(g["n_vocab"].get<int>(), hp.n_vocab);
  for (const json& p : g["prompts"]) {
    const std::vector<int32_t> ids = ids_of(p["token_ids"]);
    const std::vector<float> want = p["last_logits"].get<std::vector<float>>();
    const float tol = logit_tolerance(want);
    // The comparison can tell a missing temperature, and float32 noise lies inside it.
    EXPECT_GT(p["no_temperature_max_abs_diff"].get<float>(), 100 * tol);
    EXPECT_LT(p["fp64_max_abs_diff"].get<float>(), tol);
    const PromptRun r = run_prompt(*l->model, ids);
    const std::string what = "prompt of " + std::to_string(ids.size()) + " tokens";
    EXPECT_LE(max_abs_diff(r.last_logits, want), tol) << what;

    const std::vector<float> lp = p["prompt_logprobs"].get<std::vector<float>>();
    ASSERT_EQ(r.logprobs.size(), lp.size()) << what;
    EXPECT_LE(max_abs_diff(r.logprobs, lp), logprob_tolerance(want)) << what;

    const json& ent = p["entropy"];
    ASSERT_EQ(ent.size(), static_cast<size_t>(hp.n_layers));
    for (int layer = 0; layer < hp.n_layers; ++layer) {
      ASSERT_EQ(ent[layer].size(), static_cast<size_t>(hp.n_heads));
      for (int h = 0; h < hp.n_heads; ++h) {
        EXPECT_EQ(r.entropy.count[static_cast<size_t>(layer) * hp.n_heads + h], static_cast<int64_t>(ids.size()));
        EXPECT_NEAR(r.entropy.mean(layer, h), ent[layer][h].get<double>(), kEntropyTolerance)
            << what << ", layer " << layer << ", head " << h;
      }
    }
  }
}

TEST(Gpt2LnFree, GreedyContinuationsMatchTheReference) {
  const json g = read_golden("lnfree");
  auto l = load();
  ASSERT_TRUE(l);
  ASSERT_FALSE(g["greedy"].empty());
  for (const json& r : g["greedy"]) {
    // Every step's top-2 margin is far above the logits tolerance, so the tokens are determined.
    ASSERT_GT(r["min_margin"].get<float>(), 0.01f);
    const std::vector<int32_t> want = ids_of(r["generated_ids"]);
    EXPECT_EQ(greedy(*l->model, ids_of(r["prompt_ids"]), static_cast<int>(want.size())), want);
  }
}

// The GGUF form (scripts/lnfree_to_gguf.py, float32): the same hyper-parameters, and the same numbers as the folder
// bit for bit (the converter only transposes the Conv1D matrices back to (out, in), which the folder's loader does
// too), so it meets the golden as the folder does; its tokenizer is the byte-level one it was written with.
TEST(Gpt2LnFreeGguf, SameModelAsTheFolder) {
  const json g = read_golden("lnfree");
  auto hf = load(false), gg = load(true);
  ASSERT_TRUE(hf && gg);
  const ModelHParams &a = hf->model->hparams(), &b = gg->model->hparams();
  EXPECT_EQ(b.arch, "gpt2_lnfree");
  EXPECT_EQ(std::tie(a.n_layers, a.hidden, a.n_heads, a.n_kv_heads, a.head_dim, a.max_context, a.n_vocab),
            std::tie(b.n_layers, b.hidden, b.n_heads, b.n_kv_heads, b.head_dim, b.max_context, b.n_vocab));
  EXPECT_TRUE(b.attn_temperature && b.learned_positions && b.tied_embeddings);
  EXPECT_FALSE(b.layer_norm);
  for (const json& p : g["prompts"]) {
    const std::vector<int32_t> ids = ids_of(p["token_ids"]);
    const PromptRun x = run_prompt(*hf->model, ids), y = run_prompt(*gg->model, ids);
    EXPECT_EQ(x.last_logits, y.last_logits) << ids.size() << " tokens";
    EXPECT_LE(max_abs_diff(y.last_logits, p["last_logits"].get<std::vector<float>>()),
              logit_tolerance(p["last_logits"].get<std::vector<float>>()));
    for (int layer = 0; layer < b.n_layers; ++layer) {
      for (int h = 0; h < b.n_heads; ++h) {
        EXPECT_NEAR(y.entropy.mean(layer, h), p["entropy"][layer][h].get<double>(), kEntropyTolerance);
      }
    }
  }
  for (const json& r : g["greedy"]) {
    const std::vector<int32_t> want = ids_of(r["generated_ids"]);
    EXPECT_EQ(greedy(*gg->model, ids_of(r["prompt_ids"]), static_cast<int>(want.size())), want);
  }
  const auto& src = dynamic_cast<const GgufWeightSource&>(*gg->source);
  auto tok = tokenizer_from_gguf(src.file());
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  EXPECT_EQ(tok->encode("az!", false, false), (std::vector<int32_t>{'a', 'z', '!'}));
}

// Context encoded in `plan`'s mode by ContextEncoder on one CPU rank, then the query through
// Phase2Attention: the logits of every query position and the query rows' entropy map.
struct ModeRun {
  std::vector<float> logits;
  EntropyStats entropy;
};

ModeRun run_mode(Model& model, const std::vector<int32_t>& context, const std::vector<int32_t>& query,
                 const ContextPlan& plan) {
  auto comm = make_local_communicator();
  const ModelHParams& hp = model.hparams();
  KvCache cache = make_cache(model);
  ContextEncoder enc(model, cache, *comm);
  auto lay = enc.layout_for(static_cast<int64_t>(context.size()), plan);
  EXPECT_TRUE(lay.ok()) << lay.status().to_string();
  ModeRun r;
  if (!lay.ok()) return r;
  const SeqId seq = 3;
  const Status st = enc.encode(seq, context, *lay, plan.mode);
  EXPECT_TRUE(st.ok()) << st.to_string();
  enc.finish(seq);
  Phase2Attention p2(model.backend(), cache, hp, *comm, MergeAlgo::kAllReduce);
  p2.register_sequence(seq, comm->rank() == lay->query_host, static_cast<int64_t>(context.size()));
  r.entropy.reset(hp.n_layers, hp.n_heads);
  p2.track_entropy(seq, &r.entropy);
  const auto pq = iota_from(static_cast<int64_t>(query.size()), static_cast<int64_t>(context.size()));
  BatchSeq q{seq, query, pq, true};
  const Status fs = model.forward({&q, 1}, p2, &r.logits);
  EXPECT_TRUE(fs.ok()) << fs.to_string();
  return r;
}

// The longest golden prompt split into context and query: the last query row's logits are the
// golden's last logits in every mode that is exact. Global and exact are; star with two blocks is
// too (the second block's anchor is the whole first block, all the context before it). The query
// rows' entropy agrees across the three. Star with three blocks is not exact (the third block's
// anchor is not its past), which shows the comparison can fail.
TEST(Gpt2LnFree, AttentionModesMatchTheReference) {
  const json g = read_golden("lnfree");
  auto l = load();
  ASSERT_TRUE(l);
  Model& m = *l->model;
  const ModelHParams& hp = m.hparams();
  const json* longest = nullptr;
  for (const json& p : g["prompts"]) {
    if (!longest || p["token_ids"].size() > (*longest)["token_ids"].size()) longest = &p;
  }
  ASSERT_TRUE(longest);
  const std::vector<int32_t> ids = ids_of((*longest)["token_ids"]);
  const int64_t n_query = 8, n_context = static_cast<int64_t>(ids.size()) - n_query;
  ASSERT_EQ(n_context % 2, 0);
  const std::vector<int32_t> ctx(ids.begin(), ids.begin() + n_context), qry(ids.begin() + n_context, ids.end());
  const std::vector<float> want = (*longest)["last_logits"].get<std::vector<float>>();
  const float tol = logit_tolerance(want);
  auto last_row = [&](const ModeRun& r) {
    return std::vector<float>(r.logits.end() - hp.n_vocab, r.logits.end());
  };
  const ModeRun global = run_mode(m, ctx, qry, {AttentionMode::kGlobal, 0, -1, 0});
  const ModeRun exact = run_mode(m, ctx, qry, {AttentionMode::kExact, 0, -1, 0});
  const ModeRun star2 = run_mode(m, ctx, qry, {AttentionMode::kStar, static_cast<int>(n_context / 2), -1, 0});
  ASSERT_EQ(global.logits.size(), static_cast<size_t>(n_query * hp.n_vocab));
  EXPECT_LE(max_abs_diff(last_row(global), want), tol);
  EXPECT_LE(max_abs_diff(last_row(exact), want), tol);
  EXPECT_LE(max_abs_diff(last_row(star2), want), tol);
  EXPECT_LE(max_abs_diff(exact.logits, global.logits), logit_tolerance(global.logits));
  EXPECT_LE(max_abs_diff(star2.logits, global.logits), logit_tolerance(global.logits));
  for (int layer = 0; layer < hp.n_layers; ++layer) {
    for (int h = 0; h < hp.n_heads; ++h) {
      EXPECT_EQ(global.entropy.count[static_cast<size_t>(layer) * hp.n_heads + h], n_query);
      EXPECT_NEAR(exact.entropy.mean(layer, h), global.entropy.mean(layer, h), kEntropyTolerance) << layer << " " << h;
      EXPECT_NEAR(star2.entropy.mean(layer, h), global.entropy.mean(layer, h), kEntropyTolerance) << layer << " " << h;
    }
  }
  const ModeRun star4 = run_mode(m, ctx, qry, {AttentionMode::kStar, static_cast<int>(n_context / 4), -1, 0});
  EXPECT_GT(max_abs_diff(star4.logits, global.logits), 100 * logit_tolerance(global.logits));
}

// A backend without the temperature op (Backend's default check_features) refuses the model
// before uploading it, naming the op; the CPU backend has it.
TEST(Gpt2LnFree, BackendWithoutTheTemperatureOpRefusesTheModel) {
  auto src = HfWeightSource::open(family_dir("lnfree") + "/hf");
  ASSERT_TRUE(src.ok()) << src.status().to_string();
  BackendFeatures f;
  f.head_temperature = true;
  testing_backend::ForwardingBackend plain(make_cpu_backend());
  const Status st = plain.check_features(f);
  EXPECT_EQ(st.code(), StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("head_temperature"), std::string::npos) << st.to_string();
  EXPECT_TRUE(make_cpu_backend()->check_features(f).ok());
  auto m = create_model(**src, plain);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kUnimplemented);
}

TEST(Gpt2LnFree, ConfigKeysItDoesNotImplementAreRefusedByName) {
  const std::string base =
      R"({"model_type": "gpt2_lnfree", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32, )"
      R"("lnfree_attn_temperature": true)";
  auto ok = parse_hf_config(base + "}");
  ASSERT_TRUE(ok.ok()) << ok.status().to_string();
  EXPECT_EQ(ok->arch, "gpt2_lnfree");
  EXPECT_TRUE(ok->attn_temperature);
  EXPECT_FALSE(ok->layer_norm);
  auto no_t = parse_hf_config(R"({"model_type": "gpt2_lnfree", "n_layer": 2, "n_embd": 64, "n_head": 4})");
  ASSERT_TRUE(no_t.ok()) << no_t.status().to_string();
  EXPECT_FALSE(no_t->attn_temperature);
  for (const auto& [extra, needle] : std::vector<std::pair<std::string, std::string>>{
           {R"("activation_function": "gelu_new")", "activation_function 'gelu_new'"},
           {R"("lnfree_ffn": "two")", "lnfree_ffn 'two'"},
           {R"("lnfree_residual_scaling": false)", "lnfree_residual_scaling false"},
           {R"("scale_attn_weights": false)", "scale_attn_weights"}}) {
    auto r = parse_hf_config(base + ", " + extra + "}");
    ASSERT_FALSE(r.ok()) << extra;
    EXPECT_EQ(r.status().code(), StatusCode::kUnimplemented) << r.status().to_string();
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().to_string();
    EXPECT_NE(r.status().message().find("gpt2_lnfree"), std::string::npos) << r.status().to_string();
  }
}

}  // namespace
}  // namespace starserve
