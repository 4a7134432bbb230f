// Whole-model benchmark on one GPU: a random-weight model of Llama-3-8B's shape through the real
// engine path (model, KV cache, attention handlers, CUDA backend). Prints JSON lines:
//   {"bench":"gemm",...}          cuBLASLt GEMM TFLOP/s at the model's projection shapes;
//   {"bench":"ttft",...}          time to first token, global (one causal prefill) or star
//                                 (phase 1 over blocks of 1/blocks of the context with an anchor,
//                                 then the query through phase 2), with the FLOPs it implies;
//   {"bench":"decode",...}        milliseconds per generated token after that context.
// The peer (HF transformers on the same GPU) is bench/gpu/model_peers.py; summarize.py joins them.
// Usage: model_bench [--layers 32] [--lengths 16384,32768] [--modes global,star] [--blocks 4]
//                    [--prefill-kernel mma|mma-m64|mma-m128|mma-m64-lazy|wmma]
//                    [--query 32] [--decode 16] [--gemm-only]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "engine/local_attention.h"
#include "model/random_source.h"
#include "star/context_encoder.h"

using namespace starserve;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
  return out;
}

std::vector<std::string> parse_words(const char* s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

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

}  // namespace

int main(int argc, char** argv) {
  int layers = 32, blocks = 4, query = 32, decode = 16;
  bool gemm_only = false;
  std::string prefill_kernel = "mma";
  std::vector<int64_t> lengths = {16384, 32768};
  std::vector<std::string> modes = {"global", "star"};
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
    else if (a == "--lengths") lengths = parse_list(next());
    else if (a == "--modes") modes = parse_words(next());
    else if (a == "--blocks") blocks = std::atoi(next());
    else if (a == "--query") query = std::atoi(next());
    else if (a == "--decode") decode = std::atoi(next());
    else if (a == "--gemm-only") gemm_only = true;
    else if (a == "--prefill-kernel") prefill_kernel = next();
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
  CudaBackendOptions options;
  options.prefill = *prefill;
  auto backend_or = make_cuda_backend(0, options);
  if (!backend_or.ok()) {
    std::fprintf(stderr, "SKIPPED: %s\n", backend_or.status().to_string().c_str());
    return 0;
  }
  std::unique_ptr<Backend> be = std::move(backend_or).value();
  const ModelHParams hp = llama3_8b_hparams(layers);
  bench_gemm(*be, hp);
  if (gemm_only) return 0;

  const auto t_load = Clock::now();
  RandomWeightSource src(hp, 1);
  auto model_or = create_model(src, *be);
  if (!model_or.ok()) {
    std::fprintf(stderr, "model: %s\n", model_or.status().to_string().c_str());
    return 1;
  }
  std::unique_ptr<Model> model = std::move(model_or).value();
  std::fprintf(stderr, "random %d-layer Llama-3-8B-shaped model on %s in %.1f s\n", layers, be->name().c_str(),
               since(t_load));

  const int64_t max_len = *std::max_element(lengths.begin(), lengths.end());
  const int page = 256;
  const int64_t pages = (max_len + max_len / blocks + query + decode + 4 * page) / page + 8;
  KvCache cache(*be, {hp.n_layers, hp.n_kv_heads, hp.head_dim, page, pages});
  auto comm = make_local_communicator();
  const double lin = linear_flops_per_token(hp);

  for (int64_t n : lengths) {
    const std::vector<int32_t> ctx = tokens(n, hp.n_vocab, static_cast<uint32_t>(n));
    const std::vector<int32_t> qry = tokens(query, hp.n_vocab, 99);
    for (const std::string& mode : modes) {
      const SeqId seq = 1;
      std::vector<float> logits;
      double ttft = 0, phase1 = 0, pairs = 0;
      std::unique_ptr<AttentionHandler> handler;
      std::vector<int32_t> pos;
      be->synchronize();
      const auto t0 = Clock::now();
      if (mode == "global") {
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
          continue;
        }
        ttft = since(t0);
        const double m = static_cast<double>(all.size());
        pairs = m * (m + 1) / 2;
        handler = std::move(local);
      } else {
        ContextEncoder enc(*model, cache, *comm);
        ContextPlan plan;
        plan.mode = AttentionMode::kStar;
        plan.n_blocks = blocks;
        auto layout = enc.layout_for(n, plan);
        if (!layout.ok()) {
          std::fprintf(stderr, "star layout: %s\n", layout.status().to_string().c_str());
          return 1;
        }
        const Status st = enc.encode(seq, ctx, *layout, AttentionMode::kStar);
        enc.finish(seq);
        if (!st.ok()) {
          std::fprintf(stderr, "star %lld: %s\n", static_cast<long long>(n), st.to_string().c_str());
          cache.free_sequence(seq);
          continue;
        }
        be->synchronize();
        phase1 = since(t0);
        auto p2 = std::make_unique<Phase2Attention>(*be, cache, hp, *comm, MergeAlgo::kAllReduce);
        p2->register_sequence(seq, true, n);
        pos.resize(qry.size());
        std::iota(pos.begin(), pos.end(), static_cast<int32_t>(n));
        BatchSeq bs{seq, qry, pos, false};
        const Status st2 = model->forward({&bs, 1}, *p2, &logits);
        if (!st2.ok()) {
          std::fprintf(stderr, "phase 2: %s\n", st2.to_string().c_str());
          return 1;
        }
        ttft = since(t0);
        // Visible pairs: block b sees the anchor (b > 0) and itself causally; the query sees all.
        const double b = std::ceil(static_cast<double>(n) / blocks);
        for (int64_t s = 0; s < n; s += static_cast<int64_t>(b)) {
          const double len = std::min<double>(b, static_cast<double>(n - s));
          pairs += len * (len + 1) / 2 + (s > 0 ? len * b : 0);
        }
        pairs += static_cast<double>(query) * n + query * (query + 1) / 2.0;
        handler = std::move(p2);
      }
      // One process owns every block, so the anchor is c1's own KV: no token is projected twice.
      const double tokens_in = static_cast<double>(n + query);
      const double flops = lin * tokens_in + attention_flops(hp, pairs);
      std::printf(
          "{\"bench\":\"ttft\",\"impl\":\"starserve\",\"mode\":\"%s\",\"context\":%lld,\"query\":%d,\"blocks\":%d,"
          "\"layers\":%d,\"prefill_kernel\":\"%s\",\"ttft_s\":%.3f,\"phase1_s\":%.3f,\"tflop\":%.1f,\"tflops\":%.1f}\n",
          mode.c_str(), static_cast<long long>(n), query, mode == "star" ? blocks : 1, layers, prefill_kernel.c_str(),
          ttft, phase1, flops / 1e12, flops / ttft / 1e12);
      std::fflush(stdout);

      // Decode: greedy tokens one at a time after the context and query.
      int32_t next = argmax(logits);
      int32_t p = static_cast<int32_t>(n + query);
      be->synchronize();
      const auto t1 = Clock::now();
      for (int i = 0; i < decode; ++i) {
        BatchSeq d{seq, {&next, 1}, {&p, 1}, false};
        const Status st = model->forward({&d, 1}, *handler, &logits);
        if (!st.ok()) {
          std::fprintf(stderr, "decode: %s\n", st.to_string().c_str());
          break;
        }
        next = argmax(logits);
        ++p;
      }
      const double ms = since(t1) * 1e3 / std::max(decode, 1);
      std::printf(
          "{\"bench\":\"decode\",\"impl\":\"starserve\",\"mode\":\"%s\",\"context\":%lld,\"layers\":%d,"
          "\"ms_per_token\":%.2f,\"tokens_per_s\":%.1f}\n",
          mode.c_str(), static_cast<long long>(n), layers, ms, 1e3 / ms);
      std::fflush(stdout);
      cache.free_sequence(seq);
    }
  }
  return 0;
}
