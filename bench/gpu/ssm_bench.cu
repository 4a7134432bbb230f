// Attamba SSM kernel benchmark (kernels/ssm.h): one JSON line per (case, op), bf16 rows.
//   Ops: "conv" (causal conv1d + SiLU over xBC and the tail update), "scan" (SSD), "norm" (gated RMS
//   norm), and "block" (the three in sequence, as one SSM of a layer runs them).
//   Prefill: one sequence of T = 4096..32768 rows, a chunk start every `chunk` rows (16, and 8 for
//   the second shape), the rows read from one in_proj output (T, [z | xBC | dt]).
//     shape "h4_pd32_n64": H 4, Pd 32 (d_inner 128), G 1, N 64, conv_dim 256;
//     shape "h8_pd32_n128": the 8-layer dim-512 model's SSM, d_inner 256, H 8, N 128, conv_dim 512.
//   Decode: n_seqs = 1..64 sequences of one row each, continuing a chunk (the carry read and written).
// Bytes are the least each op must move: every input row element read once, every output written
// once, the carry (tail, state, fp32) read and written once; GB/s = bytes / time, next to the device's
// copy bandwidth measured here (cudaMemcpy device to device: read + write bytes over time), so the
// fraction reads directly. The peer (a chunked PyTorch implementation) is bench/gpu/ssm_peers.py.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/ssm.h"

#define BENCH_CHECK(call)                                                                             \
  do {                                                                                                \
    const cudaError_t e_ = (call);                                                                    \
    if (e_ != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));    \
      std::abort();                                                                                   \
    }                                                                                                 \
  } while (0)

namespace {

using starserve::SsmDtype;

// Median of iters timed launches after a warm-up of at least 3 calls and 50 ms.
double median_ms(const std::function<void()>& fn, int iters) {
  cudaEvent_t a, b;
  BENCH_CHECK(cudaEventCreate(&a));
  BENCH_CHECK(cudaEventCreate(&b));
  BENCH_CHECK(cudaEventRecord(a));
  for (int n = 0;; ++n) {
    fn();
    BENCH_CHECK(cudaEventRecord(b));
    BENCH_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    BENCH_CHECK(cudaEventElapsedTime(&ms, a, b));
    if (n >= 2 && ms >= 50.0f) break;
  }
  std::vector<float> t(iters);
  for (int i = 0; i < iters; ++i) {
    BENCH_CHECK(cudaEventRecord(a));
    fn();
    BENCH_CHECK(cudaEventRecord(b));
    BENCH_CHECK(cudaEventSynchronize(b));
    BENCH_CHECK(cudaEventElapsedTime(&t[i], a, b));
  }
  BENCH_CHECK(cudaEventDestroy(a));
  BENCH_CHECK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[iters / 2];
}

template <typename T>
T* device_alloc(size_t n) {
  T* p = nullptr;
  BENCH_CHECK(cudaMalloc(&p, sizeof(T) * std::max<size_t>(n, 1)));
  return p;
}

__nv_bfloat16* random_bf16(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<__nv_bfloat16> h(n);
  for (auto& v : h) v = __float2bfloat16(d(rng));
  __nv_bfloat16* p = device_alloc<__nv_bfloat16>(n);
  BENCH_CHECK(cudaMemcpy(p, h.data(), 2 * n, cudaMemcpyHostToDevice));
  return p;
}

float* random_f32(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> h(n);
  for (auto& v : h) v = d(rng);
  float* p = device_alloc<float>(n);
  BENCH_CHECK(cudaMemcpy(p, h.data(), 4 * n, cudaMemcpyHostToDevice));
  return p;
}

double copy_bandwidth_gbs(size_t bytes) {
  void* a = device_alloc<char>(bytes);
  void* b = device_alloc<char>(bytes);
  BENCH_CHECK(cudaMemset(a, 1, bytes));
  const double ms = median_ms([&] { BENCH_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, 20);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

struct Case {
  const char* mode;   // "prefill" or "decode"
  const char* shape;
  int64_t n_rows, n_seqs;
  int chunk;          // prefill: rows per chunk; decode: 0 (no resets)
  int H, Pd, G, N, W;
};

void run_case(const Case& c, double copy_gbs, int iters) {
  const int64_t T = c.n_rows, d_inner = int64_t{c.H} * c.Pd, gn = int64_t{c.G} * c.N;
  const int64_t conv_dim = d_inner + 2 * gn, row = d_inner + conv_dim + c.H;
  std::vector<int32_t> seq(T);
  std::vector<uint8_t> reset(T);
  for (int64_t t = 0; t < T; ++t) {
    seq[t] = c.chunk > 0 ? 0 : static_cast<int32_t>(t);
    reset[t] = c.chunk > 0 && t % c.chunk == 0;
  }
  int32_t* d_seq = device_alloc<int32_t>(T);
  uint8_t* d_reset = device_alloc<uint8_t>(T);
  BENCH_CHECK(cudaMemcpy(d_seq, seq.data(), 4 * T, cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(d_reset, reset.data(), T, cudaMemcpyHostToDevice));
  __nv_bfloat16* zxbcdt = random_bf16(T * row, -1.0f, 1.0f, 1);
  __nv_bfloat16* xbc = device_alloc<__nv_bfloat16>(T * conv_dim);
  __nv_bfloat16* y = device_alloc<__nv_bfloat16>(T * d_inner);
  float* conv_w = random_f32(conv_dim * c.W, -0.5f, 0.5f, 2);
  float* conv_b = random_f32(conv_dim, -0.1f, 0.1f, 3);
  float* A_log = random_f32(c.H, -1.0f, 1.0f, 4);
  float* D = random_f32(c.H, 0.5f, 1.5f, 5);
  float* dt_bias = random_f32(c.H, -2.0f, 0.0f, 6);
  float* norm_w = random_f32(d_inner, 0.5f, 1.5f, 7);
  const size_t tail_n = c.n_seqs * (c.W - 1) * conv_dim, state_n = c.n_seqs * d_inner * c.N;
  float* tail = random_f32(tail_n, -1.0f, 1.0f, 8);
  float* state = random_f32(state_n, -1.0f, 1.0f, 9);

  starserve::CausalConv1dParams cp;
  cp.out = xbc;
  cp.in = zxbcdt + d_inner;
  cp.in_stride = row;
  cp.weight = conv_w;
  cp.bias = conv_b;
  cp.tail = tail;
  cp.seq = d_seq;
  cp.reset = d_reset;
  cp.n_rows = T;
  cp.conv_dim = conv_dim;
  cp.width = c.W;
  cp.dtype = SsmDtype::kBf16;
  starserve::SsdScanParams sp;
  sp.y = y;
  sp.x = xbc;
  sp.B = xbc + d_inner;
  sp.C = xbc + d_inner + gn;
  sp.dt_raw = zxbcdt + d_inner + conv_dim;
  sp.x_stride = sp.bc_stride = conv_dim;
  sp.dt_stride = row;
  sp.A_log = A_log;
  sp.D = D;
  sp.dt_bias = dt_bias;
  sp.state = state;
  sp.seq = d_seq;
  sp.reset = d_reset;
  sp.n_rows = T;
  sp.H = c.H;
  sp.Pd = c.Pd;
  sp.G = c.G;
  sp.N = c.N;
  sp.dtype = SsmDtype::kBf16;
  starserve::GatedRmsNormParams np;
  np.out = y;
  np.y = y;
  np.z = zxbcdt;
  np.z_stride = row;
  np.weight = norm_w;
  np.n_rows = T;
  np.d = d_inner;
  np.eps = 1e-5f;
  np.dtype = SsmDtype::kBf16;

  const double es = 2.0;  // bf16
  const double carry_conv = 2.0 * 4 * tail_n, carry_scan = 2.0 * 4 * state_n;
  const double b_conv = es * T * conv_dim * 2 + carry_conv;
  const double b_scan = es * T * (conv_dim + c.H + d_inner) + carry_scan;
  const double b_norm = es * T * d_inner * 3;
  const double b_block = es * T * (conv_dim + c.H + 2 * d_inner) + es * T * conv_dim * 2 + es * T * d_inner +
                         carry_conv + carry_scan;  // xBC written and read back, y written by the scan
  struct Op {
    const char* name;
    double bytes;
    std::function<void()> fn;
  };
  const Op ops[] = {
      {"conv", b_conv, [&] { BENCH_CHECK(starserve::launch_causal_conv1d_silu(cp, nullptr)); }},
      {"scan", b_scan, [&] { BENCH_CHECK(starserve::launch_ssd_scan(sp, nullptr)); }},
      {"norm", b_norm, [&] { BENCH_CHECK(starserve::launch_gated_rms_norm(np, nullptr)); }},
      {"block", b_block,
       [&] {
         BENCH_CHECK(starserve::launch_causal_conv1d_silu(cp, nullptr));
         BENCH_CHECK(starserve::launch_ssd_scan(sp, nullptr));
         BENCH_CHECK(starserve::launch_gated_rms_norm(np, nullptr));
       }},
  };
  for (const Op& op : ops) {
    const double ms = median_ms(op.fn, iters);
    const double gbs = op.bytes / (ms * 1e-3) / 1e9;
    std::printf(
        "{\"bench\":\"ssm\",\"impl\":\"starserve\",\"mode\":\"%s\",\"shape\":\"%s\",\"op\":\"%s\",\"n_rows\":%lld,"
        "\"n_seqs\":%lld,\"chunk\":%d,\"H\":%d,\"Pd\":%d,\"G\":%d,\"N\":%d,\"conv_dim\":%lld,\"dtype\":\"bf16\","
        "\"bytes\":%.0f,\"predicted_ms_at_copy_bw\":%.4f,\"copy_gbs\":%.0f,\"ms\":%.4f,\"gbs\":%.1f,"
        "\"frac_of_copy\":%.3f}\n",
        c.mode, c.shape, op.name, static_cast<long long>(T), static_cast<long long>(c.n_seqs), c.chunk, c.H, c.Pd,
        c.G, c.N, static_cast<long long>(conv_dim), op.bytes, op.bytes / (copy_gbs * 1e9) * 1e3, copy_gbs, ms, gbs,
        gbs / copy_gbs);
    std::fflush(stdout);
  }
  for (void* p : std::initializer_list<void*>{d_seq, d_reset, zxbcdt, xbc, y, conv_w, conv_b, A_log, D, dt_bias,
                                              norm_w, tail, state})
    cudaFree(p);
}

}  // namespace

int main(int argc, char** argv) {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("{\"bench\":\"ssm\",\"skipped\":\"no CUDA device\"}\n");
    return 0;
  }
  bool quick = false;
  for (int i = 1; i < argc; ++i) quick |= std::strcmp(argv[i], "--quick") == 0;
  const int iters = quick ? 5 : 20;
  cudaDeviceProp prop{};
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("{\"bench\":\"device\",\"name\":\"%s\",\"sms\":%d}\n", prop.name, prop.multiProcessorCount);
  const double copy_gbs = copy_bandwidth_gbs(size_t{1} << 30);
  std::printf("{\"bench\":\"copy\",\"impl\":\"cudaMemcpy_d2d\",\"bytes\":%zu,\"gbs\":%.0f}\n", size_t{1} << 30,
              copy_gbs);
  for (int64_t T : {4096, 8192, 16384, 32768}) {
    run_case({"prefill", "h4_pd32_n64", T, 1, 16, 4, 32, 1, 64, 4}, copy_gbs, iters);
    run_case({"prefill", "h8_pd32_n128", T, 1, 16, 8, 32, 1, 128, 4}, copy_gbs, iters);
    run_case({"prefill", "h8_pd32_n128", T, 1, 8, 8, 32, 1, 128, 4}, copy_gbs, iters);
  }
  for (int64_t n : {1, 4, 16, 64}) {
    run_case({"decode", "h4_pd32_n64", n, n, 0, 4, 32, 1, 64, 4}, copy_gbs, iters);
    run_case({"decode", "h8_pd32_n128", n, n, 0, 8, 32, 1, 128, 4}, copy_gbs, iters);
  }
  return 0;
}
