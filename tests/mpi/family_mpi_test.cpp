// Sliding-window families on several ranks, run SPMD under `mpirun -np N`: the tiny random-weight
// models of tests/golden/<family>/ (Mistral: window 8 on every layer; Gemma 2: window 8 on layers
// 0, 2; Gemma 3: five windowed layers to one global; Phi-3: window 12 on every layer), made by
// scripts/golden/make_family_goldens.py from transformers. Contexts are several windows long, so
// on N ranks the window cuts across rank boundaries: whole ranks hold only keys behind the
// window of some query rows (their partials are empty: O = 0, LSE = -inf, nothing in the merge).
//   exact on N ranks  == global on one rank (logits), == transformers (golden logits and greedy);
//   global on N ranks == global on one rank (rank 0 holds the context, the others nothing);
//   star on N ranks   == star with the same blocks on one rank (logits and greedy).
// Every rank computes the one-rank references itself on a local communicator.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <numeric>
#include <random>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "mpi_gtest_main.h"
#include "../unit/family_golden.h"
#include "engine_generate.h"
#include "../unit/tiny_tokenizer.h"
#include "engine/serving_engine.h"
#include "model/gguf_source.h"
#include "star/context_encoder.h"
#include "star/local_attention.h"

namespace starserve {
namespace {

using nlohmann::json;
using namespace family_golden;

Communicator* g_comm = nullptr;

constexpr const char* kWindowed[] = {"mistral", "gemma2", "gemma3", "phi3"};

struct Family {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  std::unique_ptr<WeightSource> source;
  std::unique_ptr<Model> model;
  const ModelHParams& hp() const { return model->hparams(); }
  KvCache make_cache() { return KvCache(*backend, {hp().n_layers, hp().n_kv_heads, hp().head_dim, 16, 64}); }
};

Family& family(const std::string& name) {
  static std::map<std::string, std::unique_ptr<Family>> loaded;
  auto& f = loaded[name];
  if (!f) {
    f = std::make_unique<Family>();
    auto s = GgufWeightSource::open(family_dir(name) + "/model.gguf");
    SS_CHECK(s.ok(), "{}", s.status().to_string());
    f->source = std::move(s).value();
    auto m = create_model(*f->source, *f->backend);
    SS_CHECK(m.ok(), "{}", m.status().to_string());
    f->model = std::move(m).value();
    SS_CHECK(f->model->hparams().max_window() > 0, "{} has no sliding window", name);
  }
  return *f;
}

// Ordinary causal attention over context + query in one process (LocalAttention): the logits of
// every query position (n_query x n_vocab).
std::vector<float> global_reference(Family& f, std::span<const int32_t> context, std::span<const int32_t> query) {
  KvCache cache = f.make_cache();
  LocalAttention attn(*f.backend, cache, f.hp());
  const auto pc = iota_from(context.size(), 0);
  BatchSeq c{1, context, pc, false};
  if (!context.empty()) {
    EXPECT_TRUE(f.model->forward({&c, 1}, attn, nullptr).ok());
  }
  const auto pq = iota_from(query.size(), context.size());
  BatchSeq q{1, query, pq, true};
  std::vector<float> logits;
  EXPECT_TRUE(f.model->forward({&q, 1}, attn, &logits).ok());
  return logits;
}

// The context encoded by ContextEncoder in plan's mode on comm's ranks, then the query through
// Phase2Attention and the cross-rank merge: the logits of every query position on every rank.
std::vector<float> run_mode(Family& f, Communicator& comm, std::span<const int32_t> context,
                            std::span<const int32_t> query, const ContextPlan& plan) {
  KvCache cache = f.make_cache();
  ContextEncoder enc(*f.model, cache, comm);
  auto lay = enc.layout_for(static_cast<int64_t>(context.size()), plan);
  EXPECT_TRUE(lay.ok());
  const SeqId seq = 5;
  const Status st = enc.encode(seq, context, *lay, plan.mode);
  EXPECT_TRUE(st.ok()) << st.to_string();
  enc.finish(seq);
  EXPECT_EQ(cache.length(seq), lay->tokens_of(comm.rank()));
  Phase2Attention p2(*f.backend, cache, f.hp(), comm, MergeAlgo::kAllReduce);
  p2.register_sequence(seq, *lay, comm.rank());
  const auto pq = iota_from(query.size(), context.size());
  BatchSeq q{seq, query, pq, true};
  std::vector<float> logits;
  const Status fs = f.model->forward({&q, 1}, p2, &logits);
  EXPECT_TRUE(fs.ok()) << fs.to_string();
  return logits;
}

std::vector<float> on_one_rank(Family& f, std::span<const int32_t> context, std::span<const int32_t> query,
                               const ContextPlan& plan) {
  auto local = make_local_communicator();
  return run_mode(f, *local, context, query, plan);
}

std::string plan_name(const ContextPlan& p) {
  const char* mode = p.mode == AttentionMode::kStar ? "star" : p.mode == AttentionMode::kExact ? "exact" : "global";
  const char* layout = p.mode != AttentionMode::kExact                ? ""
                       : p.exact_layout == ExactLayout::kContiguous ? " contiguous"
                                                                     : " zigzag";
  return std::string(mode) + layout + " block " + std::to_string(p.block_size) + " anchor " +
         std::to_string(p.anchor_size);
}

// What the window does to the context-only ranks of a layout in phase 2: a rank is cut when the
// first query row (at position n_context) sees some of its keys but not all, and behind when it
// sees none of them (nor does any later row: windows only move forward). A zigzag rank's keys are
// two runs: its first key is its first run's, its last its second run's.
struct WindowCuts {
  int cut = 0, behind = 0;
};
WindowCuts window_cuts(int64_t n_context, const ContextPlan& plan, int world, int64_t window) {
  auto lay = plan_layout(n_context, plan, world);
  EXPECT_TRUE(lay.ok());
  WindowCuts c;
  const int64_t lo = n_context - window + 1;  // the first row's smallest visible key position
  for (int r = 0; r < world; ++r) {
    const std::vector<TokenRun> runs = lay->runs_of(r);
    if (r == lay->query_host || runs.empty()) continue;
    const int64_t first = runs.front().begin, last = runs.back().end - 1;
    if (last < lo) {
      ++c.behind;
    } else if (first < lo) {
      ++c.cut;
    }
  }
  return c;
}

// Contexts of several windows (61 tokens) and of less than two (13): with 61 on 2 or 4 ranks,
// whole context-only ranks lie behind the window of every query row; with 13 on 2 ranks, or 61 in
// blocks of 20 on 4, the window's edge falls inside a context-only rank. Phase 1 of exact mode
// cuts across rank boundaries in both (every span attends to the earlier ranks' keys).
constexpr int64_t kQuery = 5;
struct Case {
  int64_t n_context;
  ContextPlan plan;
};
const std::vector<Case> kExactCases = {
    {61, {AttentionMode::kExact, 0, 0, 0}},  {61, {AttentionMode::kExact, 7, 0, 0}},
    {61, {AttentionMode::kExact, 20, 0, 0}}, {61, {AttentionMode::kGlobal, 0, 0, 0}},
    {13, {AttentionMode::kExact, 0, 0, 0}},  {13, {AttentionMode::kExact, 3, 0, 0}},
    {61, {AttentionMode::kExact, 0, 0, 0, ExactLayout::kContiguous}},
    {61, {AttentionMode::kExact, 20, 0, 0, ExactLayout::kContiguous}},
    {13, {AttentionMode::kExact, 0, 0, 0, ExactLayout::kContiguous}},
    {7, {AttentionMode::kExact, 0, 0, 0, ExactLayout::kZigzag}}};
const std::vector<Case> kStarCases = {
    {61, {AttentionMode::kStar, 0, -1, 0}},  {61, {AttentionMode::kStar, 0, 4, 0}},
    {61, {AttentionMode::kStar, 10, -1, 0}}, {61, {AttentionMode::kStar, 6, 0, 0}},
    {61, {AttentionMode::kStar, 20, 5, 0}},  {13, {AttentionMode::kStar, 0, -1, 0}},
    {13, {AttentionMode::kStar, 4, 2, 0}}};

// The cases reach both situations on every rank count the test runs with (more than one).
void expect_cases_cut(const std::vector<Case>& cases, int64_t window, const char* name) {
  if (g_comm->world_size() == 1) return;
  WindowCuts all;
  for (const Case& c : cases) {
    const WindowCuts w = window_cuts(c.n_context, c.plan, g_comm->world_size(), window);
    all.cut += w.cut;
    all.behind += w.behind;
  }
  EXPECT_GT(all.cut, 0) << name << ": no case puts the window's edge inside a context-only rank";
  EXPECT_GT(all.behind, 0) << name << ": no case puts a context-only rank behind the window";
}

TEST(WindowedFamiliesOnRanks, ExactAndGlobalEqualGlobalOnOneRank) {
  for (const char* name : kWindowed) {
    Family& f = family(name);
    expect_cases_cut(kExactCases, f.hp().max_window(), name);
    for (const Case& c : kExactCases) {
      const auto ctx = random_tokens(c.n_context, 31, f.hp().n_vocab), qry = random_tokens(kQuery, 32, f.hp().n_vocab);
      const auto ref = global_reference(f, ctx, qry);
      EXPECT_LE(max_abs_diff(run_mode(f, *g_comm, ctx, qry, c.plan), ref), logit_tolerance(ref))
          << name << " " << plan_name(c.plan) << ", " << c.n_context << " context tokens on " << g_comm->world_size()
          << " ranks (rank " << g_comm->rank() << ")";
    }
  }
}

// Star: with a fixed block size the blocks are the same whatever the number of ranks, so N ranks
// must reproduce one rank's star. Block 0 on N ranks is one block per rank, which on one rank is
// block_size ceil(n / N).
TEST(WindowedFamiliesOnRanks, StarEqualsStarWithTheSameBlocksOnOneRank) {
  const int world = g_comm->world_size();
  for (const char* name : kWindowed) {
    Family& f = family(name);
    expect_cases_cut(kStarCases, f.hp().max_window(), name);
    for (const Case& c : kStarCases) {
      const auto ctx = random_tokens(c.n_context, 41, f.hp().n_vocab), qry = random_tokens(kQuery, 42, f.hp().n_vocab);
      ContextPlan one = c.plan;
      if (one.block_size == 0) one.block_size = static_cast<int>((c.n_context + world - 1) / world);
      const auto ref = on_one_rank(f, ctx, qry, one);
      EXPECT_LE(max_abs_diff(run_mode(f, *g_comm, ctx, qry, c.plan), ref), logit_tolerance(ref))
          << name << " " << plan_name(c.plan) << ", " << c.n_context << " context tokens on " << world
          << " ranks (rank " << g_comm->rank() << ")";
    }
  }
}

// The comparisons above can fail: star with blocks much shorter than the receptive field is not
// exact for these models, on one rank or on N.
TEST(WindowedFamiliesOnRanks, ShortStarBlocksDifferFromGlobal) {
  Family& f = family("mistral");
  const auto ctx = random_tokens(61, 51, f.hp().n_vocab), qry = random_tokens(kQuery, 52, f.hp().n_vocab);
  const auto ref = global_reference(f, ctx, qry);
  const auto star = run_mode(f, *g_comm, ctx, qry, {AttentionMode::kStar, 6, 0, 0});
  EXPECT_GT(max_abs_diff(star, ref), 100 * logit_tolerance(ref));
}

// Against transformers directly: the golden prompts of 27 tokens (a window of 8 or 12 cuts them)
// split into 22 context tokens on N ranks and a 5-token query; the last query row's logits are
// the golden last-position logits.
TEST(WindowedFamiliesOnRanks, ExactOnRanksMatchesTransformersLogits) {
  for (const char* name : kWindowed) {
    Family& f = family(name);
    const json g = read_golden(name);
    bool checked = false;
    for (const json& p : g["prompts"]) {
      const auto ids = p["token_ids"].get<std::vector<int32_t>>();
      if (static_cast<int64_t>(ids.size()) <= 2 * f.hp().max_window()) continue;
      checked = true;
      const std::vector<float> want = p["last_logits"].get<std::vector<float>>();
      const std::span<const int32_t> all(ids);
      const auto got = run_mode(f, *g_comm, all.first(ids.size() - kQuery), all.last(kQuery),
                                {AttentionMode::kExact, 0, 0, 0});
      ASSERT_EQ(got.size(), kQuery * want.size()) << name;
      const std::vector<float> last(got.end() - static_cast<std::ptrdiff_t>(want.size()), got.end());
      EXPECT_LE(max_abs_diff(last, want), logit_tolerance(want)) << name << ", prompt of " << ids.size();
    }
    EXPECT_TRUE(checked) << name << ": no golden prompt longer than two windows";
  }
}

// Greedy generation through the serving engine on comm's ranks (rank 0 schedules, the others
// follow its steps through run_worker): rank 0's tokens, broadcast to every rank.
std::vector<int32_t> generate(Family& f, Communicator& comm, std::span<const int32_t> ctx,
                              std::span<const int32_t> qry, const ContextPlan& plan, int n_new) {
  KvCache cache = f.make_cache();
  static const Tokenizer tokenizer = testing_engine::tiny_tokenizer(f.hp().n_vocab);
  return testing_engine::generate_greedy(*f.model, cache, comm, tokenizer, ctx, qry, plan, n_new, 512);
}

// The engine's own path (admission, chunked phase 1, register_sequence with each rank's first
// context position, decode steps): exact on N ranks generates transformers' greedy tokens for the
// golden prompts (the continuation runs 32 tokens past a 27-token prompt, so every generated token
// attends across windows and rank boundaries), and star on N ranks generates what star with the
// same blocks generates on one rank.
TEST(WindowedFamiliesOnRanks, GreedyThroughTheEngine) {
  for (const char* name : kWindowed) {
    Family& f = family(name);
    const json g = read_golden(name);
    const json& longest = g["greedy"].back();
    const auto ids = longest["prompt_ids"].get<std::vector<int32_t>>();
    const auto want = longest["generated_ids"].get<std::vector<int32_t>>();
    ASSERT_GT(ids.size(), static_cast<size_t>(2 * f.hp().max_window())) << name;
    const std::span<const int32_t> all(ids);
    const auto ctx = all.first(ids.size() - 3), qry = all.last(3);
    const int n_new = static_cast<int>(want.size());
    EXPECT_EQ(generate(f, *g_comm, ctx, qry, {AttentionMode::kExact, 0, 0, 0}, n_new), want) << name << " exact";
    EXPECT_EQ(generate(f, *g_comm, ctx, qry, {AttentionMode::kExact, 0, 0, 0, ExactLayout::kContiguous}, n_new), want)
        << name << " exact contiguous";
    EXPECT_EQ(generate(f, *g_comm, ctx, qry, {AttentionMode::kGlobal, 0, 0, 0}, n_new), want) << name << " global";
    auto local = make_local_communicator();
    for (const auto& [block, anchor] : std::vector<std::pair<int, int>>{{6, -1}, {5, 2}}) {
      const ContextPlan plan{AttentionMode::kStar, block, anchor, 0};
      const auto one = generate(f, *local, ctx, qry, plan, n_new);
      EXPECT_EQ(one.size(), want.size()) << name;
      EXPECT_EQ(generate(f, *g_comm, ctx, qry, plan, n_new), one) << name << " " << plan_name(plan);
    }
  }
}

}  // namespace
}  // namespace starserve

int main(int argc, char** argv) { return starserve::run_mpi_gtest(argc, argv, &starserve::g_comm); }
