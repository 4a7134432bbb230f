// Phase-2 merge cost per layer across GPUs: RankMerger::merge_on (the call Phase2Attention makes
// once per layer and step) on the CUDA backend over NCCL, both algorithms, at decode and prefill
// sizes. Rows are (token, head) pairs of an 8B-shaped model (32 heads of 128). Prints JSON lines
//   {"bench":"merge","impl":"starserve","algo":"allreduce"|"allgather","tokens":T,"rows":R,
//    "bytes_per_rank":B,"us":...}
// where bytes_per_rank is what the collectives send from each rank. The peer is
// bench/gpu/merge_peers.py: the same two merges in torch ops over torch.distributed's NCCL, in the
// same job. Run under `mpirun -np W` with one GPU per rank.
// Usage: mpirun -np W merge_bench [--tokens 1,4,32,256,2048] [--iters 200]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "bench/gpu/bench_args.h"
#include "comm/communicator.h"
#include "kernels/ref/attention_ref.h"
#include "star/merge.h"

using namespace starserve;

namespace {

int run(int argc, char** argv) {
  std::vector<int64_t> token_counts = {1, 4, 32, 256, 2048};
  int iters = 200;
  const int n_heads = 32, head_dim = 128;
  auto mpi = make_mpi_communicator(&argc, &argv);
  if (!mpi.ok()) {
    std::fprintf(stderr, "%s\n", mpi.status().to_string().c_str());
    return 1;
  }
  std::unique_ptr<Communicator> comm = std::move(mpi).value();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokens" && i + 1 < argc) token_counts = bench::split_integers(argv[++i]);
    else if (a == "--iters" && i + 1 < argc) iters = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  const bool lead = comm->rank() == 0;
  const int n_gpus = cuda_device_count();
  if (n_gpus == 0 || comm->world_size() < 2 || comm->layout().local_size > n_gpus) {
    if (lead) std::printf("SKIPPED: needs one GPU per rank and >= 2 ranks (%d GPU(s), %d rank(s))\n", n_gpus,
                          comm->world_size());
    return 0;
  }
  const int device = pick_local_device(comm->layout(), n_gpus);
  auto backend = make_cuda_backend(device);
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", backend.status().to_string().c_str());
    comm->abort_job(1);
    return 1;
  }
  Backend& be = **backend;
  auto nccl = make_nccl_communicator(std::move(comm), device);
  if (!nccl.ok()) {
    std::fprintf(stderr, "%s\n", nccl.status().to_string().c_str());
    return 1;
  }
  comm = std::move(nccl).value();
  const int world = comm->world_size();

  std::mt19937 rng(17 + comm->rank());
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  for (const char* algo_name : {"allreduce", "allgather"}) {
    const MergeAlgo algo = std::string(algo_name) == "allgather" ? MergeAlgo::kAllGather : MergeAlgo::kAllReduce;
    RankMerger merger(*comm, algo);
    for (int64_t t : token_counts) {
      const int64_t rows = t * n_heads;
      std::vector<float> o(rows * head_dim), lse(rows), ent(rows);
      for (float& x : o) x = uni(rng);
      for (float& x : lse) x = 8.0f + 4.0f * uni(rng);
      for (float& x : ent) x = 3.0f + uni(rng);
      DeviceBuffer d_o = be.alloc(o.size() * 4), d_lse = be.alloc(rows * 4), d_ent = be.alloc(rows * 4);
      auto f32 = [](const DeviceBuffer& b, int64_t n) { return b.view(DType::kF32, {n}); };
      auto reset = [&] {
        be.upload_f32(f32(d_o, rows * head_dim), o.data());
        be.upload_f32(f32(d_lse, rows), lse.data());
        be.upload_f32(f32(d_ent, rows), ent.data());
      };
      auto merge_once = [&] {
        const Status st = merger.merge_on(be, static_cast<float*>(d_o.data()), static_cast<float*>(d_lse.data()),
                                          static_cast<float*>(d_ent.data()), rows, head_dim);
        if (!st.ok()) {
          std::fprintf(stderr, "merge: %s\n", st.to_string().c_str());
          comm->abort_job(1);
        }
      };
      // Check once: the device merge equals the reference over every rank's partials.
      reset();
      std::vector<float> all_o(world * o.size()), all_lse(world * rows), all_ent(world * rows);
      (void)comm->all_gather(o.data(), all_o.data(), o.size() * 4);
      (void)comm->all_gather(lse.data(), all_lse.data(), rows * 4);
      (void)comm->all_gather(ent.data(), all_ent.data(), rows * 4);
      std::vector<AttentionPartial> parts;
      for (int r = 0; r < world; ++r) {
        parts.push_back({all_o.data() + r * o.size(), all_lse.data() + r * rows, all_ent.data() + r * rows});
      }
      std::vector<float> ref_o(o.size()), ref_lse(rows), ref_ent(rows);
      merge_partials_ref(ref_o.data(), ref_lse.data(), ref_ent.data(), parts, rows, head_dim);
      merge_once();
      std::vector<float> got_o(o.size()), got_lse(rows);
      be.download_f32(got_o.data(), f32(d_o, rows * head_dim));
      be.download_f32(got_lse.data(), f32(d_lse, rows));
      double worst = 0;
      for (size_t i = 0; i < got_o.size(); ++i) worst = std::max(worst, double(std::fabs(got_o[i] - ref_o[i])));
      for (int64_t i = 0; i < rows; ++i) worst = std::max(worst, double(std::fabs(got_lse[i] - ref_lse[i])));
      if (worst > 1e-4) {
        std::fprintf(stderr, "rank %d: %s merge of %lld rows differs from the reference by %g\n", comm->rank(),
                     algo_name, static_cast<long long>(rows), worst);
        comm->abort_job(1);
      }
      for (int i = 0; i < 10; ++i) merge_once();
      be.synchronize();
      (void)comm->barrier();
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) merge_once();
      be.synchronize();
      const double us = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e6 / iters;
      // What each rank sends: the all-reduce moves max(LSE) then (head_dim + 3) floats per row; the
      // all-gather (head_dim + 2) floats per row and receives that from every rank.
      const int64_t bytes = algo == MergeAlgo::kAllReduce ? rows * 4 * (1 + head_dim + 3) : rows * 4 * (head_dim + 2);
      float mine = static_cast<float>(us);
      std::vector<float> per_rank(world);
      (void)comm->all_gather(&mine, per_rank.data(), sizeof(float));
      if (lead) {
        std::printf(
            "{\"bench\":\"merge\",\"impl\":\"starserve\",\"algo\":\"%s\",\"ranks\":%d,\"tokens\":%lld,\"rows\":%lld,"
            "\"head_dim\":%d,\"bytes_per_rank\":%lld,\"us\":%.2f,\"max_err\":%.2e}\n",
            algo_name, world, static_cast<long long>(t), static_cast<long long>(rows), head_dim,
            static_cast<long long>(bytes), *std::max_element(per_rank.begin(), per_rank.end()), worst);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return run(argc, argv); }
