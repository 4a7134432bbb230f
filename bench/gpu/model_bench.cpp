// Whole-model benchmark: a random-weight model of Llama-3-8B's shape through the real engine path
// (model, KV cache, context encoder, attention handlers, CUDA backend). Prints JSON lines:
//   {"bench":"gemm",...}          cuBLASLt GEMM TFLOP/s at the model's projection shapes (one rank);
//   {"bench":"ttft",...}          time to first token: the context encoded by the mode, then the
//                                 query through phase 2, with the FLOPs it implies;
//   {"bench":"decode",...}        milliseconds per generated token after that context (with
//                                 --entropy also while tracking every layer's entropy).
// Modes: global (one causal prefill; one rank only), exact (context parallelism: each rank encodes
// its span with attention to all earlier context), star (phase 1 over --blocks blocks, i.e. block
// = 1/blocks of the context, anchor = block), star@N (blocks of N tokens).
// Under `mpirun -np W` each rank drives GPU local_rank % n_gpus, and with one GPU per rank the
// collectives (exact's KV all-gather, phase 2's merge) run over NCCL; rank 0 prints. The peer (HF
// transformers on one GPU) is bench/gpu/model_peers.py; summarize_model.py joins them.
// Usage: [mpirun -np W] model_bench [--layers 32] [--lengths 16384,32768] [--modes global,star]
//                    [--blocks 4] [--merge allreduce|allgather]
//                    [--prefill-kernel mma|mma-m64|mma-m128|mma-m64-lazy|wmma]
//                    [--query 32] [--decode 16] [--entropy] [--gemm-only]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "bench/gpu/bench_args.h"
#include "comm/communicator.h"
#include "engine/local_attention.h"
#include "model/random_source.h"
#include "star/context_encoder.h"
#include "star/partition.h"

using namespace starserve;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<int32_t> tokens(int64_t n, int vocab, uint32_t seed) {
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    t[i] = static_cast<int32_t>((seed >> 8) % static_cast<uint32_t>(vocab));
  }
  return t;
}

int32_t argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

// FLOPs of the projections and MLP per token (2 per multiply-add), without the LM head.
double linear_flops_per_token(const ModelHParams& hp) {
  const double q = static_cast<double>(hp.n_heads) * hp.head_dim, kv = static_cast<double>(hp.n_kv_heads) * hp.head_dim;
  const double per_layer = hp.hidden * (q + 2 * kv) + q * hp.hidden + 3.0 * hp.hidden * hp.ffn_hidden;
  return 2.0 * per_layer * hp.n_layers;
}

// Attention FLOPs (QK^T and PV, 4 per query-key pair per head dim) over `pairs` visible pairs.
double attention_flops(const ModelHParams& hp, double pairs) {
  return 4.0 * pairs * hp.head_dim * hp.n_heads * hp.n_layers;
}

void bench_gemm(Backend& be, const ModelHParams& hp) {
  const int64_t q = int64_t{hp.n_heads} * hp.head_dim, kv = int64_t{hp.n_kv_heads} * hp.head_dim;
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const Shape shapes[] = {{"qkv", q + 2 * kv, hp.hidden}, {"o", hp.hidden, q}, {"gate_up", 2 * hp.ffn_hidden, hp.hidden},
                          {"down", hp.hidden, hp.ffn_hidden}};
  for (int64_t t : {int64_t{1}, int64_t{4096}, int64_t{16384}}) {
    for (const Shape& s : shapes) {
      DeviceBuffer in = be.alloc(t * s.k * 2), w = be.alloc(s.n * s.k * 2), out = be.alloc(t * s.n * 2);
      Tensor ti = in.view(DType::kBF16, {t, s.k}), tw = w.view(DType::kBF16, {s.n, s.k}),
             to = out.view(DType::kBF16, {t, s.n});
      std::vector<float> ones(std::max(t * s.k, s.n * s.k), 0.01f);
      be.upload_f32(ti, ones.data());
      be.upload_f32(tw, ones.data());
      for (int i = 0; i < 3; ++i) be.matmul(to, ti, tw);
      be.synchronize();
      const int reps = t == 1 ? 200 : 20;
      const auto t0 = Clock::now();
      for (int i = 0; i < reps; ++i) be.matmul(to, ti, tw);
      be.synchronize();
      const double s_per = since(t0) / reps;
      const double flops = 2.0 * t * s.n * s.k;
      const double bytes = 2.0 * (t * s.k + s.n * s.k + t * s.n);
      std::printf(
          "{\"bench\":\"gemm\",\"impl\":\"starserve-cublaslt\",\"shape\":\"%s\",\"m\":%lld,\"n\":%lld,\"k\":%lld,"
          "\"us\":%.2f,\"tflops\":%.1f,\"gbps\":%.0f}\n",
          s.name, static_cast<long long>(t), static_cast<long long>(s.n), static_cast<long long>(s.k), s_per * 1e6,
          flops / s_per / 1e12, bytes / s_per / 1e9);
      std::fflush(stdout);
    }
  }
}


// A mode named on the command line: its context plan, or global (one causal prefill).
struct Mode {
  std::string name;
  bool global = false;
  ContextPlan plan;
};

Result<Mode> parse_mode(const std::string& name, int blocks) {
  Mode m;
  m.name = name;
  if (name == "global") {
    m.global = true;
  } else if (name == "exact") {
    m.plan.mode = AttentionMode::kExact;
  } else if (name == "star") {
    m.plan.mode = AttentionMode::kStar;
    m.plan.n_blocks = blocks;
  } else if (name.rfind("star@", 0) == 0 && name.size() > 5) {
    m.plan.mode = AttentionMode::kStar;
    m.plan.block_size = std::atoi(name.c_str() + 5);
    if (m.plan.block_size < 1) return invalid_argument("mode {}: block size must be >= 1", name);
  } else {
    return invalid_argument("unknown mode '{}' (global, exact, star, star@N)", name);
  }
  return m;
}

// Visible (query, key) pairs of phase 1 summed over every rank, and the tokens projected. Every
// context token is projected once: the anchor's KV is c1's own on its owner, and the other ranks
// receive it (ContextEncoder's anchor exchange) instead of computing it again.
struct Work {
  double pairs = 0, tokens = 0;
};

Work phase1_work(const StarLayout& lay, AttentionMode mode) {
  const double n = static_cast<double>(lay.n_context);
  if (mode == AttentionMode::kExact || lay.blocks.size() <= 1) return {n * (n + 1) / 2, n};  // causal over all
  Work w;
  w.tokens = n;
  for (const StarBlock& b : lay.blocks) {
    const double l = static_cast<double>(b.size());
    w.pairs += l * (l + 1) / 2;
    if (b.index > 0 && lay.anchor_size > 0) w.pairs += l * lay.anchor_size;
  }
  return w;
}

int run(int argc, char** argv) {
  int layers = 32, blocks = 4, query = 32, decode = 16;
  bool gemm_only = false, entropy = false;
  std::string prefill_kernel = "mma", merge = "allreduce";
  std::vector<int64_t> lengths = {16384, 32768};
  std::vector<std::string> mode_names = {"global", "star"};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--layers") layers = std::atoi(next());
    else if (a == "--lengths") lengths = bench::split_integers(next());
    else if (a == "--modes") mode_names = bench::split_commas(next());
    else if (a == "--blocks") blocks = std::atoi(next());
    else if (a == "--query") query = std::atoi(next());
    else if (a == "--decode") decode = std::atoi(next());
    else if (a == "--gemm-only") gemm_only = true;
    else if (a == "--prefill-kernel") prefill_kernel = next();
    else if (a == "--merge") merge = next();
    else if (a == "--entropy") entropy = true;
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  auto prefill = parse_prefill_kernel(prefill_kernel);
  if (!prefill.ok()) {
    std::fprintf(stderr, "%s\n", prefill.status().to_string().c_str());
    return 2;
  }
  if (merge != "allreduce" && merge != "allgather") {
    std::fprintf(stderr, "--merge %s: allreduce or allgather\n", merge.c_str());
    return 2;
  }
  const MergeAlgo algo = merge == "allgather" ? MergeAlgo::kAllGather : MergeAlgo::kAllReduce;
  std::vector<Mode> modes;
  for (const std::string& name : mode_names) {
    auto m = parse_mode(name, blocks);
    if (!m.ok()) {
      std::fprintf(stderr, "%s\n", m.status().to_string().c_str());
      return 2;
    }
    modes.push_back(*m);
  }

  std::unique_ptr<Communicator> comm;
  if (launched_by_mpi()) {
    auto mpi = make_mpi_communicator(&argc, &argv);
    if (!mpi.ok()) {
      std::fprintf(stderr, "%s\n", mpi.status().to_string().c_str());
      return 1;
    }
    comm = std::move(mpi).value();
  } else {
    comm = make_local_communicator();
  }
  const int world = comm->world_size();
  const bool lead = comm->rank() == 0;
  const int n_gpus = cuda_device_count();
  if (n_gpus == 0) {
    if (lead) std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  const int device = pick_local_device(comm->layout(), n_gpus);
  CudaBackendOptions options;
  options.prefill = *prefill;
  auto backend_or = make_cuda_backend(device, options);
  if (!backend_or.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", comm->rank(), backend_or.status().to_string().c_str());
    comm->abort_job(1);
    return 1;
  }
  std::unique_ptr<Backend> be = std::move(backend_or).value();
  if (world > 1 && comm->layout().local_size <= n_gpus) {
    auto nccl = make_nccl_communicator(std::move(comm), device);
    if (!nccl.ok()) {
      std::fprintf(stderr, "%s\n", nccl.status().to_string().c_str());
      return 1;
    }
    comm = std::move(nccl).value();
  }
  const int gpus = std::min(world, n_gpus);
  const ModelHParams hp = llama3_8b_hparams(layers);
  if (world == 1) bench_gemm(*be, hp);
  if (gemm_only) return 0;

  const auto t_load = Clock::now();
  RandomWeightSource src(hp, 1);
  auto model_or = create_model(src, *be);
  if (!model_or.ok()) {
    std::fprintf(stderr, "model: %s\n", model_or.status().to_string().c_str());
    comm->abort_job(1);
    return 1;
  }
  std::unique_ptr<Model> model = std::move(model_or).value();
  if (lead) {
    std::fprintf(stderr, "random %d-layer Llama-3-8B-shaped model on %s in %.1f s; %d rank(s) on %d GPU(s) (%s)\n",
                 layers, be->name().c_str(), since(t_load), world, gpus, comm->name().c_str());
  }

  // KV pages per rank: the longest context's share plus an anchor, the query and the decode.
  const int64_t max_len = *std::max_element(lengths.begin(), lengths.end());
  int64_t anchor_max = (max_len + blocks - 1) / std::max(blocks, 1);
  for (const Mode& m : modes) anchor_max = std::max<int64_t>(anchor_max, m.plan.block_size);
  const int page = 256;
  const int64_t share = world == 1 ? max_len : std::max<int64_t>((max_len + world - 1) / world, anchor_max);
  const int64_t pages = (share + anchor_max + query + decode + 4 * page) / page + 8;
  KvCache cache(*be, {hp.n_layers, hp.n_kv_heads, hp.head_dim, page, pages});
  const double lin = linear_flops_per_token(hp);

  // One context length in one mode: TTFT, then decode; prints when asked. Non-zero: stop.
  auto measure = [&](int64_t n, const Mode& mode, bool print) -> int {
    const std::vector<int32_t> ctx = tokens(n, hp.n_vocab, static_cast<uint32_t>(n));
    const std::vector<int32_t> qry = tokens(query, hp.n_vocab, 99);
    if (mode.global && world > 1) {
      if (lead && print) std::fprintf(stderr, "global runs on one rank; skipped with %d\n", world);
      return 0;
    }
    const SeqId seq = 1;
    std::vector<float> logits;
    double ttft = 0, phase1 = 0, pairs = 0, projected = 0;
    double phase1_rank_min = 0, phase1_rank_max = 0;
    int block_size = static_cast<int>(n), n_blocks = 1;
    std::unique_ptr<AttentionHandler> handler;
    std::function<void(EntropyStats*)> track_entropy;  // on the handler, for --entropy
    std::vector<int32_t> pos;
    be->synchronize();
    (void)comm->barrier();
    const auto t0 = Clock::now();
    if (mode.global) {
      // One causal prefill of context + query, as a single-GPU server does it.
      std::vector<int32_t> all = ctx;
      all.insert(all.end(), qry.begin(), qry.end());
      pos.resize(all.size());
      std::iota(pos.begin(), pos.end(), 0);
      auto local = std::make_unique<LocalAttention>(*be, cache, hp);
      BatchSeq bs{seq, all, pos, false};
      const Status st = model->forward({&bs, 1}, *local, &logits);
      if (!st.ok()) {
        std::fprintf(stderr, "global %lld: %s\n", static_cast<long long>(n), st.to_string().c_str());
        cache.free_sequence(seq);
        return 0;
      }
      ttft = since(t0);
      const double m = static_cast<double>(all.size());
      pairs = m * (m + 1) / 2;
      projected = m;
      track_entropy = [h = local.get(), seq](EntropyStats* e) {
        if (e) h->track_entropy(seq, e);
        else h->untrack_entropy(seq);
      };
      handler = std::move(local);
    } else {
      ContextEncoder enc(*model, cache, *comm);
      auto layout = enc.layout_for(n, mode.plan);
      if (!layout.ok()) {
        std::fprintf(stderr, "%s layout: %s\n", mode.name.c_str(), layout.status().to_string().c_str());
        return 1;
      }
      block_size = layout->block_size;
      n_blocks = static_cast<int>(layout->blocks.size());
      const Status st = enc.encode(seq, ctx, *layout, mode.plan.mode);
      if (!st.ok()) {
        std::fprintf(stderr, "rank %d %s %lld: %s\n", comm->rank(), mode.name.c_str(), static_cast<long long>(n),
                     st.to_string().c_str());
        comm->abort_job(1);
        return 1;
      }
      be->synchronize();
      // Each rank's own phase-1 time, then the slowest one (the barrier) as the job's.
      float mine = static_cast<float>(since(t0));
      std::vector<float> all_ranks(world);
      (void)comm->all_gather(&mine, all_ranks.data(), sizeof(float));
      phase1_rank_min = *std::min_element(all_ranks.begin(), all_ranks.end());
      phase1_rank_max = *std::max_element(all_ranks.begin(), all_ranks.end());
      phase1 = since(t0);
      auto p2 = std::make_unique<Phase2Attention>(*be, cache, hp, *comm, algo);
      p2->register_sequence(seq, comm->rank() == layout->query_host, n);
      pos.resize(qry.size());
      std::iota(pos.begin(), pos.end(), static_cast<int32_t>(n));
      BatchSeq bs{seq, qry, pos, false};
      const Status st2 = model->forward({&bs, 1}, *p2, &logits);
      if (!st2.ok()) {
        std::fprintf(stderr, "phase 2: %s\n", st2.to_string().c_str());
        comm->abort_job(1);
        return 1;
      }
      ttft = since(t0);
      const Work w = phase1_work(*layout, mode.plan.mode);
      // Phase 2: every rank runs the whole model on the query; its keys are spread over ranks.
      pairs = w.pairs + static_cast<double>(query) * n + query * (query + 1) / 2.0;
      projected = w.tokens + static_cast<double>(query) * world;
      track_entropy = [h = p2.get(), seq](EntropyStats* e) { h->track_entropy(seq, e); };
      handler = std::move(p2);
    }
    const double flops = lin * projected + attention_flops(hp, pairs);
    if (lead && print) {
      std::printf(
          "{\"bench\":\"ttft\",\"impl\":\"starserve\",\"mode\":\"%s\",\"context\":%lld,\"query\":%d,\"blocks\":%d,"
          "\"block_size\":%d,\"ranks\":%d,\"gpus\":%d,\"comm\":\"%s\",\"merge\":\"%s\",\"layers\":%d,"
          "\"prefill_kernel\":\"%s\",\"ttft_s\":%.3f,\"phase1_s\":%.3f,\"phase1_rank_min_s\":%.3f,"
          "\"phase1_rank_max_s\":%.3f,\"tflop\":%.1f,\"tflops\":%.1f}\n",
          mode.name.c_str(), static_cast<long long>(n), query, n_blocks, block_size, world, gpus,
          comm->name().c_str(), merge.c_str(), layers, prefill_kernel.c_str(), ttft, phase1, phase1_rank_min,
          phase1_rank_max, flops / 1e12, flops / ttft / 1e12);
      std::fflush(stdout);
    }

    // Decode: greedy tokens one at a time after the context and query; rank 0 picks the token
    // (every rank holds the same merged logits) and broadcasts it, as the server does. With
    // --entropy, a second run of as many tokens tracks every layer's per-head entropy (what a
    // request with return_attention_entropy costs).
    int32_t next = argmax(logits);
    int32_t p = static_cast<int32_t>(n + query);
    for (const bool with_entropy : {false, true}) {
      if (with_entropy && !entropy) break;
      EntropyStats stats;
      if (with_entropy) {
        stats.reset(hp.n_layers, hp.n_heads);
        track_entropy(&stats);
      }
      be->synchronize();
      (void)comm->barrier();
      const auto t1 = Clock::now();
      for (int i = 0; i < decode; ++i) {
        (void)comm->broadcast(&next, sizeof(next), 0);
        BatchSeq d{seq, {&next, 1}, {&p, 1}, false};
        const Status st = model->forward({&d, 1}, *handler, &logits);
        if (!st.ok()) {
          std::fprintf(stderr, "decode: %s\n", st.to_string().c_str());
          comm->abort_job(1);
          return 1;
        }
        next = argmax(logits);
        ++p;
      }
      const double ms = since(t1) * 1e3 / std::max(decode, 1);
      if (with_entropy) track_entropy(nullptr);
      if (lead && print) {
        std::printf(
            "{\"bench\":\"decode\",\"impl\":\"starserve\",\"mode\":\"%s\",\"context\":%lld,\"block_size\":%d,"
            "\"ranks\":%d,\"gpus\":%d,\"merge\":\"%s\",\"layers\":%d,\"entropy\":%s,\"ms_per_token\":%.2f,"
            "\"tokens_per_s\":%.1f",
            mode.name.c_str(), static_cast<long long>(n), block_size, world, gpus, merge.c_str(), layers,
            with_entropy ? "true" : "false", ms, 1e3 / ms);
        if (with_entropy) {
          std::printf(",\"entropy_rows_per_layer\":%lld,\"entropy_layer0_mean\":%.4f,\"entropy_last_layer_mean\":%.4f",
                      static_cast<long long>(stats.count[0]), stats.layer_mean(0), stats.layer_mean(hp.n_layers - 1));
        }
        std::printf("}\n");
        std::fflush(stdout);
      }
    }
    cache.free_sequence(seq);
    return 0;
  };
  // Warm-up, not printed: every mode once at a short length (cuBLASLt plans, NCCL channels,
  // scratch buffers), so the first timed length does not carry them.
  for (const Mode& mode : modes) {
    if (const int rc = measure(std::min<int64_t>(4096, lengths.front()), mode, false)) return rc;
  }
  for (int64_t n : lengths) {
    for (const Mode& mode : modes) {
      if (const int rc = measure(n, mode, true)) return rc;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return run(argc, argv); }
