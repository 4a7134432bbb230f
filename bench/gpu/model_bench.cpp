// Whole-model benchmark: a random-weight model of Llama-3-8B's shape through the real engine path
// (model, KV cache, context encoder, attention handlers, CUDA backend). Prints JSON lines:
//   {"bench":"gemm",...}          cuBLASLt GEMM TFLOP/s at the model's projection shapes (one rank);
//   {"bench":"ttft",...}          time to first token: the context encoded by the mode, then the
//                                 query through phase 2, with the FLOPs it implies;
//   {"bench":"decode_batch",...}  with --seqs S: milliseconds per step of S sequences decoded together;
//   {"bench":"decode",...}        milliseconds per generated token after that context, the token
//                                 picked on the device as the server does (with --entropy also
//                                 while tracking every layer's entropy).
// Modes: global (one causal prefill; one rank only), exact (context parallelism: each rank encodes
// its share with attention to all earlier context, in the default layout: zigzag for the Llama
// shape), exact@zigzag / exact@contiguous (that layout: 2W chunks, rank r holding r and 2W-1-r, or
// one span per rank), star (phase 1 over --blocks blocks, i.e. block = 1/blocks of the context,
// anchor = block), star@N (blocks of N tokens).
// Under `mpirun -np W` each rank drives GPU local_rank % n_gpus, and with one GPU per rank the
// collectives (exact's KV all-gather, phase 2's merge) run over NCCL; rank 0 prints. The peer (HF
// transformers on one GPU) is bench/gpu/model_peers.py; summarize_model.py joins them.
// Usage: [mpirun -np W] model_bench [--layers 32] [--lengths 16384,32768] [--modes global,star]
//                    [--blocks 4] [--merge allreduce|allgather|auto]
//                    [--prefill-kernel auto|wgmma|mma]
//                    [--query 32] [--decode 16] [--entropy] [--gemm-only] [--graph-probe] [--op-census]
//                    [--gemv on|off]  (one-row GEMMs: the skinny kernel, or cuBLASLt)
//                    [--graphs on|off]  (one rank: decode steps as CUDA graphs, as the server runs them)
//                    [--shape 8b|smollm2]  (the random model's shape: Llama-3-8B's, or SmolLM2-135M's)
//                    [--seqs S] [--batch-decode on|off]  (S sequences decoded together; their
//                    attention in one launch per layer, or one launch per sequence)
//                    [--arch llama|kvshift|both]  (both: the plain Llama shape, then its KV-shifting
//                    variant (model/arch_kvshift.cpp) in the same run, one model at a time, and a
//                    {"bench":"kvshift_overhead",...} line per context and mode with the ratios)
// --op-census: a decode step's ops by kind, each captured as a CUDA graph (see op_census).
// --graph-probe (global mode, one rank) adds {"bench":"decode_probe",...}: where a decode step's
// time goes. The same step eager, the host's time to enqueue it, the step captured once as a CUDA
// graph and replayed (the GPU's own time with launch gaps gone), and the step captured anew each
// time and applied to an instantiated graph with cudaGraphExecUpdate before its launch.
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <tuple>
#include <numeric>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "kernels/gemv.h"
#include "bench/gpu/bench_args.h"
#include "comm/communicator.h"
#include "common/config.h"
#include "star/local_attention.h"
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

void bench_gemm(Backend& be, const ModelHParams& hp, int gemv_max_tokens) {
  const int64_t q = int64_t{hp.n_heads} * hp.head_dim, kv = int64_t{hp.n_kv_heads} * hp.head_dim;
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const Shape shapes[] = {{"qkv", q + 2 * kv, hp.hidden}, {"o", hp.hidden, q}, {"gate_up", 2 * hp.ffn_hidden, hp.hidden},
                          {"down", hp.hidden, hp.ffn_hidden}};
  for (int64_t t : {int64_t{1}, int64_t{4}, int64_t{4096}, int64_t{16384}}) {
    for (const Shape& s : shapes) {
      // Decode-sized products stream their weights from HBM in the model (32 layers' worth, far
      // beyond the 50 MB L2): rotate over copies of at least 256 MB in all so that they do here too.
      const int64_t w_bytes = s.n * s.k * 2;
      const int copies = t <= 8 ? static_cast<int>(std::max<int64_t>(1, ((int64_t{256} << 20) + w_bytes - 1) / w_bytes)) : 1;
      DeviceBuffer in = be.alloc(t * s.k * 2), out = be.alloc(t * s.n * 2);
      std::vector<DeviceBuffer> ws;
      Tensor ti = in.view(DType::kBF16, {t, s.k}), to = out.view(DType::kBF16, {t, s.n});
      std::vector<Tensor> tws;
      std::vector<float> ones(std::max(t * s.k, s.n * s.k), 0.01f);
      be.upload_f32(ti, ones.data());
      for (int c = 0; c < copies; ++c) {
        ws.push_back(be.alloc(w_bytes));
        tws.push_back(ws.back().view(DType::kBF16, {s.n, s.k}));
        be.upload_f32(tws.back(), ones.data());
      }
      for (int i = 0; i < 3; ++i) be.matmul(to, ti, tws[i % copies]);
      be.synchronize();
      const int reps = t <= 8 ? 200 : 20;
      const auto t0 = Clock::now();
      for (int i = 0; i < reps; ++i) be.matmul(to, ti, tws[i % copies]);
      be.synchronize();
      const double s_per = since(t0) / reps;
      const double flops = 2.0 * t * s.n * s.k;
      const double bytes = 2.0 * (t * s.k + s.n * s.k + t * s.n);
      std::printf(
          "{\"bench\":\"gemm\",\"impl\":\"%s\",\"shape\":\"%s\",\"m\":%lld,\"n\":%lld,\"k\":%lld,"
          "\"us\":%.2f,\"tflops\":%.1f,\"gbps\":%.0f}\n",
          t <= std::min(gemv_max_tokens, kGemvMaxTokens) ? "starserve-gemv" : "starserve-cublaslt", s.name, static_cast<long long>(t),
          static_cast<long long>(s.n), static_cast<long long>(s.k), s_per * 1e6,
          flops / s_per / 1e12, bytes / s_per / 1e9);
      std::fflush(stdout);
    }
  }
}


#define PROBE_CUDA(expr)                                                             \
  do {                                                                               \
    const cudaError_t e_ = (expr);                                                   \
    if (e_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s: %s\n", #expr, cudaGetErrorString(e_));               \
      return 1;                                                                      \
    }                                                                                \
  } while (0)

// --graph-probe: one decode step (no logits) four ways; see the header. Advances the sequence by
// 3 * steps + 1 tokens (the eager, enqueue and re-capture runs write the KV cache; the replays
// rewrite one slot).
int probe_decode(Backend& be, Model& model, AttentionHandler& handler, SeqId seq, int32_t token, int32_t pos,
                 int steps, int64_t context) {
  auto* stream = static_cast<cudaStream_t>(be.stream());
  auto step = [&]() -> bool {
    BatchSeq d{seq, {&token, 1}, {&pos, 1}, false};
    const Status st = model.forward({&d, 1}, handler, nullptr);
    if (!st.ok()) std::fprintf(stderr, "probe step: %s\n", st.to_string().c_str());
    ++pos;
    return st.ok();
  };
  // Eager, synchronised once at the end: the GPU's time when the host keeps ahead.
  be.synchronize();
  auto t0 = Clock::now();
  for (int i = 0; i < steps; ++i)
    if (!step()) return 1;
  be.synchronize();
  const double eager_ms = since(t0) * 1e3 / steps;
  // The host's enqueue time alone: each step synchronised before the next one is timed.
  double enqueue = 0;
  for (int i = 0; i < steps; ++i) {
    be.synchronize();
    const auto t = Clock::now();
    if (!step()) return 1;
    enqueue += since(t);
  }
  be.synchronize();
  const double enqueue_ms = enqueue * 1e3 / steps;
  // Captured once, replayed.
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  PROBE_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const bool ok = step();
  PROBE_CUDA(cudaStreamEndCapture(stream, &graph));
  if (!ok) return 1;
  size_t nodes = 0;
  PROBE_CUDA(cudaGraphGetNodes(graph, nullptr, &nodes));
  PROBE_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  PROBE_CUDA(cudaGraphLaunch(exec, stream));
  be.synchronize();
  t0 = Clock::now();
  for (int i = 0; i < steps; ++i) PROBE_CUDA(cudaGraphLaunch(exec, stream));
  be.synchronize();
  const double replay_ms = since(t0) * 1e3 / steps;
  // Captured anew each step (the host's per-step work and page tables as they are) and applied to
  // the instantiated graph, then launched.
  double capture = 0, update = 0;
  int reinstantiated = 0;
  be.synchronize();
  t0 = Clock::now();
  for (int i = 0; i < steps; ++i) {
    cudaGraph_t g = nullptr;
    auto t = Clock::now();
    PROBE_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    const bool ok_i = step();
    PROBE_CUDA(cudaStreamEndCapture(stream, &g));
    if (!ok_i) return 1;
    capture += since(t);
    t = Clock::now();
    cudaGraphExecUpdateResultInfo info{};
    if (cudaGraphExecUpdate(exec, g, &info) != cudaSuccess) {
      (void)cudaGetLastError();
      PROBE_CUDA(cudaGraphExecDestroy(exec));
      PROBE_CUDA(cudaGraphInstantiate(&exec, g, 0));
      ++reinstantiated;
    }
    update += since(t);
    PROBE_CUDA(cudaGraphLaunch(exec, stream));
    PROBE_CUDA(cudaGraphDestroy(g));
  }
  be.synchronize();
  const double recapture_ms = since(t0) * 1e3 / steps;
  PROBE_CUDA(cudaGraphExecDestroy(exec));
  PROBE_CUDA(cudaGraphDestroy(graph));
  std::printf(
      "{\"bench\":\"decode_probe\",\"impl\":\"starserve\",\"mode\":\"global\",\"context\":%lld,\"steps\":%d,"
      "\"graph_nodes\":%zu,\"eager_ms\":%.3f,\"enqueue_ms\":%.3f,\"graph_replay_ms\":%.3f,"
      "\"recapture_ms\":%.3f,\"capture_ms\":%.3f,\"exec_update_ms\":%.3f,\"reinstantiated\":%d}\n",
      static_cast<long long>(context), steps, nodes, eager_ms, enqueue_ms, replay_ms, recapture_ms,
      capture * 1e3 / steps, update * 1e3 / steps, reinstantiated);
  std::fflush(stdout);
  return 0;
}

// --op-census: one decode step's ops by kind, each kind captured as a CUDA graph over every layer
// (distinct weights per layer, so nothing is served from L2) and replayed; prints
// {"bench":"decode_ops",...} lines with microseconds per step and the bytes the kind must move.
int op_census(Backend& be, const ModelHParams& hp, int64_t context, bool gemv) {
  auto* stream = static_cast<cudaStream_t>(be.stream());
  const int64_t hidden = hp.hidden, ffn = hp.ffn_hidden, hd = hp.head_dim;
  const int64_t qd = int64_t{hp.n_heads} * hd, kvd = int64_t{hp.n_kv_heads} * hd;
  const int layers = hp.n_layers;
  std::vector<DeviceBuffer> keep;
  auto buf = [&](DType dt, std::initializer_list<int64_t> dims) {
    Tensor t = Tensor::make(nullptr, dt, dims);
    keep.push_back(be.alloc(t.bytes()));
    (void)cudaMemsetAsync(keep.back().data(), 0, t.bytes(), stream);
    t.data = keep.back().data();
    return t;
  };
  const DType bf = DType::kBF16;
  Tensor x = buf(bf, {1, hidden}), h = buf(bf, {1, hidden}), q = buf(bf, {1, hp.n_heads, hd}),
         k = buf(bf, {1, hp.n_kv_heads, hd}), v = buf(bf, {1, hp.n_kv_heads, hd}), g = buf(bf, {1, ffn}),
         u = buf(bf, {1, ffn}), qkv = buf(bf, {1, qd + 2 * kvd}), gu = buf(bf, {1, 2 * ffn});
  Tensor norm_w = buf(bf, {hidden});
  Tensor inv = buf(DType::kF32, {hp.rope_dim / 2});
  struct Layer {
    Tensor wq, wk, wv, wo, wg, wu, wd, wqkv, wgu;
  };
  std::vector<Layer> w(layers);
  for (Layer& l : w) {
    l.wq = buf(bf, {qd, hidden});
    l.wk = buf(bf, {kvd, hidden});
    l.wv = buf(bf, {kvd, hidden});
    l.wo = buf(bf, {hidden, qd});
    l.wg = buf(bf, {ffn, hidden});
    l.wu = buf(bf, {ffn, hidden});
    l.wd = buf(bf, {hidden, ffn});
    l.wqkv = buf(bf, {qd + 2 * kvd, hidden});
    l.wgu = buf(bf, {2 * ffn, hidden});
  }
  // KV of `context` tokens per layer in 256-token pages, as the cache hands them to attention.
  const int64_t page = 256, n_pages = (context + page - 1) / page;
  std::vector<Tensor> kpool(layers), vpool(layers);
  std::vector<std::vector<KvView>> segs(layers);
  for (int l = 0; l < layers; ++l) {
    kpool[l] = buf(bf, {n_pages * page, hp.n_kv_heads, hd});
    vpool[l] = buf(bf, {n_pages * page, hp.n_kv_heads, hd});
    for (int64_t p = 0; p < n_pages; ++p) {
      const int64_t n = std::min(page, context - p * page);
      segs[l].push_back({kpool[l].slice_rows(p * page, n), vpool[l].slice_rows(p * page, n)});
    }
  }
  Tensor attn_out = buf(bf, {1, hp.n_heads, hd});
  Tensor lse = buf(DType::kF32, {hp.n_heads}), ent = buf(DType::kF32, {hp.n_heads});
  const int32_t pos = static_cast<int32_t>(context);
  be.synchronize();
  auto flat = [](Tensor m) { return Tensor::make(m.data, m.dtype, {m.shape[0], m.numel() / m.shape[0]}); };
  struct Kind {
    const char* name;
    double bytes;
    std::function<void(int)> op;  // one layer's share
  };
  const double wbytes = 2.0 * hidden * (qd + 2 * kvd + qd + 3 * ffn);
  const std::vector<Kind> kinds = {
      {"gemv_separate", wbytes,
       [&](int l) {
         be.matmul(flat(q), h, w[l].wq);
         be.matmul(flat(k), h, w[l].wk);
         be.matmul(flat(v), h, w[l].wv);
         be.matmul(h, flat(q), w[l].wo);
         be.matmul(g, h, w[l].wg);
         be.matmul(u, h, w[l].wu);
         be.matmul(h, g, w[l].wd);
       }},
      {"gemv_fused", wbytes,
       [&](int l) {
         be.matmul(qkv, h, w[l].wqkv);
         be.matmul(h, flat(q), w[l].wo);
         be.matmul(gu, h, w[l].wgu);
         be.matmul(h, g, w[l].wd);
       }},
      {"small_ops", 0,
       [&](int l) {
         be.rms_norm(h, x, norm_w, 1e-5f);
         be.rope(q, {&pos, 1}, inv, hp.rope_dim, hp.rope_style);
         be.rope(k, {&pos, 1}, inv, hp.rope_dim, hp.rope_style);
         be.copy(kpool[l].slice_rows(0, 1), k);
         be.copy(vpool[l].slice_rows(0, 1), v);
         be.add(x, x, h);
         be.rms_norm(h, x, norm_w, 1e-5f);
         be.swiglu(g, g, u);
         be.add(x, x, h);
       }},
      {"small_ops_fused", 0,
       [&](int l) {
         be.split_qkv_rope(q, k, v, qkv, {&pos, 1}, inv, hp.rope_dim, hp.rope_style);
         be.copy(kpool[l].slice_rows(0, 1), k);
         be.copy(vpool[l].slice_rows(0, 1), v);
         be.add_rms_norm(h, x, flat(attn_out), norm_w, 1e-5f);
         be.swiglu_fused(g, gu);
         be.add_rms_norm(h, x, flat(attn_out), norm_w, 1e-5f);
       }},
      {"attention", 4.0 * context * kvd,
       [&](int l) {
         AttentionCall c;
         c.out = attn_out;
         c.lse = lse.f32();
         c.entropy = ent.f32();
         c.q = q;
         c.kv = segs[l];
         c.n_heads = hp.n_heads;
         c.n_kv_heads = hp.n_kv_heads;
         c.head_dim = hp.head_dim;
         c.scale = 0.088f;
         c.mask = {true, context - 1};
         be.partial_attention(c);
       }},
  };
  for (const Kind& kind : kinds) {
    for (int l = 0; l < layers; ++l) kind.op(l);  // warm: plans, scratch
    be.synchronize();
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    PROBE_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    for (int l = 0; l < layers; ++l) kind.op(l);
    PROBE_CUDA(cudaStreamEndCapture(stream, &graph));
    size_t nodes = 0;
    PROBE_CUDA(cudaGraphGetNodes(graph, nullptr, &nodes));
    PROBE_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    PROBE_CUDA(cudaGraphLaunch(exec, stream));
    be.synchronize();
    const int reps = 20;
    const auto t0 = Clock::now();
    for (int i = 0; i < reps; ++i) PROBE_CUDA(cudaGraphLaunch(exec, stream));
    be.synchronize();
    const double us = since(t0) * 1e6 / reps;
    // Eager, for the launch gaps.
    const auto t1 = Clock::now();
    for (int i = 0; i < reps; ++i)
      for (int l = 0; l < layers; ++l) kind.op(l);
    be.synchronize();
    const double eager_us = since(t1) * 1e6 / reps;
    const double bytes = kind.bytes * layers;
    std::printf(
        "{\"bench\":\"decode_ops\",\"impl\":\"starserve\",\"gemv\":%s,\"kind\":\"%s\",\"context\":%lld,\"layers\":%d,"
        "\"nodes\":%zu,\"graph_us\":%.1f,\"eager_us\":%.1f,\"us_per_node\":%.2f,\"gbps\":%.0f}\n",
        gemv ? "true" : "false", kind.name, static_cast<long long>(context), layers, nodes, us, eager_us, us / nodes,
        bytes > 0 ? bytes / us / 1e3 : 0.0);
    std::fflush(stdout);
    PROBE_CUDA(cudaGraphExecDestroy(exec));
    PROBE_CUDA(cudaGraphDestroy(graph));
  }
  return 0;
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
  } else if (name == "exact" || name == "exact@zigzag" || name == "exact@contiguous") {
    // exact: the server's default layout (auto: zigzag for the Llama shape, contiguous for KV shifting).
    m.plan.mode = AttentionMode::kExact;
    if (name == "exact@zigzag") m.plan.exact_layout = ExactLayout::kZigzag;
    if (name == "exact@contiguous") m.plan.exact_layout = ExactLayout::kContiguous;
  } else if (name == "star") {
    m.plan.mode = AttentionMode::kStar;
    m.plan.n_blocks = blocks;
  } else if (name.rfind("star@", 0) == 0 && name.size() > 5) {
    m.plan.mode = AttentionMode::kStar;
    m.plan.block_size = std::atoi(name.c_str() + 5);
    if (m.plan.block_size < 1) return invalid_argument("mode {}: block size must be >= 1", name);
  } else {
    return invalid_argument("unknown mode '{}' (global, exact, exact@zigzag, exact@contiguous, star, star@N)", name);
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
  int layers = -1, blocks = 4, query = 32, decode = 16, seqs = 0;
  std::string shape = "8b";
  bool gemm_only = false, entropy = false, graph_probe = false, census = false;
  std::string prefill_kernel = "auto", merge = "allreduce", gemv = "on", batch_decode = "on", graphs = "on";
  std::vector<int64_t> lengths = {16384, 32768};
  std::vector<std::string> mode_names = {"global", "star"};
  std::string arch = "llama";
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
    else if (a == "--graph-probe") graph_probe = true;
    else if (a == "--op-census") census = true;
    else if (a == "--gemv") gemv = next();
    else if (a == "--seqs") seqs = std::atoi(next());
    else if (a == "--batch-decode") batch_decode = next();
    else if (a == "--graphs") graphs = next();
    else if (a == "--arch") arch = next();
    else if (a == "--shape") shape = next();
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
  if (merge != "allreduce" && merge != "allgather" && merge != "auto") {
    std::fprintf(stderr, "--merge %s: allreduce, allgather or auto\n", merge.c_str());
    return 2;
  }
  if (shape != "8b" && shape != "smollm2") {
    std::fprintf(stderr, "--shape %s: 8b or smollm2\n", shape.c_str());
    return 2;
  }
  if (layers < 0) layers = shape == "8b" ? 32 : 30;
  if (arch != "llama" && arch != "kvshift" && arch != "both") {
    std::fprintf(stderr, "--arch %s: llama, kvshift or both\n", arch.c_str());
    return 2;
  }
  std::vector<std::string> archs;
  if (arch != "kvshift") archs.push_back("llama");
  if (arch != "llama") archs.push_back("kvshift");
  const MergeAlgo algo = merge == "allgather" ? MergeAlgo::kAllGather
                         : merge == "auto"    ? MergeAlgo::kAuto
                                              : MergeAlgo::kAllReduce;
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
  if (gemv == "off") options.gemv_max_tokens = 0;
  options.batch_decode = batch_decode != "off";
  // As the runtime sets it; the probe and the census capture steps themselves.
  options.decode_graphs = graphs != "off" && world == 1 && !graph_probe && !census;
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
  const ModelHParams llama_hp = shape == "8b" ? llama3_8b_hparams(layers) : smollm2_135m_hparams(layers);
  ModelHParams hp = llama_hp;
  if (world == 1 && !census) bench_gemm(*be, hp, options.gemv_max_tokens);
  if (census) {
    for (int64_t n : lengths)
      if (const int rc = op_census(*be, hp, n, options.gemv_max_tokens > 0)) return rc;
    return 0;
  }
  if (gemm_only) return 0;

  // The model of the current --arch entry (one in memory at a time); both have the same shape,
  // so one KV cache serves them.
  std::unique_ptr<RandomWeightSource> src;
  std::unique_ptr<Model> model;
  std::string arch_name;
  auto load_model = [&](const std::string& name) -> int {
    model.reset();
    const auto t_load = Clock::now();
    hp = name == "kvshift" ? kvshift_hparams(llama_hp) : llama_hp;
    src = std::make_unique<RandomWeightSource>(hp, 1);
    auto model_or = create_model(*src, *be);
    if (!model_or.ok()) {
      std::fprintf(stderr, "model: %s\n", model_or.status().to_string().c_str());
      comm->abort_job(1);
      return 1;
    }
    model = std::move(model_or).value();
    arch_name = name;
    if (lead) {
      std::fprintf(stderr, "random %d-layer %s-shaped %s model on %s in %.1f s; %d rank(s) on %d GPU(s) (%s)\n",
                   layers, shape == "8b" ? "Llama-3-8B" : "SmolLM2-135M", name.c_str(), be->name().c_str(), since(t_load), world, gpus, comm->name().c_str());
    }
    return 0;
  };
  // (arch, mode, context) -> {ttft_s, decode ms per token}, for the overhead lines.
  std::map<std::tuple<std::string, std::string, int64_t>, std::pair<double, double>> results;

  // KV pages per rank: the longest context's share plus an anchor, the query and the decode.
  const int64_t max_len = *std::max_element(lengths.begin(), lengths.end());
  int64_t anchor_max = (max_len + blocks - 1) / std::max(blocks, 1);
  for (const Mode& m : modes) anchor_max = std::max<int64_t>(anchor_max, m.plan.block_size);
  const int page = 256;
  const int64_t share = world == 1 ? max_len : std::max<int64_t>((max_len + world - 1) / world, anchor_max);
  int64_t pages = (share + anchor_max + query + decode * (graph_probe ? 4 : 1) + 4 * page) / page + 8;
  if (seqs >= 1) pages = std::max<int64_t>(pages, seqs * ((max_len + query + decode + page - 1) / page + 1));
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
      p2->register_sequence(seq, *layout, comm->rank());
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
          "{\"bench\":\"ttft\",\"impl\":\"starserve\",\"arch\":\"%s\",\"mode\":\"%s\",\"context\":%lld,\"query\":%d,\"blocks\":%d,"
          "\"block_size\":%d,\"ranks\":%d,\"gpus\":%d,\"comm\":\"%s\",\"merge\":\"%s\",\"layers\":%d,"
          "\"prefill_kernel\":\"%s\",\"ttft_s\":%.3f,\"phase1_s\":%.3f,\"phase1_rank_min_s\":%.3f,"
          "\"phase1_rank_max_s\":%.3f,\"tflop\":%.1f,\"tflops\":%.1f}\n",
          arch_name.c_str(), mode.name.c_str(), static_cast<long long>(n), query, n_blocks, block_size, world, gpus,
          comm->name().c_str(), merge.c_str(), layers, prefill_kernel.c_str(), ttft, phase1, phase1_rank_min,
          phase1_rank_max, flops / 1e12, flops / ttft / 1e12);
      std::fflush(stdout);
    }
    if (print) results[{arch_name, mode.name, n}].first = ttft;

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
        // Greedy on the device, as the server samples on a CUDA backend: only the token comes back.
        SampleRow greedy;
        greedy.n_vocab = hp.n_vocab;
        greedy.temperature = 0.0f;
        int32_t picked = 0;
        const Status st = model->forward_sample({&d, 1}, *handler, {&greedy, 1}, {&picked, 1});
        if (!st.ok()) {
          std::fprintf(stderr, "decode: %s\n", st.to_string().c_str());
          comm->abort_job(1);
          return 1;
        }
        next = picked;
        ++p;
      }
      const double ms = since(t1) * 1e3 / std::max(decode, 1);
      if (print && !with_entropy) results[{arch_name, mode.name, n}].second = ms;
      if (with_entropy) track_entropy(nullptr);
      if (lead && print) {
        std::printf(
            "{\"bench\":\"decode\",\"impl\":\"starserve\",\"arch\":\"%s\",\"mode\":\"%s\",\"context\":%lld,\"block_size\":%d,"
            "\"ranks\":%d,\"gpus\":%d,\"merge\":\"%s\",\"layers\":%d,\"gemv\":%s,\"graphs\":%s,\"entropy\":%s,"
            "\"ms_per_token\":%.2f,\"tokens_per_s\":%.1f",
            arch_name.c_str(), mode.name.c_str(), static_cast<long long>(n), block_size, world, gpus, merge.c_str(),
            layers,
            options.gemv_max_tokens > 0 ? "true" : "false", options.decode_graphs ? "true" : "false",
            with_entropy ? "true" : "false", ms, 1e3 / ms);
        if (with_entropy) {
          std::printf(",\"entropy_rows_per_layer\":%lld,\"entropy_layer0_mean\":%.4f,\"entropy_last_layer_mean\":%.4f",
                      static_cast<long long>(stats.count[0]), stats.layer_mean(0), stats.layer_mean(hp.n_layers - 1));
        }
        std::printf("}\n");
        std::fflush(stdout);
      }
    }
    // Up to 32K: longer contexts upload page tables that wrap the backend's pinned ring mid-capture.
    if (graph_probe && mode.global && world == 1 && lead && print && n <= 32768) {
      if (const int rc = probe_decode(*be, *model, *handler, seq, next, p, decode, n)) return rc;
    }
    cache.free_sequence(seq);
    return 0;
  };
  // Warm-up, not printed: every mode once at a short length (cuBLASLt plans, NCCL channels,
  // scratch buffers), so the first timed length does not carry them.
  auto warm_up = [&]() -> int {
    for (const Mode& mode : modes) {
      if (const int rc = measure(std::min<int64_t>(4096, lengths.front()), mode, false)) return rc;
    }
    return 0;
  };
  // --seqs S: S sequences of n context tokens each (global attention, one rank), prefilled one by
  // one, then decoded together, one token per sequence per step, as a server's continuous batch.
  auto measure_batch = [&](int64_t n) -> int {
    LocalAttention local(*be, cache, hp);
    std::vector<int32_t> next(seqs), pos(seqs);
    for (int s = 0; s < seqs; ++s) {
      const std::vector<int32_t> prompt = tokens(n + query, hp.n_vocab, static_cast<uint32_t>(n + 7 * s));
      std::vector<int32_t> ppos(prompt.size());
      std::iota(ppos.begin(), ppos.end(), 0);
      BatchSeq bs{100 + s, prompt, ppos, false};
      SampleRow greedy;
      greedy.n_vocab = hp.n_vocab;
      greedy.temperature = 0.0f;
      const Status st = model->forward_sample({&bs, 1}, local, {&greedy, 1}, {&next[s], 1});
      if (!st.ok()) {
        std::fprintf(stderr, "batch prefill %d: %s\n", s, st.to_string().c_str());
        return 1;
      }
      pos[s] = static_cast<int32_t>(prompt.size());
    }
    std::vector<BatchSeq> batch(seqs);
    std::vector<SampleRow> rows(seqs);
    for (SampleRow& r : rows) {
      r.n_vocab = hp.n_vocab;
      r.temperature = 0.0f;
    }
    std::vector<int32_t> picked(seqs);
    Clock::time_point t0;
    double wait0 = 0;
    Backend::GraphStats g0;
    for (int step = -2; step < decode; ++step) {  // two untimed steps first
      if (step == 0) {
        be->synchronize();
        t0 = Clock::now();
        wait0 = be->wait_seconds();
        g0 = be->graph_stats();
      }
      for (int s = 0; s < seqs; ++s) batch[s] = BatchSeq{100 + s, {&next[s], 1}, {&pos[s], 1}, false};
      const Status st = model->forward_sample(batch, local, rows, picked);
      if (!st.ok()) {
        std::fprintf(stderr, "batch decode: %s\n", st.to_string().c_str());
        return 1;
      }
      for (int s = 0; s < seqs; ++s) {
        next[s] = picked[s];
        ++pos[s];
      }
    }
    const double ms = since(t0) * 1e3 / std::max(decode, 1);
    // The host's share: the step's wall time less the time it sat blocked on the device.
    const double wait_ms = (be->wait_seconds() - wait0) * 1e3 / std::max(decode, 1);
    const Backend::GraphStats g1 = be->graph_stats();
    std::printf(
        "{\"bench\":\"decode_batch\",\"impl\":\"starserve\",\"shape\":\"%s\",\"mode\":\"global\",\"context\":%lld,"
        "\"seqs\":%d,\"layers\":%d,\"batch_decode\":%s,\"gemv\":%s,\"graphs\":%s,\"ms_per_step\":%.3f,"
        "\"host_ms_per_step\":%.3f,\"device_wait_ms_per_step\":%.3f,\"graph_launches_per_step\":%.1f,"
        "\"graph_builds_per_step\":%.2f,\"tokens_per_s\":%.1f}\n",
        shape.c_str(), static_cast<long long>(n), seqs, layers, options.batch_decode ? "true" : "false",
        options.gemv_max_tokens > 0 ? "true" : "false", options.decode_graphs ? "true" : "false", ms, ms - wait_ms,
        wait_ms, static_cast<double>(g1.launches - g0.launches) / std::max(decode, 1),
        static_cast<double>(g1.instantiations - g0.instantiations) / std::max(decode, 1), seqs * 1e3 / ms);
    std::fflush(stdout);
    for (int s = 0; s < seqs; ++s) cache.free_sequence(100 + s);
    return 0;
  };
  if (seqs >= 1) {
    if (const int rc = load_model(archs.front())) return rc;
    if (const int rc = warm_up()) return rc;
    if (world != 1) {
      if (lead) std::fprintf(stderr, "--seqs runs on one rank\n");
      return 2;
    }
    if (const int rc = measure_batch(std::min<int64_t>(1024, lengths.front()))) return rc;  // warm-up
    for (int64_t n : lengths)
      if (const int rc = measure_batch(n)) return rc;
    return 0;
  }
  for (const std::string& name : archs) {
    if (const int rc = load_model(name)) return rc;
    if (const int rc = warm_up()) return rc;
    for (int64_t n : lengths) {
      for (const Mode& mode : modes) {
        if (const int rc = measure(n, mode, true)) return rc;
      }
    }
  }
  // KV shifting against the plain shape measured above: > 1 means the variant is slower.
  if (archs.size() == 2 && lead) {
    for (const auto& [key, kv] : results) {
      const auto& [a, mode, n] = key;
      if (a != "kvshift") continue;
      const auto base = results.find({"llama", mode, n});
      if (base == results.end() || base->second.first <= 0 || base->second.second <= 0) continue;
      std::printf(
          "{\"bench\":\"kvshift_overhead\",\"peer\":\"llama\",\"mode\":\"%s\",\"context\":%lld,\"layers\":%d,"
          "\"ttft_s\":%.4f,\"peer_ttft_s\":%.4f,\"ttft_ratio\":%.4f,\"ms_per_token\":%.3f,"
          "\"peer_ms_per_token\":%.3f,\"decode_ratio\":%.4f}\n",
          mode.c_str(), static_cast<long long>(n), layers, kv.first, base->second.first, kv.first / base->second.first,
          kv.second, base->second.second, kv.second / base->second.second);
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return run(argc, argv); }
