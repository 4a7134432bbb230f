// Star Attention and exact context parallelism on the CUDA backend across MPI ranks, SPMD under
// `mpirun -np N`. Ranks get GPU local_rank % n_gpus. When every rank has its own GPU the
// communicator is NCCL (device all-gather + merge kernel); when ranks share a GPU the merge goes
// through MPI on host memory. Either way the logits must equal one process computing the same
// blocks on the same GPU, within bf16 rounding. Without a CUDA device the binary exits 77
// (ctest: skipped).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "star/local_attention.h"
#include "model/random_source.h"
#include "star/attention_stats.h"
#include "star/context_encoder.h"

namespace starserve {
namespace {

Communicator* g_comm = nullptr;
Backend* g_backend = nullptr;

std::unique_ptr<Model> g_model;  // released before the backend in main()

Model& model() {
  if (!g_model) {
    RandomWeightSource src(small_llama_hd64_hparams(), 5);
    auto r = create_model(src, *g_backend);
    SS_CHECK(r.ok(), "{}", r.status().to_string());
    g_model = std::move(r).value();
  }
  return *g_model;
}

std::vector<int32_t> tokens(size_t n, uint32_t seed) {
  std::vector<int32_t> t(n);
  for (auto& x : t) {
    seed = seed * 1664525u + 1013904223u;
    x = static_cast<int32_t>((seed >> 8) % 512u);
  }
  return t;
}

// Context through ContextEncoder on `comm`, then the query through Phase2Attention; logits of
// every query row (identical on every rank).
std::vector<float> run(Communicator& comm, std::span<const int32_t> context, std::span<const int32_t> query,
                       const ContextPlan& plan, MergeAlgo algo, EntropyStats* stats = nullptr) {
  Model& m = model();
  const ModelHParams& hp = m.hparams();
  KvCache cache(*g_backend, {hp.n_layers, hp.n_kv_heads, hp.head_dim, 64, 64});
  ContextEncoder enc(m, cache, comm);
  auto lay = enc.layout_for(static_cast<int64_t>(context.size()), plan);
  EXPECT_TRUE(lay.ok());
  EXPECT_TRUE(enc.encode(1, context, *lay, plan.mode).ok());
  Phase2Attention p2(*g_backend, cache, hp, comm, algo);
  p2.register_sequence(1, *lay, comm.rank());
  std::vector<int32_t> pos(query.size());
  std::iota(pos.begin(), pos.end(), static_cast<int32_t>(context.size()));
  BatchSeq q{1, query, pos, true};
  std::vector<float> logits;
  if (stats) {
    stats->reset(hp.n_layers, hp.n_heads);
    p2.track_entropy(1, stats);
  }
  EXPECT_TRUE(m.forward({&q, 1}, p2, &logits).ok());
  return logits;
}

// bf16 activations: the distributed merge sums fp32 partials in another order than one kernel
// over all keys, then rounds to bf16; 2% of the largest logit is far above that (~0.5%) and far
// below what a wrong mask or a lost shard does (tens of percent).
void expect_close(const std::vector<float>& ref, const std::vector<float>& got, const char* what) {
  ASSERT_EQ(ref.size(), got.size()) << what;
  double worst = 0, scale = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::fabs(ref[i] - got[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(ref[i])));
  }
  if (g_comm->rank() == 0) {
    std::printf("  %s on %d ranks (%s): max |Δ| %.4f of max |logit| %.2f\n", what, g_comm->world_size(),
                g_comm->name().c_str(), worst, scale);
  }
  EXPECT_LE(worst, 0.02 * scale) << what << " rank " << g_comm->rank();
}

TEST(StarGpuMpi, StarAcrossRanksEqualsOneProcess) {
  const auto context = tokens(700, 1), query = tokens(20, 2), short_query = tokens(5, 3);
  ContextPlan plan;
  plan.mode = AttentionMode::kStar;
  plan.block_size = 100;
  plan.anchor_size = 100;
  auto local = make_local_communicator();
  for (MergeAlgo algo : {MergeAlgo::kAllReduce, MergeAlgo::kAllGather}) {
    expect_close(run(*local, context, query, plan, algo), run(*g_comm, context, query, plan, algo), "star, 20-row query");
    expect_close(run(*local, context, short_query, plan, algo), run(*g_comm, context, short_query, plan, algo),
                 "star, 5-row query");
  }
  // Ragged anchor (not a whole number of KV pages): phase 1 gathers the keys.
  plan.anchor_size = 90;
  expect_close(run(*local, context, query, plan, MergeAlgo::kAllReduce),
               run(*g_comm, context, query, plan, MergeAlgo::kAllReduce), "star, anchor 90");
}

// The rank entropy of phase 2 (RankMerger::rank_entropy) as the device merges leave it: the all-reduce's summed terms
// and the all-gather's gathered LSEs are two independent reads of the same partials, so they agree to fp32 rounding;
// every value lies in [0, ln W] and star over several ranks spreads some mass (not all zero).
TEST(StarGpuMpi, RankEntropyAgreesBetweenTheDeviceMerges) {
  const int world = g_comm->world_size();
  if (world < 2) GTEST_SKIP() << "one rank: no rank entropy";
  const auto context = tokens(700, 6), query = tokens(12, 7);
  ContextPlan plan;
  plan.mode = AttentionMode::kStar;
  plan.block_size = 100;
  plan.anchor_size = 100;
  EntropyStats sum, gather;
  run(*g_comm, context, query, plan, MergeAlgo::kAllReduce, &sum);
  run(*g_comm, context, query, plan, MergeAlgo::kAllGather, &gather);
  ASSERT_TRUE(sum.has_rank_entropy() && gather.has_rank_entropy());
  EXPECT_EQ(sum.n_ranks, world);
  double worst = 0, total = 0;
  for (int l = 0; l < sum.n_layers; ++l) {
    for (int h = 0; h < sum.n_heads; ++h) {
      const double a = sum.rank_mean(l, h), b = gather.rank_mean(l, h);
      worst = std::max(worst, std::fabs(a - b));
      total += a;
      EXPECT_GE(a, 0.0);
      EXPECT_LE(a, std::log(static_cast<double>(world)) + 1e-5);
    }
  }
  if (g_comm->rank() == 0) {
    std::printf("  rank entropy on %d ranks (%s): all-reduce vs all-gather max |diff| %.2e, mean %.4f nats\n", world,
                g_comm->name().c_str(), worst, total / (sum.n_layers * sum.n_heads));
  }
  EXPECT_LE(worst, 1e-4);
  EXPECT_GT(total, 0.0);
}

// Exact mode in its default layout (zigzag: rank r holds chunks r and 2W-1-r) and in the contiguous
// one, on a context that 2W does not divide and on one shorter than 2W (a rank with nothing).
TEST(StarGpuMpi, ExactAcrossRanksEqualsGlobal) {
  ContextPlan global;
  global.mode = AttentionMode::kGlobal;
  auto local = make_local_communicator();
  for (const int64_t n : {int64_t{500}, int64_t{501}, int64_t{3}}) {
    const auto context = tokens(n, 4), query = tokens(20, 5);
    const auto ref = run(*local, context, query, global, MergeAlgo::kAllReduce);
    for (const ExactLayout layout : {ExactLayout::kAuto, ExactLayout::kZigzag, ExactLayout::kContiguous}) {
      ContextPlan exact;
      exact.mode = AttentionMode::kExact;
      exact.exact_layout = layout;
      const std::string what = "exact (" + std::string(layout == ExactLayout::kContiguous ? "contiguous"
                                                       : layout == ExactLayout::kZigzag   ? "zigzag"
                                                                                           : "default") +
                               ", " + std::to_string(n) + " tokens) vs global";
      expect_close(ref, run(*g_comm, context, query, exact, MergeAlgo::kAllReduce), what.c_str());
    }
  }
}

}  // namespace
}  // namespace starserve

int main(int argc, char** argv) {
  using namespace starserve;
  auto mpi = make_mpi_communicator(&argc, &argv);
  if (!mpi.ok()) {
    std::fprintf(stderr, "%s\n", mpi.status().to_string().c_str());
    return 1;
  }
  std::unique_ptr<Communicator> comm = std::move(mpi).value();
  const int n_gpus = cuda_device_count();
  if (n_gpus == 0) {
    if (comm->rank() == 0) std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  const int device = pick_local_device(comm->layout(), n_gpus);
  auto backend = make_cuda_backend(device);
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", backend.status().to_string().c_str());
    comm->abort_job(1);
  }
  if (comm->world_size() > 1 && comm->layout().local_size <= n_gpus) {
    auto nccl = make_nccl_communicator(std::move(comm), device);
    if (!nccl.ok()) {
      std::fprintf(stderr, "%s\n", nccl.status().to_string().c_str());
      return 1;
    }
    comm = std::move(nccl).value();
  }
  g_comm = comm.get();
  g_backend = backend->get();
  ::testing::InitGoogleTest(&argc, argv);
  if (g_comm->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int rc = RUN_ALL_TESTS();
  g_model.reset();
  float failed = static_cast<float>(rc != 0);
  (void)g_comm->all_reduce_max(&failed, 1);
  return failed > 0 ? 1 : 0;
}
