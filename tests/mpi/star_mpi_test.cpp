// Star Attention exactness checks (docs/specs/star-attention.md, "Exactness checks the engine must pass"),
// run SPMD under `mpirun -np N` (also N = 1). Every rank runs every test in the same order; the
// distributed result is compared with single-process computations each rank does on its own.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "mpi_gtest_main.h"
#include "engine_generate.h"
#include "../unit/tiny_tokenizer.h"
#include "engine/serving_engine.h"
#include "star/local_attention.h"
#include "model/random_source.h"
#include "star/context_encoder.h"
#include "star/merge.h"

namespace starserve {
namespace {

Communicator* g_comm = nullptr;

struct TinyModel {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  ModelHParams hp = tiny_llama_hparams();
  std::unique_ptr<Model> model;
  TinyModel() {
    RandomWeightSource src(hp, 42);
    auto m = create_model(src, *backend);
    SS_CHECK(m.ok(), "{}", m.status().to_string());
    model = std::move(m).value();
  }
  KvCache make_cache() { return KvCache(*backend, {hp.n_layers, hp.n_kv_heads, hp.head_dim, 16, 512}); }
};

TinyModel& tiny() {
  static TinyModel m;
  return m;
}

std::vector<int32_t> random_tokens(int64_t n, uint32_t seed, int n_vocab) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, n_vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = dist(rng);
  return t;
}

std::vector<int32_t> iota_positions(int64_t n, int64_t start) {
  std::vector<int32_t> p(n);
  std::iota(p.begin(), p.end(), static_cast<int32_t>(start));
  return p;
}

struct QueryResult {
  std::vector<float> logits;  // (n_query, n_vocab): every query position
  EntropyStats entropy;
};

// Single-process global attention over context + query (the reference).
QueryResult global_reference(std::span<const int32_t> context, std::span<const int32_t> query) {
  TinyModel& m = tiny();
  KvCache cache = m.make_cache();
  LocalAttention attn(*m.backend, cache, m.hp);
  QueryResult r;
  r.entropy.reset(m.hp.n_layers, m.hp.n_heads);
  const auto pc = iota_positions(context.size(), 0);
  BatchSeq c{1, context, pc, false};
  if (!context.empty()) EXPECT_TRUE(m.model->forward({&c, 1}, attn, nullptr).ok());
  attn.track_entropy(1, &r.entropy);
  const auto pq = iota_positions(query.size(), context.size());
  BatchSeq q{1, query, pq, true};
  EXPECT_TRUE(m.model->forward({&q, 1}, attn, &r.logits).ok());
  return r;
}

// Single-process Star Attention: each block encoded separately as [anchor ; block] with plain
// causal attention (anchor recomputed per block, no reuse, no communication), the blocks' KV
// concatenated, then ordinary attention for the query. Independent of ContextEncoder/Phase2.
QueryResult star_reference(std::span<const int32_t> context, std::span<const int32_t> query, int block, int anchor) {
  TinyModel& m = tiny();
  KvCache cache = m.make_cache();
  LocalAttention attn(*m.backend, cache, m.hp);
  const SeqId target = 1, scratch = 2;
  const int64_t n = static_cast<int64_t>(context.size());
  const int64_t kv_row = static_cast<int64_t>(m.hp.n_kv_heads) * m.hp.head_dim;
  EXPECT_TRUE(cache.reserve(target, n + static_cast<int64_t>(query.size())).ok());
  for (int64_t b = 0; b < n; b += block) {
    const int64_t e = std::min<int64_t>(n, b + block);
    std::vector<int32_t> toks, pos;
    const int64_t a = b == 0 ? 0 : std::min<int64_t>(anchor, n);
    for (int64_t i = 0; i < a; ++i) toks.push_back(context[i]), pos.push_back(static_cast<int32_t>(i));
    for (int64_t i = b; i < e; ++i) toks.push_back(context[i]), pos.push_back(static_cast<int32_t>(i));
    BatchSeq s{scratch, toks, pos, false};
    EXPECT_TRUE(m.model->forward({&s, 1}, attn, nullptr).ok());
    for (int l = 0; l < m.hp.n_layers; ++l) {
      int64_t dst = b;
      for (const KvView& seg : cache.segments(l, scratch, a, a + (e - b))) {
        cache.write(l, target, dst, seg.k, seg.v);
        dst += seg.n_tokens();
      }
    }
    cache.free_sequence(scratch);
  }
  cache.set_length(target, n);
  (void)kv_row;
  QueryResult r;
  r.entropy.reset(m.hp.n_layers, m.hp.n_heads);
  attn.track_entropy(target, &r.entropy);
  const auto pq = iota_positions(query.size(), n);
  BatchSeq q{target, query, pq, true};
  EXPECT_TRUE(m.model->forward({&q, 1}, attn, &r.logits).ok());
  return r;
}

// The distributed path under test: ContextEncoder on every rank, then Phase2Attention.
QueryResult distributed(std::span<const int32_t> context, std::span<const int32_t> query, const ContextPlan& plan,
                        MergeAlgo algo = MergeAlgo::kAllReduce) {
  TinyModel& m = tiny();
  KvCache cache = m.make_cache();
  ContextEncoder enc(*m.model, cache, *g_comm);
  auto lay = enc.layout_for(static_cast<int64_t>(context.size()), plan);
  EXPECT_TRUE(lay.ok());
  const SeqId seq = 7;
  EXPECT_TRUE(enc.encode(seq, context, *lay, plan.mode).ok());
  // Every context token's KV exists exactly once across ranks (the anchor's KV is dropped).
  int64_t local = cache.length(seq), total = local;
  {
    float f = static_cast<float>(local);
    EXPECT_TRUE(g_comm->all_reduce_sum(&f, 1).ok());
    total = static_cast<int64_t>(f);
  }
  EXPECT_EQ(total, static_cast<int64_t>(context.size()));
  EXPECT_EQ(local, lay->tokens_of(g_comm->rank()));
  EXPECT_FALSE(cache.has(anchor_seq_id(seq)));
  // No rank runs the anchor through the model a second time: with several ranks it arrives from
  // the owner of c1 (docs/specs/star-attention.md phase 1 step 7), on one rank it is c1's own KV.
  EXPECT_EQ(enc.tokens_forwarded(), lay->tokens_of(g_comm->rank())) << "rank " << g_comm->rank();

  Phase2Attention p2(*m.backend, cache, m.hp, *g_comm, algo);
  p2.register_sequence(seq, *lay, g_comm->rank());
  QueryResult r;
  r.entropy.reset(m.hp.n_layers, m.hp.n_heads);
  p2.track_entropy(seq, &r.entropy);
  const auto pq = iota_positions(query.size(), context.size());
  BatchSeq q{seq, query, pq, true};
  EXPECT_TRUE(m.model->forward({&q, 1}, p2, &r.logits).ok());
  return r;
}

// fp32 end to end; the distributed merge reorders sums over <= a few hundred keys per row, and two
// layers amplify little: 2e-4 absolute on O(1..10) logits is ~100x the observed rounding noise.
constexpr float kLogitTol = 2e-4f;
constexpr double kEntropyTol = 1e-4;

void expect_same(const QueryResult& a, const QueryResult& b, const char* what) {
  ASSERT_EQ(a.logits.size(), b.logits.size()) << what;
  float worst = 0.0f;
  for (size_t i = 0; i < a.logits.size(); ++i) worst = std::max(worst, std::abs(a.logits[i] - b.logits[i]));
  EXPECT_LE(worst, kLogitTol) << what << " (rank " << g_comm->rank() << ")";
  for (int l = 0; l < a.entropy.n_layers; ++l) {
    for (int h = 0; h < a.entropy.n_heads; ++h) {
      EXPECT_NEAR(a.entropy.mean(l, h), b.entropy.mean(l, h), kEntropyTol) << what << " layer " << l << " head " << h;
    }
  }
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float worst = 0.0f;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

const int kVocab = tiny_llama_hparams().n_vocab;

// Check 2: block_size >= context length -> star == global.
TEST(StarExactness, OneBlockEqualsGlobal) {
  const auto ctx = random_tokens(100, 1, kVocab), qry = random_tokens(5, 2, kVocab);
  const auto ref = global_reference(ctx, qry);
  expect_same(distributed(ctx, qry, {AttentionMode::kStar, 128, -1}), ref, "star block >= context");
  expect_same(distributed(ctx, qry, {AttentionMode::kGlobal, 0, 0}), ref, "global mode");
}

// Check 3: star on N ranks == star computed in one process with the same blocks.
TEST(StarExactness, DistributedStarEqualsSingleProcessStar) {
  const auto ctx = random_tokens(157, 3, kVocab), qry = random_tokens(6, 4, kVocab);
  for (int block : {16, 40, 64}) {
    for (int anchor : {0, 8, -1}) {
      const int a = anchor == -1 ? block : anchor;
      const auto ref = star_reference(ctx, qry, block, a);
      expect_same(distributed(ctx, qry, {AttentionMode::kStar, block, anchor}), ref,
                  ("star block " + std::to_string(block) + " anchor " + std::to_string(a)).c_str());
    }
  }
}

// Star with small blocks really is an approximation (so the checks above can fail).
TEST(StarExactness, SmallBlocksDifferFromGlobal) {
  const auto ctx = random_tokens(120, 5, kVocab), qry = random_tokens(4, 6, kVocab);
  const auto ref = global_reference(ctx, qry);
  const auto star = distributed(ctx, qry, {AttentionMode::kStar, 16, 4});
  EXPECT_GT(max_abs_diff(star.logits, ref.logits), 10 * kLogitTol);
}

// Check 4: exact context parallelism on N ranks == global.
TEST(StarExactness, ExactModeEqualsGlobal) {
  const auto ctx = random_tokens(133, 7, kVocab), qry = random_tokens(7, 8, kVocab);
  const auto ref = global_reference(ctx, qry);
  for (int block : {0, 10, 50, 200}) {
    expect_same(distributed(ctx, qry, {AttentionMode::kExact, block, 0}), ref,
                ("exact block " + std::to_string(block)).c_str());
  }
}

// The masking pitfall: a multi-token query on ranks that hold only context must see every context
// token, including the last ones (a bottom-right causal alignment would hide them). With one
// block per rank, every non-host rank's keys are context only; equality with global covers it.
TEST(StarExactness, MultiTokenQuerySeesLastContextTokensOnEveryRank) {
  const auto ctx = random_tokens(64, 9, kVocab), qry = random_tokens(12, 10, kVocab);
  const auto ref = global_reference(ctx, qry);
  expect_same(distributed(ctx, qry, {AttentionMode::kExact, 0, 0}), ref, "exact, 12-token query");
  expect_same(distributed(ctx, qry, {AttentionMode::kExact, 0, 0}, MergeAlgo::kAllGather), ref,
              "exact, 12-token query, all-gather merge");
}

// Both merge collectives give the same result.
TEST(StarExactness, AllGatherMergeEqualsAllReduceMerge) {
  const auto ctx = random_tokens(90, 11, kVocab), qry = random_tokens(3, 12, kVocab);
  const auto a = distributed(ctx, qry, {AttentionMode::kStar, 20, 10}, MergeAlgo::kAllReduce);
  const auto b = distributed(ctx, qry, {AttentionMode::kStar, 20, 10}, MergeAlgo::kAllGather);
  expect_same(a, b, "all-reduce vs all-gather");
  const auto c = distributed(ctx, qry, {AttentionMode::kStar, 20, 10}, MergeAlgo::kAuto);
  expect_same(a, c, "all-reduce vs auto");
}

// kAuto's choice on the device path follows the measured crossover; fixed choices stay fixed.
TEST(StarExactness, AutoMergeChoosesByRowsTimesRanks) {
  EXPECT_EQ(device_merge_algo(MergeAlgo::kAuto, 32, 2), MergeAlgo::kAllGather);           // one token, 32 heads
  EXPECT_EQ(device_merge_algo(MergeAlgo::kAuto, 256 * 32, 2), MergeAlgo::kAllGather);     // 16,384
  EXPECT_EQ(device_merge_algo(MergeAlgo::kAuto, 256 * 32, 4), MergeAlgo::kAllReduce);     // 32,768
  EXPECT_EQ(device_merge_algo(MergeAlgo::kAuto, 2048 * 32, 2), MergeAlgo::kAllReduce);
  EXPECT_EQ(device_merge_algo(MergeAlgo::kAuto, 32, kMaxDeviceMergeParts + 1), MergeAlgo::kAllReduce);
  EXPECT_EQ(device_merge_algo(MergeAlgo::kAllReduce, 32, 2), MergeAlgo::kAllReduce);
  EXPECT_EQ(device_merge_algo(MergeAlgo::kAllGather, 2048 * 32, 4), MergeAlgo::kAllGather);
}

// Context shorter than the number of ranks: some ranks hold nothing (LSE = -inf), no NaN.
TEST(StarExactness, EmptyRanksDropOut) {
  const auto ctx = random_tokens(2, 13, kVocab), qry = random_tokens(3, 14, kVocab);
  const auto ref = global_reference(ctx, qry);
  const auto r = distributed(ctx, qry, {AttentionMode::kExact, 1, 0});
  for (float x : r.logits) ASSERT_TRUE(std::isfinite(x));
  expect_same(r, ref, "exact with empty ranks");
}

// RankMerger::rank_entropy: the entropy of each row's attention mass over the ranks, from what either merge keeps,
// equals -sum_r w_r ln w_r computed here from every rank's LSE (each rank derives all of them), and it is the part of
// the merged entropy the ranks' own entropies do not explain: H = sum_r w_r H_r + rank entropy.
TEST(RankEntropy, EqualsTheSharesOfTheRanksLse) {
  const int world = g_comm->world_size(), me = g_comm->rank();
  const int d = 4;
  const int64_t rows = 6;
  const float inf = std::numeric_limits<float>::infinity();
  // Row 0: equal LSE on every rank; row 1: rank 0 far above the rest; row 2: only rank 0 has keys; rows 3-5: mixed,
  // with rank 1 empty on row 5.
  const auto lse_of = [&](int r, int64_t row) -> float {
    switch (row) {
      case 0: return 1.5f;
      case 1: return r == 0 ? 40.0f : 0.0f;
      case 2: return r == 0 ? 2.0f : -inf;
      case 5: if (r == 1) return -inf; [[fallthrough]];
      default: return 0.3f * static_cast<float>(r * (row + 1) % 5) + 0.1f * static_cast<float>(row);
    }
  };
  const auto ent_of = [](int r, int64_t row) { return 0.2f + 0.05f * static_cast<float>(r + row); };
  auto backend = make_cpu_backend();
  for (MergeAlgo algo : {MergeAlgo::kAllReduce, MergeAlgo::kAllGather}) {
    RankMerger merger(*g_comm, algo);
    std::vector<float> out(rows * d), lse(rows), ent(rows);
    for (int64_t i = 0; i < rows; ++i) {
      lse[i] = lse_of(me, i);
      ent[i] = std::isinf(lse[i]) ? 0.0f : ent_of(me, i);
      for (int c = 0; c < d; ++c) out[i * d + c] = std::isinf(lse[i]) ? 0.0f : 0.1f * static_cast<float>(me + c);
    }
    ASSERT_TRUE(merger.merge_on(*backend, out.data(), lse.data(), ent.data(), rows, d).ok());
    std::vector<float> got(rows - 1);
    merger.rank_entropy(*backend, 1, rows - 1, got.data());  // rows 1..5: an offset into the merge
    std::vector<float> row0(1);
    merger.rank_entropy(*backend, 0, 1, row0.data());
    got.insert(got.begin(), row0[0]);
    for (int64_t i = 0; i < rows; ++i) {
      double m = -inf;
      for (int r = 0; r < world; ++r) m = std::max<double>(m, lse_of(r, i));
      double den = 0;
      for (int r = 0; r < world; ++r) den += std::isinf(lse_of(r, i)) ? 0.0 : std::exp(lse_of(r, i) - m);
      double h_ranks = 0, h_within = 0;
      for (int r = 0; r < world; ++r) {
        if (std::isinf(lse_of(r, i))) continue;
        const double w = std::exp(lse_of(r, i) - m) / den;
        if (w > 0) h_ranks -= w * std::log(w);
        h_within += w * ent_of(r, i);
      }
      const char* name = algo == MergeAlgo::kAllReduce ? "all-reduce" : "all-gather";
      EXPECT_NEAR(got[i], world == 1 ? 0.0 : h_ranks, 1e-5) << name << " row " << i;
      EXPECT_NEAR(ent[i], h_within + h_ranks, 1e-5) << name << " row " << i;
    }
    EXPECT_NEAR(got[0], std::log(static_cast<double>(world)), 1e-5);  // equal shares
    EXPECT_NEAR(got[1], 0.0, 1e-5);                                   // one rank holds it all
    EXPECT_EQ(got[2], 0.0f);                                          // only one rank has keys
  }
}

// Through phase 2 of a real forward: with several ranks the entropy stats carry the rank entropy of every tracked
// row, within [0, ln W]; on one rank none.
TEST(RankEntropy, Phase2RecordsItForTheTrackedRows) {
  const auto ctx = random_tokens(57, 21, kVocab), qry = random_tokens(4, 22, kVocab);
  const auto r = distributed(ctx, qry, {AttentionMode::kStar, 16, 8});
  const int world = g_comm->world_size();
  ASSERT_EQ(r.entropy.has_rank_entropy(), world > 1);
  if (world == 1) return;
  EXPECT_EQ(r.entropy.n_ranks, world);
  double total = 0;
  for (int l = 0; l < r.entropy.n_layers; ++l) {
    for (int h = 0; h < r.entropy.n_heads; ++h) {
      const double v = r.entropy.rank_mean(l, h);
      EXPECT_GE(v, 0.0);
      EXPECT_LE(v, std::log(static_cast<double>(world)) + 1e-6);
      EXPECT_EQ(r.entropy.rank_count[static_cast<size_t>(l) * r.entropy.n_heads + h], 4);
      total += v;
    }
  }
  EXPECT_GT(total, 0.0);  // random weights spread some mass over every rank's keys
}

// Phase 1 split by layers (chunked prefill, one layer per step) with the steps of two requests
// interleaved, as the serving engine runs them: every rank ends with the same KV as the unchunked
// encoding, so the query's logits are equal bit for bit (fp32: the chunk boundary's plain add
// and norm are the fused add + norm's own ops), for star with the anchor exchange, exact with its
// per-layer K/V all-gather, and global.
QueryResult distributed_chunked(std::span<const int32_t> context, std::span<const int32_t> query,
                                std::span<const int32_t> other, const ContextPlan& plan) {
  TinyModel& m = tiny();
  KvCache cache = m.make_cache();
  ContextEncoder enc(*m.model, cache, *g_comm);
  const int per_block = enc.chunks_per_block(1);
  EXPECT_EQ(per_block, m.hp.n_layers);
  struct Req {
    SeqId seq;
    std::span<const int32_t> ctx;
    StarLayout lay;
    int steps = 0;
  };
  std::vector<Req> reqs;
  for (const auto& [seq, ctx] : {std::pair{SeqId{7}, context}, std::pair{SeqId{8}, other}}) {
    auto lay = enc.layout_for(static_cast<int64_t>(ctx.size()), plan);
    EXPECT_TRUE(lay.ok());
    int max_blocks = 0;
    for (int r = 0; r < g_comm->world_size(); ++r) max_blocks = std::max<int>(max_blocks, lay->blocks_of(r).size());
    const int blocks = plan.mode == AttentionMode::kExact ? 1 : max_blocks;
    reqs.push_back({seq, ctx, *lay, blocks * per_block});
  }
  for (int s = 0; s < std::max(reqs[0].steps, reqs[1].steps); ++s) {
    for (const Req& r : reqs) {
      if (s >= r.steps) continue;
      const int k = s / per_block, c = s % per_block;
      Status st;
      if (plan.mode == AttentionMode::kExact) {
        st = enc.encode_exact(r.seq, r.ctx, r.lay, c, 1);
      } else if (k < static_cast<int>(r.lay.blocks_of(g_comm->rank()).size())) {
        st = enc.encode_block(r.seq, r.ctx, r.lay, k, c, 1);
      } else {
        st = enc.join_block(r.seq, r.lay, k, c, 1);
      }
      EXPECT_TRUE(st.ok()) << st.to_string();
    }
  }
  for (const Req& r : reqs) enc.finish(r.seq);
  EXPECT_EQ(cache.length(7), reqs[0].lay.tokens_of(g_comm->rank()));
  Phase2Attention p2(*m.backend, cache, m.hp, *g_comm, MergeAlgo::kAllReduce);
  p2.register_sequence(7, reqs[0].lay, g_comm->rank());
  QueryResult res;
  res.entropy.reset(m.hp.n_layers, m.hp.n_heads);
  p2.track_entropy(7, &res.entropy);
  const auto pq = iota_positions(query.size(), context.size());
  BatchSeq q{7, query, pq, true};
  EXPECT_TRUE(m.model->forward({&q, 1}, p2, &res.logits).ok());
  return res;
}

TEST(StarExactness, ChunkedPhase1EqualsUnchunkedBitwise) {
  const auto ctx = random_tokens(150, 21, kVocab), qry = random_tokens(4, 22, kVocab);
  const auto other = random_tokens(97, 23, kVocab);
  for (const ContextPlan& plan :
       {ContextPlan{AttentionMode::kStar, 32, -1}, ContextPlan{AttentionMode::kStar, 40, 16},
        ContextPlan{AttentionMode::kExact, 0, 0, 0, ExactLayout::kZigzag},
        ContextPlan{AttentionMode::kExact, 0, 0, 0, ExactLayout::kContiguous}, ContextPlan{AttentionMode::kGlobal, 0, 0}}) {
    SCOPED_TRACE(std::string("mode ") + (plan.mode == AttentionMode::kStar    ? "star"
                                         : plan.mode == AttentionMode::kExact ? "exact"
                                                                               : "global") +
                 " block " + std::to_string(plan.block_size) + " layout " +
                 std::to_string(static_cast<int>(plan.exact_layout)));
    const QueryResult whole = distributed(ctx, qry, plan);
    const QueryResult chunked = distributed_chunked(ctx, qry, other, plan);
    ASSERT_EQ(chunked.logits.size(), whole.logits.size());
    EXPECT_EQ(max_abs_diff(chunked.logits, whole.logits), 0.0f);
  }
}

// Greedy generation through the serving engine (rank 0 decides every token, the others follow its
// steps): star with one block generates the same tokens as global attention. Every rank receives
// rank 0's tokens, so every rank checks them.
std::vector<int32_t> generate(std::span<const int32_t> ctx, std::span<const int32_t> qry, const ContextPlan& plan) {
  TinyModel& m = tiny();
  KvCache cache = m.make_cache();
  static const Tokenizer tokenizer = testing_engine::tiny_tokenizer(m.hp.n_vocab);
  return testing_engine::generate_greedy(*m.model, cache, *g_comm, tokenizer, ctx, qry, plan, 12, 4096);
}

TEST(StarExactness, GreedyTokensStarOneBlockEqualGlobal) {
  const auto ctx = random_tokens(80, 15, kVocab), qry = random_tokens(4, 16, kVocab);
  const auto global = generate(ctx, qry, {AttentionMode::kGlobal, 0, 0});
  const auto star = generate(ctx, qry, {AttentionMode::kStar, 100, -1});
  const auto exact = generate(ctx, qry, {AttentionMode::kExact, 0, 0});
  EXPECT_EQ(global.size(), 12u);
  EXPECT_EQ(star, global);
  EXPECT_EQ(exact, global);
}

// ---------------------------------------------------------------- exact mode's zigzag layout

ContextPlan exact_plan(ExactLayout layout) { return {AttentionMode::kExact, 0, 0, 0, layout}; }

// The layouts under test really are what they say: zigzag gives rank r chunks r and 2W-1-r (two
// runs once the context has 2W tokens, but for rank W-1, whose chunks touch), contiguous at most
// one span per rank, and the default (auto) is zigzag for this model.
TEST(ExactZigzag, LayoutsAreWhatTheySay) {
  TinyModel& m = tiny();
  KvCache cache = m.make_cache();
  ContextEncoder enc(*m.model, cache, *g_comm);
  const int w = g_comm->world_size(), me = g_comm->rank();
  for (int64_t n : {int64_t{2} * w, int64_t{2} * w + 1, int64_t{133}}) {
    auto zig = enc.layout_for(n, exact_plan(ExactLayout::kZigzag));
    auto contiguous = enc.layout_for(n, exact_plan(ExactLayout::kContiguous));
    auto automatic = enc.layout_for(n, exact_plan(ExactLayout::kAuto));
    ASSERT_TRUE(zig.ok() && contiguous.ok() && automatic.ok());
    EXPECT_EQ(zig->exact_layout, ExactLayout::kZigzag);
    EXPECT_EQ(automatic->exact_layout, ExactLayout::kZigzag);
    EXPECT_EQ(contiguous->exact_layout, ExactLayout::kContiguous);
    // Rank W-1's chunks (W-1 and W) touch: one run; every other rank's lie apart.
    EXPECT_EQ(zig->runs_of(me).size(), me < w - 1 ? 2u : 1u) << n << " tokens";
    EXPECT_LE(contiguous->runs_of(me).size(), 1u);
    EXPECT_EQ(zig->query_host, 0) << "the last chunk is rank 0's";
    EXPECT_EQ(contiguous->query_host, contiguous->blocks.back().rank);
  }
}

// Balanced exact mode equals global on N ranks (logits of every query position and the entropy of
// every layer and head): context lengths that do not divide by 2W, exactly 2W, shorter than 2W (a
// rank with one chunk, or with none: it joins every collective with nothing), one token. The
// contiguous layout on the same inputs too, so both layouts equal each other.
TEST(ExactZigzag, EqualsGlobalAtAwkwardLengths) {
  const int64_t w = g_comm->world_size();
  for (int64_t n : {int64_t{1}, int64_t{2}, int64_t{3}, 2 * w - 1, 2 * w, 2 * w + 1, 4 * w + 3, int64_t{61},
                    int64_t{133}}) {
    if (n < 1) continue;
    const auto ctx = random_tokens(n, 100 + static_cast<uint32_t>(n), kVocab);
    const auto qry = random_tokens(5, 200 + static_cast<uint32_t>(n), kVocab);
    const auto ref = global_reference(ctx, qry);
    const std::string what = std::to_string(n) + " context tokens on " + std::to_string(w) + " ranks";
    expect_same(distributed(ctx, qry, exact_plan(ExactLayout::kZigzag)), ref, ("zigzag, " + what).c_str());
    expect_same(distributed(ctx, qry, exact_plan(ExactLayout::kContiguous)), ref, ("contiguous, " + what).c_str());
  }
  // A multi-token query on a zigzag layout with the all-gather merge.
  const auto ctx = random_tokens(77, 301, kVocab), qry = random_tokens(12, 302, kVocab);
  expect_same(distributed(ctx, qry, exact_plan(ExactLayout::kZigzag), MergeAlgo::kAllGather), global_reference(ctx, qry),
              "zigzag, 12-token query, all-gather merge");
}

// Decode after zigzag phase 1: the query host (rank 0) stores the query and generated tokens after
// its two chunks, the other ranks hold context only. Teacher-forced by the reference's greedy
// tokens: every step's logits equal global attention's, and their argmax is the reference token.
std::vector<std::vector<float>> decode_logits(std::span<const int32_t> context, std::span<const int32_t> query,
                                              std::span<const int32_t> forced, const ContextPlan* plan) {
  TinyModel& m = tiny();
  KvCache cache = m.make_cache();
  const SeqId seq = 9;
  const int64_t n = static_cast<int64_t>(context.size());
  std::unique_ptr<AttentionHandler> handler;
  if (plan == nullptr) {
    auto local = std::make_unique<LocalAttention>(*m.backend, cache, m.hp);
    const auto pc = iota_positions(n, 0);
    BatchSeq c{seq, context, pc, false};
    EXPECT_TRUE(m.model->forward({&c, 1}, *local, nullptr).ok());
    handler = std::move(local);
  } else {
    ContextEncoder enc(*m.model, cache, *g_comm);
    auto lay = enc.layout_for(n, *plan);
    EXPECT_TRUE(lay.ok());
    EXPECT_TRUE(enc.encode(seq, context, *lay, plan->mode).ok());
    auto p2 = std::make_unique<Phase2Attention>(*m.backend, cache, m.hp, *g_comm, MergeAlgo::kAllReduce);
    p2->register_sequence(seq, *lay, g_comm->rank());
    handler = std::move(p2);
  }
  std::vector<std::vector<float>> steps;
  std::vector<float> logits;
  const auto pq = iota_positions(query.size(), n);
  BatchSeq q{seq, query, pq, false};
  EXPECT_TRUE(m.model->forward({&q, 1}, *handler, &logits).ok());
  steps.push_back(logits);
  int32_t pos = static_cast<int32_t>(n + static_cast<int64_t>(query.size()));
  for (int32_t t : forced) {
    BatchSeq d{seq, {&t, 1}, {&pos, 1}, false};
    logits.clear();
    EXPECT_TRUE(m.model->forward({&d, 1}, *handler, &logits).ok());
    steps.push_back(logits);
    ++pos;
  }
  return steps;
}

int32_t argmax_of(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

TEST(ExactZigzag, DecodeStepsEqualGlobal) {
  const int64_t w = g_comm->world_size();
  for (int64_t n : {2 * w + 1, int64_t{3}, int64_t{90}}) {
    const auto ctx = random_tokens(n, 400 + static_cast<uint32_t>(n), kVocab), qry = random_tokens(4, 401, kVocab);
    // The reference's greedy continuation: 10 tokens.
    std::vector<int32_t> forced;
    for (int i = 0; i < 10; ++i) forced.push_back(argmax_of(decode_logits(ctx, qry, forced, nullptr).back()));
    const auto want = decode_logits(ctx, qry, forced, nullptr);
    for (ExactLayout layout : {ExactLayout::kZigzag, ExactLayout::kContiguous}) {
      const ContextPlan plan = exact_plan(layout);
      const auto got = decode_logits(ctx, qry, forced, &plan);
      ASSERT_EQ(got.size(), want.size());
      for (size_t s = 0; s < got.size(); ++s) {
        EXPECT_LE(max_abs_diff(got[s], want[s]), kLogitTol)
            << "step " << s << ", " << n << " context tokens, layout " << static_cast<int>(layout) << ", rank "
            << g_comm->rank();
        if (s + 1 < got.size()) EXPECT_EQ(argmax_of(got[s]), forced[s]) << "step " << s;
      }
    }
  }
}

// Through the serving engine (admission, the control protocol's exact_layout word, phase 1,
// decode): greedy tokens of zigzag and contiguous equal
// global's, for a length that does not divide by 2W and one shorter than 2W.
TEST(ExactZigzag, GreedyTokensThroughTheEngineEqualGlobal) {
  for (int64_t n : {int64_t{83}, int64_t{3}}) {
    const auto ctx = random_tokens(n, 500 + static_cast<uint32_t>(n), kVocab), qry = random_tokens(3, 501, kVocab);
    const auto global = generate(ctx, qry, {AttentionMode::kGlobal, 0, 0});
    EXPECT_EQ(global.size(), 12u);
    EXPECT_EQ((generate)(ctx, qry, exact_plan(ExactLayout::kZigzag)), global) << n << " tokens, zigzag";
    EXPECT_EQ((generate)(ctx, qry, exact_plan(ExactLayout::kContiguous)), global) << n << " tokens, contiguous";
  }
}

}  // namespace
}  // namespace starserve

int main(int argc, char** argv) { return starserve::run_mpi_gtest(argc, argv, &starserve::g_comm); }
