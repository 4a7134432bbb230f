// Attention kernel benchmark: prints one JSON line per case.
//   prefill: TFLOP/s on the DEVICE.md shapes (32 heads, head_dim 128, bf16, entropy on);
//            FLOPs = 4 n_q n_kv d heads (QK^T and PV), halved for causal squares (FlashAttention's count).
//            One line per kernel: the baselines (kernels/baselines/prefill_baselines.h) "wmma",
//            "mma_v0" (mma.sync m64), "mma_v2" (m64-lean), where the device runs them "wgmma_v1"
//            (ping-pong), "wgmma_v2" (three consumers), "wgmma_v3" (cp.async copies); then what
//            ships: "wgmma" (auto on sm_90), then "mma" (auto elsewhere) last. All carry impl
//            "starserve", and summarize.py prints one row per kernel. --wgmma-only leaves out wmma
//            and mma_v0, mma_v2.
//   decode:  GB/s of K and V read (q = 1, 128K and 16K keys), next to the device's copy bandwidth measured
//            here (cudaMemcpy device to device: read + write bytes over time); contiguous KV, and
//            KV in pages of 256 keys placed in scrambled order in one pool (page_size 0 = contiguous).
// Each line carries the prediction made before running: the time at the ceiling (GEMM ~768 TFLOP/s
// on the H200 for prefill; the copy bandwidth for decode), so the achieved fraction reads directly.
// The peers (torch flash / cuDNN SDPA) are measured by attention_peers.py in the same run.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/attention/attention.h"
#include "kernels/baselines/prefill_baselines.h"
#include "common/cuda_call.h"

namespace {

bool g_wgmma_only = false;  // --wgmma-only: the wgmma variants and the default kernel, not the older ones

constexpr double kGemmCeilingTflops = 768.0;  // bf16 dense GEMM measured on this H200 (DEVICE.md)

__global__ void fill_random(__nv_bfloat16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16((h & 0xffff) / 32768.0f - 1.0f);
  }
}

template <typename F>
double median_ms(F&& launch, int iters) {
  cudaEvent_t a, b;
  SS_CHECK_CALL(cudaEventCreate(&a));
  SS_CHECK_CALL(cudaEventCreate(&b));
  // Warm-up: at least 3 launches and 100 ms of them, so the clocks settle on this kernel's own
  // load rather than on the previous one's (seen: the same kernel 5-10% faster right after a
  // lighter one when warmed for 3 launches only).
  SS_CHECK_CALL(cudaEventRecord(a));
  for (int i = 0;; ++i) {
    launch();
    SS_CHECK_CALL(cudaEventRecord(b));
    SS_CHECK_CALL(cudaEventSynchronize(b));
    float warm_ms = 0;
    SS_CHECK_CALL(cudaEventElapsedTime(&warm_ms, a, b));
    if (i >= 2 && warm_ms >= 100.0f) break;
  }
  std::vector<float> t;
  for (int i = 0; i < iters; ++i) {
    SS_CHECK_CALL(cudaEventRecord(a));
    launch();
    SS_CHECK_CALL(cudaEventRecord(b));
    SS_CHECK_CALL(cudaEventSynchronize(b));
    float ms = 0;
    SS_CHECK_CALL(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  SS_CHECK_CALL(cudaEventDestroy(a));
  SS_CHECK_CALL(cudaEventDestroy(b));
  return t[t.size() / 2];
}

__nv_bfloat16* random_device(size_t n, uint32_t seed) {
  __nv_bfloat16* p = nullptr;
  SS_CHECK_CALL(cudaMalloc(&p, n * sizeof(__nv_bfloat16)));
  fill_random<<<1024, 256>>>(p, n, seed);
  SS_CHECK_CALL(cudaGetLastError());
  return p;
}

// K and V of n_kv keys: contiguous (page_shift 0), or pages of 2^page_shift keys in one pool with
// page i in slot (i * 7919) mod n_pages, as bench_decode places them. Returns the page tables
// (k table, then v table; null when contiguous) and sets k, v to the pool.
const __nv_bfloat16** make_keys(int64_t n_kv, int kv_heads, int d, int page_shift, __nv_bfloat16** k,
                                __nv_bfloat16** v) {
  const int64_t page = page_shift ? int64_t{1} << page_shift : n_kv;
  const int64_t n_pages = (n_kv + page - 1) / page;
  const int64_t page_elems = page * kv_heads * d;
  *k = random_device(n_pages * page_elems, 2);
  *v = random_device(n_pages * page_elems, 3);
  if (!page_shift) return nullptr;
  std::vector<const __nv_bfloat16*> host(2 * n_pages);
  for (int64_t i = 0; i < n_pages; ++i) {
    const int64_t slot = i * 7919 % n_pages;
    host[i] = *k + slot * page_elems;
    host[n_pages + i] = *v + slot * page_elems;
  }
  const __nv_bfloat16** tables = nullptr;
  SS_CHECK_CALL(cudaMalloc(&tables, host.size() * sizeof(host[0])));
  SS_CHECK_CALL(cudaMemcpy(tables, host.data(), host.size() * sizeof(host[0]), cudaMemcpyHostToDevice));
  return tables;
}

// window > 0 / softcap > 0: the sliding window and logit soft-capping (the shipped kernels only;
// the baselines refuse them). FLOPs then count the visible (query, key) pairs only.
void bench_prefill(const char* name, int64_t n_q, int64_t n_kv, bool causal, int heads, int kv_heads, int d,
                   int page_shift, int iters, int64_t window = 0, float softcap = 0.0f) {
  __nv_bfloat16* q = random_device(n_q * heads * d, 1);
  __nv_bfloat16 *k = nullptr, *v = nullptr;
  const __nv_bfloat16** tables = make_keys(n_kv, kv_heads, d, page_shift, &k, &v);
  __nv_bfloat16* o = nullptr;
  float *lse = nullptr, *ent = nullptr;
  SS_CHECK_CALL(cudaMalloc(&o, n_q * heads * d * sizeof(__nv_bfloat16)));
  SS_CHECK_CALL(cudaMalloc(&lse, n_q * heads * sizeof(float)));
  SS_CHECK_CALL(cudaMalloc(&ent, n_q * heads * sizeof(float)));
  starserve::AttentionGpuParams p;
  p.out = o;
  p.lse = lse;
  p.entropy = ent;
  p.q = q;
  if (tables) {
    const int64_t n_pages = (n_kv >> page_shift) + ((n_kv & ((int64_t{1} << page_shift) - 1)) != 0);
    p.k_pages = tables;
    p.v_pages = tables + n_pages;
    p.page_shift = page_shift;
    p.k_pool = k;  // the pools, as the engine passes them: the wgmma kernel reads pages with the TMA
    p.v_pool = v;
    p.pool_rows = n_pages << page_shift;
  } else {
    p.k = k;
    p.v = v;
  }
  p.n_q = n_q;
  p.n_kv = n_kv;
  p.n_heads = heads;
  p.n_kv_heads = kv_heads;
  p.head_dim = d;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  p.causal = causal;
  p.causal_offset = n_kv - n_q;
  p.window = window;
  p.window_offset = n_kv - n_q;
  p.softcap = softcap;
  double flops = 4.0 * n_q * n_kv * d * heads;
  if (causal && n_q == n_kv) flops /= 2;
  if (window > 0) {
    double pairs = 0;  // query i (position i + n_kv - n_q) sees keys (pos - window, pos] within [0, n_kv)
    for (int64_t i = 0; i < n_q; ++i) {
      const int64_t pos = i + n_kv - n_q;
      const int64_t hi = causal ? pos : n_kv - 1;
      pairs += static_cast<double>(hi - std::max<int64_t>(0, pos - window + 1) + 1);
    }
    flops = 4.0 * pairs * d * heads;
  }
  const bool features = window > 0 || softcap > 0.0f;
  const double predicted_ms = flops / (kGemmCeilingTflops * 1e12) * 1e3;
  struct Kernel {
    std::string name;
    std::function<cudaError_t(const starserve::AttentionGpuParams&, cudaStream_t)> launch;
  };
  std::vector<Kernel> kernels;
  if (!g_wgmma_only && !features) {
    kernels.push_back({"wmma", starserve::launch_prefill_attention_wmma});
    kernels.push_back({"mma_v0", starserve::launch_prefill_attention_mma_m64});
    kernels.push_back({"mma_v2", starserve::launch_prefill_attention_mma_m64_lean});
  }
  if (starserve::prefill_wgmma_supported()) {
    if (!features) {
      kernels.push_back({"wgmma_v1", starserve::launch_prefill_attention_wgmma_pingpong});
      kernels.push_back({"wgmma_v2", starserve::launch_prefill_attention_wgmma_three_consumers});
      kernels.push_back({"wgmma_v3", starserve::launch_prefill_attention_wgmma_cp_async});
    }
    kernels.push_back({"wgmma", starserve::launch_prefill_attention_wgmma});
  }
  kernels.push_back({"mma", starserve::launch_prefill_attention_mma});
  // Rounds over the kernels, each timing every kernel once (median of iters launches after a
  // warm-up) in an order rotated per round, and the median round reported: a clock drift during
  // the run then touches every kernel alike rather than the ones measured last.
  constexpr int kRounds = 3;
  std::vector<std::vector<double>> rounds(kernels.size());
  for (int r = 0; r < kRounds; ++r)
    for (size_t j = 0; j < kernels.size(); ++j) {
      const size_t i = (j + r) % kernels.size();  // each round starts one kernel later
      rounds[i].push_back(median_ms([&] { SS_CHECK_CALL(kernels[i].launch(p, nullptr)); }, iters));
    }
  for (size_t i = 0; i < kernels.size(); ++i) {
    const Kernel& kernel = kernels[i];
    std::sort(rounds[i].begin(), rounds[i].end());
    const double ms = rounds[i][kRounds / 2];
    std::printf(
        "{\"bench\":\"attention_prefill\",\"impl\":\"starserve\",\"kernel\":\"%s\",\"case\":\"%s\",\"n_q\":%lld,"
        "\"n_kv\":%lld,\"causal\":%s,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"page_size\":%lld,\"entropy\":true,"
        "\"window\":%lld,\"softcap\":%g,\"gflop\":%.1f,\"predicted_ms_at_ceiling\":%.3f,\"ceiling_tflops\":%.0f,\"ms\":%.3f,\"tflops\":%.1f}\n",
        kernel.name.c_str(), name, static_cast<long long>(n_q), static_cast<long long>(n_kv), causal ? "true" : "false", heads,
        kv_heads, d, static_cast<long long>(page_shift ? int64_t{1} << page_shift : 0), static_cast<long long>(window),
        static_cast<double>(softcap), flops / 1e9, predicted_ms,
        kGemmCeilingTflops, ms, flops / (ms * 1e-3) / 1e12);
    std::fflush(stdout);
  }
  cudaFree(q);
  cudaFree(k);
  cudaFree(v);
  cudaFree(o);
  cudaFree(lse);
  cudaFree(ent);
  cudaFree(tables);
}

double copy_bandwidth_gbs(size_t bytes) {
  void *a = nullptr, *b = nullptr;
  SS_CHECK_CALL(cudaMalloc(&a, bytes));
  SS_CHECK_CALL(cudaMalloc(&b, bytes));
  SS_CHECK_CALL(cudaMemset(a, 1, bytes));
  const double ms = median_ms([&] { SS_CHECK_CALL(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, 20);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

// page_shift 0: contiguous K, V; else pages of 2^page_shift keys in one pool, page i in slot
// (i * 7919) mod n_pages: a permutation, 7919 being prime and n_pages = 512 not a multiple of it.
void bench_decode(int64_t n_q, int64_t n_kv, int heads, int kv_heads, int d, int page_shift, double copy_gbs) {
  const int64_t page = page_shift ? int64_t{1} << page_shift : n_kv;
  const int64_t n_pages = (n_kv + page - 1) / page;
  const int64_t page_elems = page * kv_heads * d;
  __nv_bfloat16* q = random_device(n_q * heads * d, 4);
  __nv_bfloat16* k = random_device(n_pages * page_elems, 5);
  __nv_bfloat16* v = random_device(n_pages * page_elems, 6);
  const __nv_bfloat16** tables = nullptr;  // k table, then v table
  if (page_shift) {
    std::vector<const __nv_bfloat16*> host(2 * n_pages);
    for (int64_t i = 0; i < n_pages; ++i) {
      const int64_t slot = i * 7919 % n_pages;
      host[i] = k + slot * page_elems;
      host[n_pages + i] = v + slot * page_elems;
    }
    SS_CHECK_CALL(cudaMalloc(&tables, host.size() * sizeof(host[0])));
    SS_CHECK_CALL(cudaMemcpy(tables, host.data(), host.size() * sizeof(host[0]), cudaMemcpyHostToDevice));
  }
  __nv_bfloat16* o = nullptr;
  float *lse = nullptr, *ent = nullptr;
  SS_CHECK_CALL(cudaMalloc(&o, n_q * heads * d * sizeof(__nv_bfloat16)));
  SS_CHECK_CALL(cudaMalloc(&lse, n_q * heads * sizeof(float)));
  SS_CHECK_CALL(cudaMalloc(&ent, n_q * heads * sizeof(float)));
  starserve::AttentionGpuParams p;
  p.out = o;
  p.lse = lse;
  p.entropy = ent;
  p.q = q;
  if (page_shift) {
    p.k_pages = tables;
    p.v_pages = tables + n_pages;
    p.page_shift = page_shift;
  } else {
    p.k = k;
    p.v = v;
  }
  p.n_q = n_q;
  p.n_kv = n_kv;
  p.n_heads = heads;
  p.n_kv_heads = kv_heads;
  p.head_dim = d;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  p.causal = true;
  p.causal_offset = n_kv - n_q;
  const size_t ws_bytes = starserve::decode_attention_workspace_bytes(p);
  void* ws = nullptr;
  SS_CHECK_CALL(cudaMalloc(&ws, ws_bytes));
  const double bytes = 2.0 * n_kv * kv_heads * d * sizeof(__nv_bfloat16);  // K and V once; Q, O negligible
  const double predicted_ms = bytes / (copy_gbs * 1e9) * 1e3;
  const double ms =
      median_ms([&] { SS_CHECK_CALL(starserve::launch_decode_attention(p, ws, ws_bytes, nullptr)); }, 30);
  char name[64];
  std::snprintf(name, sizeof(name), "decode_q%lld_%lldk%s", static_cast<long long>(n_q),
                static_cast<long long>(n_kv / 1024), page_shift ? "_paged" : "");
  std::printf(
      "{\"bench\":\"attention_decode\",\"impl\":\"starserve\",\"case\":\"%s\",\"n_q\":%lld,"
      "\"n_kv\":%lld,\"heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"page_size\":%lld,\"entropy\":true,"
      "\"kv_mb\":%.1f,\"predicted_ms_at_copy_bw\":%.3f,\"copy_gbs\":%.0f,\"ms\":%.4f,\"gbs\":%.0f,"
      "\"fraction_of_copy\":%.3f}\n",
      name, static_cast<long long>(n_q), static_cast<long long>(n_kv), heads, kv_heads, d,
      static_cast<long long>(page_shift ? page : 0), bytes / 1e6, predicted_ms, copy_gbs, ms,
      bytes / (ms * 1e-3) / 1e9, bytes / (ms * 1e-3) / 1e9 / copy_gbs);
  std::fflush(stdout);
  cudaFree(q);
  cudaFree(k);
  cudaFree(v);
  cudaFree(o);
  cudaFree(lse);
  cudaFree(ent);
  cudaFree(ws);
  cudaFree(tables);
}

}  // namespace

int main(int argc, char** argv) {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("{\"bench\":\"attention\",\"skipped\":\"no CUDA device\"}\n");
    return 0;
  }
  bool quick = false, prefill_only = false, decode_only = false;
  for (int i = 1; i < argc; ++i) {
    quick |= std::strcmp(argv[i], "--quick") == 0;
    prefill_only |= std::strcmp(argv[i], "--prefill-only") == 0;
    decode_only |= std::strcmp(argv[i], "--decode-only") == 0;
    g_wgmma_only |= std::strcmp(argv[i], "--wgmma-only") == 0;
  }
  const int iters = quick ? 5 : 20;
  cudaDeviceProp prop{};
  SS_CHECK_CALL(cudaGetDeviceProperties(&prop, 0));
  std::printf("{\"bench\":\"device\",\"name\":\"%s\",\"sms\":%d}\n", prop.name, prop.multiProcessorCount);
  if (!decode_only) {
    bench_prefill("noncausal_4kx8k", 4096, 8192, false, 32, 32, 128, 0, iters);
    bench_prefill("causal_16kx16k", 16384, 16384, true, 32, 32, 128, 0, iters);
    // The engine's case: keys in the paged KV cache (pages of 256), Llama-3-8B's GQA 4.
    bench_prefill("noncausal_4kx8k_gqa4_paged", 4096, 8192, false, 32, 8, 128, 8, iters);
    bench_prefill("causal_16kx16k_gqa4_paged", 16384, 16384, true, 32, 8, 128, 8, iters);
    // head_dim 64 (SmolLM2's), the other size the kernels support.
    bench_prefill("causal_16kx16k_d64", 16384, 16384, true, 32, 32, 64, 0, iters);
    // The family features: Mistral's 4096-token window (tiles behind it skipped: the time should
    // follow the visible pairs), Gemma 2's soft-cap of 50 (one tanh per score), both at once.
    bench_prefill("causal_16kx16k_window4k", 16384, 16384, true, 32, 8, 128, 0, iters, 4096);
    bench_prefill("causal_16kx16k_softcap50", 16384, 16384, true, 32, 8, 128, 0, iters, 0, 50.0f);
    bench_prefill("causal_16kx16k_window4k_softcap50", 16384, 16384, true, 32, 8, 128, 0, iters, 4096, 50.0f);
  }
  if (prefill_only) return 0;
  const double copy_gbs = copy_bandwidth_gbs(size_t{2} << 30);
  std::printf("{\"bench\":\"copy\",\"impl\":\"cudaMemcpy_d2d\",\"bytes\":%zu,\"gbs\":%.0f}\n", size_t{2} << 30,
              copy_gbs);
  for (int64_t n_kv : {int64_t{128} * 1024, int64_t{16} * 1024}) {  // 16K: where fixed costs weigh most
    bench_decode(1, n_kv, 32, 32, 128, 0, copy_gbs);
    bench_decode(1, n_kv, 32, 8, 128, 0, copy_gbs);
    bench_decode(1, n_kv, 32, 8, 128, 8, copy_gbs);
  }
  return 0;
}
