// Parity of the CUDA kernels with the CPU references (kernels/ref). Both sides get the same
// bf16-rounded inputs, so the differences come only from the GPU's bf16 intermediates/outputs and
// fp32 summation order. Tolerances are derived from bf16's unit roundoff u = 2^-9 (8 significand
// bits, round to nearest) at each place where the kernels round to bf16 (see each test).
// Without a CUDA device every test that runs a kernel reports SKIPPED.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/attention/attention.h"
#include "kernels/baselines/prefill_baselines.h"
#include "common/cuda_call.h"
#include "kernels/elementwise.h"
#include "kernels/gemv.h"
#include "kernels/ref/attention_ref.h"
#include "kernels/ref/ops_ref.h"
#include "kernels/rms_norm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "tests/gpu/gpu_test_util.h"

namespace starserve {
namespace {

using namespace gpu_test;

struct AttnCase {
  int64_t n_q, n_kv;
  int n_heads, n_kv_heads, head_dim;
  bool causal;
  int64_t offset;
  bool out_fp32;
};

std::string name(const AttnCase& c) {
  std::ostringstream os;
  os << "q" << c.n_q << " kv" << c.n_kv << " h" << c.n_heads << "/" << c.n_kv_heads << " d" << c.head_dim;
  os << (c.causal ? " causal+" + std::to_string(c.offset) : std::string(" full")) << (c.out_fp32 ? " fp32" : " bf16");
  return os.str();
}

// A case's keys as pages of 2^page_shift keys in one pool, in scrambled (non-monotonic) pool
// order, with spare slots between them. Pool rows that hold no key (spare slots, the tail of the
// last page) are NaN: a kernel that reads one turns its output into NaN, which the checks reject.
struct PagedKv {
  int64_t page_elems = 0;     // page_size * n_kv_heads * head_dim
  std::vector<int64_t> slot;  // page i lives in pool slot slot[i]
  std::vector<float> k_host, v_host;
  std::vector<__nv_bfloat16> k_bits, v_bits;
};

PagedKv make_paged(const Bf16Data& k, const Bf16Data& v, int64_t n_kv, int n_kv_heads, int head_dim, int page_shift,
                   std::mt19937& rng) {
  PagedKv pk;
  const int64_t page = int64_t{1} << page_shift;
  const int64_t row = static_cast<int64_t>(n_kv_heads) * head_dim;
  const int64_t n_pages = (n_kv + page - 1) / page;
  const int64_t pool_pages = n_pages + 2;
  pk.page_elems = page * row;
  std::vector<int64_t> order(pool_pages);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::shuffle(order.begin(), order.end(), rng);
  pk.slot.assign(order.begin(), order.begin() + n_pages);
  const bool monotonic = std::is_sorted(pk.slot.begin(), pk.slot.end()) ||
                         std::is_sorted(pk.slot.begin(), pk.slot.end(), std::greater<>());
  if (n_pages >= 3 && monotonic) std::swap(pk.slot[0], pk.slot[1]);
  if (n_pages == 2 && pk.slot[0] < pk.slot[1]) std::swap(pk.slot[0], pk.slot[1]);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  pk.k_host.assign(pool_pages * pk.page_elems, nan);
  pk.v_host.assign(pool_pages * pk.page_elems, nan);
  pk.k_bits.assign(pool_pages * pk.page_elems, __float2bfloat16(nan));
  pk.v_bits.assign(pool_pages * pk.page_elems, __float2bfloat16(nan));
  for (int64_t j = 0; j < n_kv; ++j) {
    const int64_t dst = pk.slot[j >> page_shift] * pk.page_elems + (j & (page - 1)) * row;
    std::copy_n(k.host.begin() + j * row, row, pk.k_host.begin() + dst);
    std::copy_n(v.host.begin() + j * row, row, pk.v_host.begin() + dst);
    std::copy_n(k.bits.begin() + j * row, row, pk.k_bits.begin() + dst);
    std::copy_n(v.bits.begin() + j * row, row, pk.v_bits.begin() + dst);
  }
  return pk;
}

// The kernels under test: the shipped prefill kernels (mma.sync, and the Hopper wgmma kernel where
// the device is sm_90 and the build carries sm_90a code), the baselines the benchmark compares
// them with (kernels/baselines/prefill_baselines.h: the WMMA kernel, the mma.sync m64 and m64-lean
// configurations, and the wgmma ping-pong, three-consumer and cp.async-only configurations), and
// decode.
enum class AttnKernel {
  kPrefillMma,
  kPrefillWgmma,
  kPrefillWmma,
  kPrefillMmaM64,
  kPrefillMmaM64Lean,
  kPrefillWgmmaPingpong,
  kPrefillWgmmaThreeConsumers,
  kPrefillWgmmaCpAsync,
  kDecode
};
constexpr AttnKernel kPrefillKernels[] = {AttnKernel::kPrefillMma,
                                          AttnKernel::kPrefillWgmma,
                                          AttnKernel::kPrefillWmma,
                                          AttnKernel::kPrefillMmaM64,
                                          AttnKernel::kPrefillMmaM64Lean,
                                          AttnKernel::kPrefillWgmmaPingpong,
                                          AttnKernel::kPrefillWgmmaThreeConsumers,
                                          AttnKernel::kPrefillWgmmaCpAsync};

const char* kernel_name(AttnKernel k) {
  switch (k) {
    case AttnKernel::kPrefillMma: return "prefill(mma) ";
    case AttnKernel::kPrefillWgmma: return "prefill(wgmma) ";
    case AttnKernel::kPrefillWmma: return "prefill(baseline wmma) ";
    case AttnKernel::kPrefillMmaM64: return "prefill(baseline mma m64) ";
    case AttnKernel::kPrefillMmaM64Lean: return "prefill(baseline mma m64-lean) ";
    case AttnKernel::kPrefillWgmmaPingpong: return "prefill(baseline wgmma ping-pong) ";
    case AttnKernel::kPrefillWgmmaThreeConsumers: return "prefill(baseline wgmma three consumers) ";
    case AttnKernel::kPrefillWgmmaCpAsync: return "prefill(baseline wgmma cp.async) ";
    case AttnKernel::kDecode: return "decode ";
  }
  return "?";
}

bool is_wgmma(AttnKernel k) {
  return k == AttnKernel::kPrefillWgmma || k == AttnKernel::kPrefillWgmmaPingpong ||
         k == AttnKernel::kPrefillWgmmaThreeConsumers || k == AttnKernel::kPrefillWgmmaCpAsync;
}

cudaError_t launch_prefill(AttnKernel k, const AttentionGpuParams& p) {
  switch (k) {
    case AttnKernel::kPrefillMma: return launch_prefill_attention_mma(p, nullptr);
    case AttnKernel::kPrefillWgmma: return launch_prefill_attention_wgmma(p, nullptr);
    case AttnKernel::kPrefillWmma: return launch_prefill_attention_wmma(p, nullptr);
    case AttnKernel::kPrefillMmaM64: return launch_prefill_attention_mma_m64(p, nullptr);
    case AttnKernel::kPrefillMmaM64Lean: return launch_prefill_attention_mma_m64_lean(p, nullptr);
    case AttnKernel::kPrefillWgmmaPingpong: return launch_prefill_attention_wgmma_pingpong(p, nullptr);
    case AttnKernel::kPrefillWgmmaThreeConsumers: return launch_prefill_attention_wgmma_three_consumers(p, nullptr);
    case AttnKernel::kPrefillWgmmaCpAsync: return launch_prefill_attention_wgmma_cp_async(p, nullptr);
    case AttnKernel::kDecode: break;
  }
  return cudaErrorInvalidValue;
}

// Runs one case on the GPU (a prefill kernel or decode) and on partial_attention_ref. page_shift 0:
// contiguous k, v; else the keys go through page tables (make_paged), and the reference reads the
// same pool through one KvSegment per page. with_entropy false passes entropy = null (not computed).
// scale_sign -1 negates the softmax scale (scores and their logit range mirrored).
// Tolerances: scores and sums are fp32 on both sides; the GPU rounds P to bf16 before P V (prefill,
// and decode's tensor-core path: >= 2 query rows per kv head) and O to bf16 on output: |dO| <=
// u * max|v| (P) + u * |O| (output) <= 2u max|v|; we allow 4u max|v| for fp32 order effects.
// LSE and H carry no bf16 rounding: fp32 sums over up to n_kv terms in a different order, relative
// error ~ 1e-6 * log2(n_kv) each, so 1e-3 absolute is generous yet far below any real defect (a
// missed key moves them by >= 1e-2 at these sizes).
void check_attention(const AttnCase& c, AttnKernel kernel, std::mt19937& rng, int page_shift = 0,
                     bool with_entropy = true, float scale_sign = 1.0f) {
  if (is_wgmma(kernel) && !prefill_wgmma_supported()) {
    static bool said = false;
    if (!said) std::printf("  prefill(wgmma) not run: the device is not sm_90 or the build has no sm_90a code\n");
    said = true;
    return;
  }
  SCOPED_TRACE(std::string(kernel_name(kernel)) + name(c) +
               (page_shift ? " page_shift " + std::to_string(page_shift) : std::string()) +
               (with_entropy ? std::string() : " no entropy") + (scale_sign < 0 ? " negative scale" : ""));
  const int d = c.head_dim;
  auto q = random_bf16(c.n_q * c.n_heads * d, -1.0f, 1.0f, rng);
  auto k = random_bf16(std::max<int64_t>(c.n_kv, 1) * c.n_kv_heads * d, -1.0f, 1.0f, rng);
  auto v = random_bf16(std::max<int64_t>(c.n_kv, 1) * c.n_kv_heads * d, -1.0f, 1.0f, rng);
  // Sharper than 1/sqrt(d): larger logit range.
  const float scale = scale_sign * 2.0f / std::sqrt(static_cast<float>(d));

  const int64_t rows = c.n_q * c.n_heads;
  std::vector<float> o_ref(rows * d), lse_ref(rows), h_ref(rows);
  std::vector<KvSegment> segs;
  PagedKv pk;
  if (page_shift == 0) {
    segs.push_back({k.host.data(), v.host.data(), c.n_kv});
  } else {
    pk = make_paged(k, v, c.n_kv, c.n_kv_heads, d, page_shift, rng);
    const int64_t page = int64_t{1} << page_shift;
    for (size_t i = 0; i < pk.slot.size(); ++i) {
      const int64_t off = pk.slot[i] * pk.page_elems;
      segs.push_back({pk.k_host.data() + off, pk.v_host.data() + off,
                      std::min<int64_t>(page, c.n_kv - static_cast<int64_t>(i) * page)});
    }
  }
  PartialAttentionParams rp;
  rp.out = o_ref.data();
  rp.lse = lse_ref.data();
  rp.entropy = h_ref.data();
  rp.q = q.host.data();
  rp.kv = segs;
  rp.n_q = c.n_q;
  rp.n_heads = c.n_heads;
  rp.n_kv_heads = c.n_kv_heads;
  rp.head_dim = d;
  rp.scale = scale;
  rp.mask = AttentionMask{c.causal, c.offset};
  partial_attention_ref(rp);

  DeviceBuffer<__nv_bfloat16> dq(q.bits);
  DeviceBuffer<__nv_bfloat16> dk(page_shift ? std::vector<__nv_bfloat16>{} : k.bits);
  DeviceBuffer<__nv_bfloat16> dv(page_shift ? std::vector<__nv_bfloat16>{} : v.bits);
  DeviceBuffer<__nv_bfloat16> dk_pool(pk.k_bits), dv_pool(pk.v_bits);
  std::vector<const __nv_bfloat16*> k_table, v_table;
  for (int64_t s : pk.slot) {
    k_table.push_back(dk_pool.ptr + s * pk.page_elems);
    v_table.push_back(dv_pool.ptr + s * pk.page_elems);
  }
  DeviceBuffer<const __nv_bfloat16*> dk_table(k_table), dv_table(v_table);
  DeviceBuffer<float> d_of(c.out_fp32 ? rows * d : 0), d_lse(rows), d_h(rows);
  DeviceBuffer<__nv_bfloat16> d_ob(c.out_fp32 ? 0 : rows * d);
  AttentionGpuParams p;
  p.out = c.out_fp32 ? static_cast<void*>(d_of.ptr) : static_cast<void*>(d_ob.ptr);
  p.out_fp32 = c.out_fp32;
  p.lse = d_lse.ptr;
  p.entropy = with_entropy ? d_h.ptr : nullptr;
  p.q = dq.ptr;
  if (page_shift == 0) {
    p.k = dk.ptr;
    p.v = dv.ptr;
  } else {  // k, v stay null: the kernels must not touch them
    p.k_pages = dk_table.ptr;
    p.v_pages = dv_table.ptr;
    p.page_shift = page_shift;
    // The pools (NaN outside the pages' keys): the wgmma kernel reads the pages with the TMA.
    p.k_pool = dk_pool.ptr;
    p.v_pool = dv_pool.ptr;
    p.pool_rows = static_cast<int64_t>(pk.k_bits.size()) / (static_cast<int64_t>(c.n_kv_heads) * d);
  }
  p.n_q = c.n_q;
  p.n_kv = c.n_kv;
  p.n_heads = c.n_heads;
  p.n_kv_heads = c.n_kv_heads;
  p.head_dim = d;
  p.scale = scale;
  p.causal = c.causal;
  p.causal_offset = c.offset;
  if (kernel == AttnKernel::kDecode) {
    const size_t ws_bytes = decode_attention_workspace_bytes(p);
    ASSERT_GT(ws_bytes, 0u);
    DeviceBuffer<unsigned char> ws(ws_bytes);
    ASSERT_EQ(launch_decode_attention(p, ws.ptr, ws_bytes, nullptr), cudaSuccess);
    SS_CHECK_CALL(cudaDeviceSynchronize());
  } else {
    ASSERT_EQ(launch_prefill(kernel, p), cudaSuccess);
    SS_CHECK_CALL(cudaDeviceSynchronize());
  }
  const std::vector<float> o = c.out_fp32 ? d_of.get() : to_float(d_ob.get());
  expect_close(o, o_ref, 4.0f * kBf16U * 1.0f, "O");  // max|v| = 1
  expect_close(d_lse.get(), lse_ref, 1e-3f, "LSE");
  if (with_entropy) expect_close(d_h.get(), h_ref, 1e-3f, "entropy");
}

// Every prefill kernel (shipped and baselines) on the same cases and tolerances.
TEST(GpuAttention, PrefillMatchesReference) {
  SKIP_WITHOUT_GPU();
  for (AttnKernel kernel : kPrefillKernels) {
    std::mt19937 rng(1);
    for (int d : {64, 128}) {
      for (auto [h, kvh] : {std::pair{4, 4}, std::pair{6, 2}, std::pair{8, 1}}) {  // GQA ratios 1, 3, 8
        const std::vector<AttnCase> cases = {
            {1, 1, h, kvh, d, true, 0, true},         // one token
            {1, 77, h, kvh, d, true, 76, false},      // one query at the end of 77 keys
            {77, 77, h, kvh, d, true, 0, true},       // ordinary prefill, not a multiple of the tile
            {64, 128, h, kvh, d, false, 0, false},    // full tiles, no mask
            {100, 300, h, kvh, d, true, 200, true},   // anchor + block: queries are the last 100 keys
            {130, 97, h, kvh, d, false, 0, true},     // other shard: every key visible
            {70, 50, h, kvh, d, true, -5, true},      // negative offset: first rows see nothing (LSE -inf)
        };
        for (const auto& c : cases) check_attention(c, kernel, rng);
      }
    }
  }
}

// Shapes around the tile edges and the mask's extremes, for every prefill kernel. The 128-row
// blocks of mma.sync m128 and wgmma: 129 and 150 rows put one or a few rows into a second block; 200 causal rows
// leave the first warps of a block with a last key tile they skip.
TEST(GpuAttention, PrefillEdgeCases) {
  SKIP_WITHOUT_GPU();
  for (AttnKernel kernel : kPrefillKernels) {
    std::mt19937 rng(7);
    for (int d : {64, 128}) {
      const std::vector<AttnCase> cases = {
          {200, 200, 4, 4, d, true, 0, false},     // causal square over 4 query tiles: diagonal tiles in every block
          {129, 1030, 8, 1, d, true, 901, true},   // GQA 8, 17 key tiles (the double buffer cycles), last tile 6 keys
          {65, 63, 6, 2, d, false, 0, false},      // one row into a second query tile; keys one short of a tile
          {70, 50, 4, 2, d, true, 1000, true},     // offset beyond n_kv: every key visible to every row
          {150, 100, 4, 2, d, true, -120, false},  // first query tile sees nothing, the second only in its last 8 rows
          {64, 64, 4, 4, d, true, -200, true},     // no row sees any key: O = 0, LSE = -inf, H = 0
          {3, 0, 4, 2, d, true, 0, false},         // no keys at all
      };
      for (const auto& c : cases) check_attention(c, kernel, rng);
      check_attention({77, 300, 8, 1, d, true, 223, false}, kernel, rng, 0, /*with_entropy=*/false);
      check_attention({77, 300, 8, 1, d, false, 0, true}, kernel, rng, 8, /*with_entropy=*/false);
      // Negative scale: the lean softmax (mma.sync m128, m64-lean; wgmma) takes the row max on raw
      // scores and negates Q in shared memory.
      check_attention({200, 200, 6, 2, d, true, 0, false}, kernel, rng, 0, true, -1.0f);
      check_attention({130, 600, 4, 4, d, false, 0, true}, kernel, rng, 6, true, -1.0f);
    }
  }
}

TEST(GpuAttention, DecodeMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(2);
  for (int d : {64, 128}) {
    for (auto [h, kvh] : {std::pair{4, 4}, std::pair{6, 2}, std::pair{8, 1}}) {
      const std::vector<AttnCase> cases = {
          {1, 1, h, kvh, d, true, 0, true},
          {1, 1000, h, kvh, d, true, 999, false},
          {3, 5003, h, kvh, d, true, 5000, true},   // several new tokens, keys not a multiple of the chunk
          {2, 4099, h, kvh, d, false, 0, true},     // context shard without the queries' own keys
          {4, 300, h, kvh, d, true, -2, true},      // first rows see nothing
      };
      for (const auto& c : cases) check_attention(c, AttnKernel::kDecode, rng);
    }
  }
}

// Decode with >= 2 query rows per kv head runs on tensor cores (16-key steps, tiles of 8 query rows,
// one or two per block, rows n_q x group split into row groups of 8 or 16). GQA ratios 2, 4, 8, 16
// with 1..8 tokens fill the row tiles partly, exactly, and over several row groups; key counts
// around multiples of the 16-key step put causal limits that differ between the rows of one tile
// inside the last step.
TEST(GpuAttention, DecodeGqaMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(13);
  for (int d : {64, 128}) {
    for (int group : {2, 4, 8, 16}) {
      for (int64_t n_q : {1, 2, 3, 4, 5, 8}) {  // the n_q tokens are the last of 333 + n_q keys
        check_attention({n_q, 333 + n_q, 2 * group, 2, d, true, 333, n_q % 2 == 0}, AttnKernel::kDecode, rng);
      }
    }
    for (int64_t n_kv : {1, 2, 15, 16, 17, 31, 33, 63, 65, 127, 129}) {  // 4 tokens x group 4: 16 rows
      check_attention({4, n_kv, 16, 4, d, true, n_kv - 4, n_kv % 2 == 1}, AttnKernel::kDecode, rng);
    }
    // kDecodeMaxQ tokens x group 8: 512 rows per kv head, 32 row groups reading the same keys.
    check_attention({kDecodeMaxQ, 1500, 16, 2, d, true, 1500 - kDecodeMaxQ, true}, AttnKernel::kDecode, rng);
    // The benchmark's GQA 4 with one token: splits of 256 keys, 4 steps per warp.
    check_attention({1, 20000, 32, 8, d, true, 19999, false}, AttnKernel::kDecode, rng);
    // Group 3 x 3 tokens = 9 rows (a second tile with one row), every key visible, entropy not computed.
    check_attention({3, 2500, 24, 8, d, false, 0, true}, AttnKernel::kDecode, rng, 0, /*with_entropy=*/false);
  }
}

// Several sequences in one decode launch (launch_decode_attention_batch) against one launch each:
// the same plan and arithmetic per sequence, so O, LSE and H must agree to fp32 rounding (1e-6;
// they agree bit for bit unless the compiler contracts the two instances differently). Sequences
// of very different lengths (one split to many; a causal offset that hides keys), contiguous and
// paged keys, the three pass-1 kernels (1, 8 and 16 rows per block), fp32 and bf16 output.
struct DecodeSeq {
  std::unique_ptr<DeviceBuffer<__nv_bfloat16>> q, k, v, k_pool, v_pool;
  std::unique_ptr<DeviceBuffer<const __nv_bfloat16*>> k_table, v_table;
  std::unique_ptr<DeviceBuffer<float>> o32, lse, h;
  std::unique_ptr<DeviceBuffer<__nv_bfloat16>> o16;
  AttentionGpuParams p;
};

DecodeSeq make_decode_seq(int64_t n_q, int64_t n_kv, int heads, int kv_heads, int d, int page_shift, bool out_fp32,
                          int64_t offset, std::mt19937& rng) {
  DecodeSeq s;
  auto q = random_bf16(n_q * heads * d, -1.0f, 1.0f, rng);
  auto k = random_bf16(n_kv * kv_heads * d, -1.0f, 1.0f, rng);
  auto v = random_bf16(n_kv * kv_heads * d, -1.0f, 1.0f, rng);
  s.q = std::make_unique<DeviceBuffer<__nv_bfloat16>>(q.bits);
  AttentionGpuParams& p = s.p;
  if (page_shift == 0) {
    s.k = std::make_unique<DeviceBuffer<__nv_bfloat16>>(k.bits);
    s.v = std::make_unique<DeviceBuffer<__nv_bfloat16>>(v.bits);
    p.k = s.k->ptr;
    p.v = s.v->ptr;
  } else {
    PagedKv pk = make_paged(k, v, n_kv, kv_heads, d, page_shift, rng);
    s.k_pool = std::make_unique<DeviceBuffer<__nv_bfloat16>>(pk.k_bits);
    s.v_pool = std::make_unique<DeviceBuffer<__nv_bfloat16>>(pk.v_bits);
    std::vector<const __nv_bfloat16*> kt, vt;
    for (int64_t slot : pk.slot) {
      kt.push_back(s.k_pool->ptr + slot * pk.page_elems);
      vt.push_back(s.v_pool->ptr + slot * pk.page_elems);
    }
    s.k_table = std::make_unique<DeviceBuffer<const __nv_bfloat16*>>(kt);
    s.v_table = std::make_unique<DeviceBuffer<const __nv_bfloat16*>>(vt);
    p.k_pages = s.k_table->ptr;
    p.v_pages = s.v_table->ptr;
    p.page_shift = page_shift;
  }
  const int64_t rows = n_q * heads;
  s.lse = std::make_unique<DeviceBuffer<float>>(rows);
  s.h = std::make_unique<DeviceBuffer<float>>(rows);
  if (out_fp32) {
    s.o32 = std::make_unique<DeviceBuffer<float>>(rows * d);
    p.out = s.o32->ptr;
  } else {
    s.o16 = std::make_unique<DeviceBuffer<__nv_bfloat16>>(rows * d);
    p.out = s.o16->ptr;
  }
  p.out_fp32 = out_fp32;
  p.lse = s.lse->ptr;
  p.entropy = s.h->ptr;
  p.q = s.q->ptr;
  p.n_q = n_q;
  p.n_kv = n_kv;
  p.n_heads = heads;
  p.n_kv_heads = kv_heads;
  p.head_dim = d;
  p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  p.causal = true;
  p.causal_offset = offset;
  return s;
}

std::vector<float> decode_outputs(const DecodeSeq& s) {
  std::vector<float> all = s.p.out_fp32 ? s.o32->get() : to_float(s.o16->get());
  const auto lse = s.lse->get(), h = s.h->get();
  all.insert(all.end(), lse.begin(), lse.end());
  all.insert(all.end(), h.begin(), h.end());
  return all;
}

TEST(GpuAttention, DecodeBatchMatchesOneLaunchPerSequence) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(21);
  struct Group {
    int64_t n_q;
    int heads, kv_heads, d, page_shift;
    bool out_fp32;
  };
  // (1 token, MHA: simt kernel), (1 token, GQA 4: 8-row mma), (3 tokens, GQA 4: 16-row mma).
  for (const Group g : {Group{1, 8, 8, 64, 0, true}, Group{1, 32, 8, 128, 8, true}, Group{1, 32, 8, 128, 0, false},
                        Group{3, 16, 4, 128, 6, true}, Group{1, 12, 4, 64, 8, false}}) {
    SCOPED_TRACE("n_q " + std::to_string(g.n_q) + " heads " + std::to_string(g.heads) + "/" +
                 std::to_string(g.kv_heads) + " d" + std::to_string(g.d) + " page_shift " +
                 std::to_string(g.page_shift));
    std::vector<DecodeSeq> seqs;
    for (int64_t n_kv : {int64_t{70}, int64_t{5000}, int64_t{300}, int64_t{33000}, int64_t{1025}}) {
      const int64_t offset = n_kv == 300 ? -1 : n_kv - g.n_q;  // -1: the first row sees nothing
      seqs.push_back(make_decode_seq(g.n_q, n_kv, g.heads, g.kv_heads, g.d, g.page_shift, g.out_fp32, offset, rng));
    }
    std::vector<std::vector<float>> single;
    std::vector<std::unique_ptr<DeviceBuffer<unsigned char>>> ws;
    std::vector<AttentionGpuParams> params;
    std::vector<void*> ws_ptrs;
    const int key = decode_attention_batch_key(seqs[0].p);
    ASSERT_GE(key, 0);
    for (DecodeSeq& s : seqs) {
      EXPECT_EQ(decode_attention_batch_key(s.p), key);
      const size_t bytes = decode_attention_workspace_bytes(s.p);
      ws.push_back(std::make_unique<DeviceBuffer<unsigned char>>(bytes));
      ASSERT_EQ(launch_decode_attention(s.p, ws.back()->ptr, bytes, nullptr), cudaSuccess);
      SS_CHECK_CALL(cudaDeviceSynchronize());
      single.push_back(decode_outputs(s));
      // NaN until the batched launch rewrites them.
      const int64_t rows = s.p.n_q * s.p.n_heads;
      SS_CHECK_CALL(cudaMemset(s.p.lse, 0xff, rows * sizeof(float)));
      SS_CHECK_CALL(cudaMemset(s.p.entropy, 0xff, rows * sizeof(float)));
      SS_CHECK_CALL(cudaMemset(s.p.out, 0xff, rows * s.p.head_dim * (s.p.out_fp32 ? 4 : 2)));
      params.push_back(s.p);
      ws_ptrs.push_back(ws.back()->ptr);
    }
    ASSERT_EQ(launch_decode_attention_batch(params.data(), ws_ptrs.data(), static_cast<int>(params.size()), nullptr),
              cudaSuccess);
    SS_CHECK_CALL(cudaDeviceSynchronize());
    int differing_bits = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const std::vector<float> got = decode_outputs(seqs[i]);
      expect_close(got, single[i], 1e-6f, "sequence " + std::to_string(i));
      for (size_t j = 0; j < got.size(); ++j) differing_bits += std::memcmp(&got[j], &single[i][j], 4) != 0;
    }
    std::printf("  batched vs one launch each: %d values not bit-identical\n", differing_bits);
    // The same calls through a table in device memory (launch_decode_attention_table).
    for (DecodeSeq& s : seqs) {
      const int64_t rows = s.p.n_q * s.p.n_heads;
      SS_CHECK_CALL(cudaMemset(s.p.lse, 0xff, rows * sizeof(float)));
      SS_CHECK_CALL(cudaMemset(s.p.entropy, 0xff, rows * sizeof(float)));
      SS_CHECK_CALL(cudaMemset(s.p.out, 0xff, rows * s.p.head_dim * (s.p.out_fp32 ? 4 : 2)));
    }
    std::vector<unsigned char> host(decode_attention_table_bytes(static_cast<int>(params.size())));
    DecodeTableShape shape;
    ASSERT_EQ(build_decode_attention_table(params.data(), ws_ptrs.data(), static_cast<int>(params.size()),
                                           host.data(), &shape),
              cudaSuccess);
    DeviceBuffer<unsigned char> table(host);
    ASSERT_EQ(launch_decode_attention_table(table.ptr, shape, nullptr), cudaSuccess);
    SS_CHECK_CALL(cudaDeviceSynchronize());
    for (size_t i = 0; i < seqs.size(); ++i)
      expect_close(decode_outputs(seqs[i]), single[i], 1e-6f, "table, sequence " + std::to_string(i));
  }
  // More sequences than one by-value batch holds, in one table: each equals its own launch.
  {
    std::vector<DecodeSeq> many;
    std::vector<AttentionGpuParams> params;
    std::vector<std::unique_ptr<DeviceBuffer<unsigned char>>> ws;
    std::vector<void*> ws_ptrs;
    std::vector<std::vector<float>> single;
    for (int i = 0; i < 3 * kDecodeBatchMax + 5; ++i) {
      const int64_t n_kv = 40 + 97 * i;
      many.push_back(make_decode_seq(1, n_kv, 9, 3, 64, i % 2 ? 6 : 0, true, n_kv - 1, rng));
    }
    for (DecodeSeq& s : many) {
      const size_t bytes = decode_attention_workspace_bytes(s.p);
      ws.push_back(std::make_unique<DeviceBuffer<unsigned char>>(bytes));
      ASSERT_EQ(launch_decode_attention(s.p, ws.back()->ptr, bytes, nullptr), cudaSuccess);
      SS_CHECK_CALL(cudaDeviceSynchronize());
      single.push_back(decode_outputs(s));
      SS_CHECK_CALL(cudaMemset(s.p.out, 0xff, s.p.n_q * s.p.n_heads * s.p.head_dim * 4));
      params.push_back(s.p);
      ws_ptrs.push_back(ws.back()->ptr);
    }
    // Paged and contiguous keys do not share a kernel: one table each, as the CUDA backend groups them.
    for (int paged = 0; paged < 2; ++paged) {
      std::vector<AttentionGpuParams> part;
      std::vector<void*> part_ws;
      for (size_t i = 0; i < params.size(); ++i)
        if (static_cast<int>(i % 2) == paged) {
          part.push_back(params[i]);
          part_ws.push_back(ws_ptrs[i]);
        }
      std::vector<unsigned char> host(decode_attention_table_bytes(static_cast<int>(part.size())));
      DecodeTableShape shape;
      ASSERT_EQ(build_decode_attention_table(part.data(), part_ws.data(), static_cast<int>(part.size()), host.data(),
                                             &shape),
                cudaSuccess);
      DeviceBuffer<unsigned char> table(host);
      ASSERT_EQ(launch_decode_attention_table(table.ptr, shape, nullptr), cudaSuccess);
    }
    SS_CHECK_CALL(cudaDeviceSynchronize());
    for (size_t i = 0; i < many.size(); ++i)
      expect_close(decode_outputs(many[i]), single[i], 1e-6f, "table of many, sequence " + std::to_string(i));
    // Calls of different kernels cannot share a table.
    std::vector<unsigned char> host(decode_attention_table_bytes(2));
    DecodeTableShape shape;
    EXPECT_EQ(build_decode_attention_table(params.data(), ws_ptrs.data(), 2, host.data(), &shape),
              cudaErrorInvalidValue);
  }
  // A call whose kernel differs from the first one's cannot join its batch.
  DecodeSeq a = make_decode_seq(1, 100, 8, 8, 64, 0, true, 99, rng);
  DecodeSeq b = make_decode_seq(1, 100, 32, 8, 64, 0, true, 99, rng);
  EXPECT_NE(decode_attention_batch_key(a.p), decode_attention_batch_key(b.p));
  DeviceBuffer<unsigned char> wa(decode_attention_workspace_bytes(a.p)), wb(decode_attention_workspace_bytes(b.p));
  const AttentionGpuParams mixed[] = {a.p, b.p};
  void* const mixed_ws[] = {wa.ptr, wb.ptr};
  EXPECT_EQ(launch_decode_attention_batch(mixed, mixed_ws, 2, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_decode_attention_batch(mixed, mixed_ws, kDecodeBatchMax + 1, nullptr), cudaErrorInvalidValue);
}

// Paged keys (scrambled pages of 64 and 256 keys, NaN in every pool row that holds no key) against
// the reference reading the same pool page by page. Same tolerances as the contiguous cases.
TEST(GpuAttention, PagedPrefillMatchesReference) {
  SKIP_WITHOUT_GPU();
  for (AttnKernel kernel : kPrefillKernels) {
    std::mt19937 rng(11);
    for (int shift : {6, 8}) {
      for (int d : {64, 128}) {
        for (auto [h, kvh] : {std::pair{4, 4}, std::pair{6, 2}, std::pair{8, 1}}) {
          const std::vector<AttnCase> cases = {
              {1, 77, h, kvh, d, true, 76, false},     // one query at the end; last page partly filled
              {77, 77, h, kvh, d, true, 0, true},      // ordinary prefill
              {100, 300, h, kvh, d, true, 200, true},  // anchor + block: causal offset, several pages
              {130, 600, h, kvh, d, false, 0, false},  // every key visible, 10 or 3 pages
              {70, 50, h, kvh, d, true, -5, true},     // fewer keys than one page; first rows see nothing
          };
          for (const auto& c : cases) check_attention(c, kernel, rng, shift);
        }
      }
    }
  }
}

// The wgmma configurations with 128-key tiles and two consumers (the shipped one and the ping-pong
// and cp.async-only baselines) do the same arithmetic in the same order, whatever copies the keys
// (TMA or cp.async), however the consumers take turns, and whether the keys are contiguous or
// paged: their outputs must agree bit for bit.
// This also checks the TMA's page addressing exactly (pages placed out of order in a NaN pool).
TEST(GpuAttention, WgmmaCopyPathsAgreeBitwise) {
  SKIP_WITHOUT_GPU();
  if (!prefill_wgmma_supported()) GTEST_SKIP() << "the device is not sm_90 or the build has no sm_90a code";
  std::mt19937 rng(21);
  struct Case {
    int64_t n_q, n_kv;
    int heads, kv_heads, d;
    bool causal;
    int64_t offset;
    int page_shift;
  };
  const Case cases[] = {
      {300, 1000, 8, 2, 128, true, 700, 6},   // anchor + block, pages of 64
      {256, 700, 4, 4, 64, false, 0, 8},      // every key visible, last page partly filled
      {517, 517, 6, 3, 128, true, 0, 8},      // causal square
      {129, 2300, 8, 1, 64, true, 2171, 7},   // many pages of 128
  };
  for (const Case& c : cases) {
    std::ostringstream trace;
    trace << "q" << c.n_q << " kv" << c.n_kv << " d" << c.d << " page_shift " << c.page_shift;
    SCOPED_TRACE(trace.str());
    const int64_t row = static_cast<int64_t>(c.kv_heads) * c.d;
    auto q = random_bf16(c.n_q * c.heads * c.d, -1.0f, 1.0f, rng);
    auto k = random_bf16(c.n_kv * row, -1.0f, 1.0f, rng);
    auto v = random_bf16(c.n_kv * row, -1.0f, 1.0f, rng);
    PagedKv pk = make_paged(k, v, c.n_kv, c.kv_heads, c.d, c.page_shift, rng);
    DeviceBuffer<__nv_bfloat16> dq(q.bits), dk(k.bits), dv(v.bits), dk_pool(pk.k_bits), dv_pool(pk.v_bits);
    std::vector<const __nv_bfloat16*> k_table, v_table;
    for (int64_t slot : pk.slot) {
      k_table.push_back(dk_pool.ptr + slot * pk.page_elems);
      v_table.push_back(dv_pool.ptr + slot * pk.page_elems);
    }
    DeviceBuffer<const __nv_bfloat16*> dk_table(k_table), dv_table(v_table);
    const int64_t rows = c.n_q * c.heads;
    DeviceBuffer<__nv_bfloat16> d_o(rows * c.d);
    DeviceBuffer<float> d_lse(rows), d_h(rows);
    AttentionGpuParams p;
    p.out = d_o.ptr;
    p.lse = d_lse.ptr;
    p.entropy = d_h.ptr;
    p.q = dq.ptr;
    p.n_q = c.n_q;
    p.n_kv = c.n_kv;
    p.n_heads = c.heads;
    p.n_kv_heads = c.kv_heads;
    p.head_dim = c.d;
    p.scale = 1.0f / std::sqrt(static_cast<float>(c.d));
    p.causal = c.causal;
    p.causal_offset = c.offset;
    struct Result {
      std::vector<__nv_bfloat16> o;
      std::vector<float> lse, h;
    };
    auto run = [&](AttnKernel kernel, bool paged, bool pool) {
      AttentionGpuParams r = p;
      if (paged) {
        r.k_pages = dk_table.ptr;
        r.v_pages = dv_table.ptr;
        r.page_shift = c.page_shift;
        if (pool) {
          r.k_pool = dk_pool.ptr;
          r.v_pool = dv_pool.ptr;
          r.pool_rows = static_cast<int64_t>(pk.k_bits.size()) / row;
        }
      } else {
        r.k = dk.ptr;
        r.v = dv.ptr;
      }
      SS_CHECK_CALL(cudaMemset(d_o.ptr, 0xff, rows * c.d * sizeof(__nv_bfloat16)));
      EXPECT_EQ(launch_prefill(kernel, r), cudaSuccess);
      SS_CHECK_CALL(cudaDeviceSynchronize());
      return Result{d_o.get(), d_lse.get(), d_h.get()};
    };
    const Result want = run(AttnKernel::kPrefillWgmma, false, false);  // contiguous keys, TMA
    struct Path {
      AttnKernel kernel;
      bool paged, pool;
      const char* what;
    };
    constexpr AttnKernel kShipped = AttnKernel::kPrefillWgmma, kCpAsync = AttnKernel::kPrefillWgmmaCpAsync,
                         kPingpong = AttnKernel::kPrefillWgmmaPingpong;
    for (const Path& path : {Path{kShipped, true, true, "paged, TMA"},
                             Path{kShipped, true, false, "paged, cp.async (no pool)"},
                             Path{kCpAsync, false, false, "contiguous, cp.async"},
                             Path{kCpAsync, true, true, "paged, cp.async"},
                             Path{kPingpong, true, true, "ping-pong, paged, TMA"},
                             Path{kPingpong, false, false, "ping-pong"}}) {
      const Result got = run(path.kernel, path.paged, path.pool);
      EXPECT_EQ(std::memcmp(got.o.data(), want.o.data(), got.o.size() * sizeof(got.o[0])), 0) << path.what << ": O";
      EXPECT_EQ(std::memcmp(got.lse.data(), want.lse.data(), got.lse.size() * sizeof(float)), 0) << path.what << ": LSE";
      EXPECT_EQ(std::memcmp(got.h.data(), want.h.data(), got.h.size() * sizeof(float)), 0) << path.what << ": entropy";
    }
  }
}

TEST(GpuAttention, PagedDecodeMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(12);
  for (int shift : {6, 8}) {
    for (int d : {64, 128}) {
      for (auto [h, kvh] : {std::pair{4, 4}, std::pair{6, 2}, std::pair{8, 1}}) {
        const std::vector<AttnCase> cases = {
            {1, 1000, h, kvh, d, true, 999, false},
            {3, 5003, h, kvh, d, true, 5000, true},  // splits of 256 keys over pages of 64 / 256
            {2, 4099, h, kvh, d, false, 0, true},
            {4, 300, h, kvh, d, true, -2, true},
        };
        for (const auto& c : cases) check_attention(c, AttnKernel::kDecode, rng, shift);
      }
    }
  }
  // Splits that are not a whole number of pages of 256 keys, so page boundaries fall at varying
  // places inside them (make_plan sizes splits to one wave of blocks: on a 132-SM H200, 4 kv heads
  // x 8 groups of 16 rows give 8 splits of 2432 keys).
  check_attention({16, 19000, 32, 4, 128, true, 18984, true}, AttnKernel::kDecode, rng, 8);
  // GQA 16, two tokens: 32 rows per kv head, two blocks of two 8-row tiles; pages of 64.
  check_attention({2, 3001, 32, 2, 64, true, 2999, false}, AttnKernel::kDecode, rng, 6);
  check_attention({2, 0, 4, 2, 128, false, 0, true}, AttnKernel::kDecode, rng, 6);  // empty table
}

// The launchers reject a half-given or badly sized page table before touching the device.
TEST(GpuAttention, PagedParamsValidated) {
  AttentionGpuParams p;
  float lse = 0.0f;
  __nv_bfloat16 x{};
  const __nv_bfloat16* table[1] = {&x};
  p.out = &lse;
  p.out_fp32 = true;
  p.lse = &lse;
  p.q = &x;
  p.n_q = 1;
  p.n_kv = 64;
  p.n_heads = 2;
  p.n_kv_heads = 1;
  p.head_dim = 128;
  p.k_pages = table;
  p.v_pages = table;
  const size_t ws_bytes = decode_attention_workspace_bytes(p);
  EXPECT_GT(ws_bytes, 0u);
  for (int shift : {0, 5, 31, -1}) {
    p.page_shift = shift;
    EXPECT_EQ(launch_prefill_attention(p, nullptr), cudaErrorInvalidValue) << "page_shift " << shift;
    for (AttnKernel kernel : kPrefillKernels)
      EXPECT_EQ(launch_prefill(kernel, p), cudaErrorInvalidValue) << kernel_name(kernel) << "page_shift " << shift;
    EXPECT_EQ(launch_decode_attention(p, &lse, ws_bytes, nullptr), cudaErrorInvalidValue) << "page_shift " << shift;
  }
  p.page_shift = 8;
  p.v_pages = nullptr;
  EXPECT_EQ(launch_prefill_attention(p, nullptr), cudaErrorInvalidValue);
  for (AttnKernel kernel : kPrefillKernels)
    EXPECT_EQ(launch_prefill(kernel, p), cudaErrorInvalidValue) << kernel_name(kernel);
  EXPECT_EQ(launch_decode_attention(p, &lse, ws_bytes, nullptr), cudaErrorInvalidValue);
  // The workspace depends on the shape only, paged or not.
  p.k_pages = nullptr;
  EXPECT_EQ(decode_attention_workspace_bytes(p), ws_bytes);
}

// Decode of a 0-key shard: every row empty, O = 0, LSE = -inf, H = 0 (merge never sees NaN).
TEST(GpuAttention, DecodeEmptyShard) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(3);
  check_attention({2, 0, 4, 2, 128, false, 0, true}, AttnKernel::kDecode, rng);
  for (AttnKernel kernel : kPrefillKernels) check_attention({2, 0, 4, 2, 64, false, 0, true}, kernel, rng);
}

// Shards computed by the CPU reference (one of them empty), merged on the GPU vs merge_partials_ref,
// in the all-gather form (one kernel over every shard) and the all-reduce form (terms, sum, finish).
// Pure fp32 on both sides: only exp/log rounding and order differ, 1e-5 relative to the values (|O|<=1, LSE ~ 10).
TEST(GpuAttention, MergeMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(4);
  const int n_heads = 4, n_kv_heads = 2, d = 128;
  const int64_t n_q = 5;
  const int64_t rows = n_q * n_heads;
  const std::vector<int64_t> shard_keys = {300, 0, 1, 517};
  std::vector<std::vector<float>> outs, lses, ents;
  auto q = random_bf16(n_q * n_heads * d, -1.0f, 1.0f, rng);
  for (int64_t nk : shard_keys) {
    auto k = random_bf16(std::max<int64_t>(nk, 1) * n_kv_heads * d, -1.0f, 1.0f, rng);
    auto v = random_bf16(std::max<int64_t>(nk, 1) * n_kv_heads * d, -1.0f, 1.0f, rng);
    outs.emplace_back(rows * d);
    lses.emplace_back(rows);
    ents.emplace_back(rows);
    KvSegment seg{k.host.data(), v.host.data(), nk};
    PartialAttentionParams rp;
    rp.out = outs.back().data();
    rp.lse = lses.back().data();
    rp.entropy = ents.back().data();
    rp.q = q.host.data();
    rp.kv = std::span<const KvSegment>(&seg, 1);
    rp.n_q = n_q;
    rp.n_heads = n_heads;
    rp.n_kv_heads = n_kv_heads;
    rp.head_dim = d;
    rp.scale = 3.0f / std::sqrt(static_cast<float>(d));
    rp.mask = AttentionMask{false, 0};
    partial_attention_ref(rp);
  }
  // A row empty in every shard: force it through all parts.
  for (size_t s = 0; s < shard_keys.size(); ++s) {
    lses[s][rows - 1] = kNegInf;
    ents[s][rows - 1] = 0.0f;
    for (int c = 0; c < d; ++c) outs[s][(rows - 1) * d + c] = 0.0f;
  }
  std::vector<AttentionPartial> parts;
  for (size_t s = 0; s < shard_keys.size(); ++s) parts.push_back({outs[s].data(), lses[s].data(), ents[s].data()});
  std::vector<float> o_ref(rows * d), lse_ref(rows), h_ref(rows);
  merge_partials_ref(o_ref.data(), lse_ref.data(), h_ref.data(), parts, rows, d);

  std::vector<std::unique_ptr<DeviceBuffer<float>>> keep;
  std::vector<AttentionPartialGpu> gparts;
  for (size_t s = 0; s < shard_keys.size(); ++s) {
    keep.push_back(std::make_unique<DeviceBuffer<float>>(outs[s]));
    keep.push_back(std::make_unique<DeviceBuffer<float>>(lses[s]));
    keep.push_back(std::make_unique<DeviceBuffer<float>>(ents[s]));
    gparts.push_back({keep[keep.size() - 3]->ptr, keep[keep.size() - 2]->ptr, keep.back()->ptr});
  }
  DeviceBuffer<float> o(rows * d), lse(rows), h(rows);
  ASSERT_EQ(launch_merge_partials(o.ptr, lse.ptr, h.ptr, gparts.data(), static_cast<int>(gparts.size()), rows, d,
                                  nullptr),
            cudaSuccess);
  SS_CHECK_CALL(cudaDeviceSynchronize());
  expect_close(o.get(), o_ref, 1e-5f, "O");
  expect_close(lse.get(), lse_ref, 1e-4f, "LSE");
  expect_close(h.get(), h_ref, 1e-4f, "entropy");
  const auto lse_got = lse.get();
  const auto h_got = h.get();
  EXPECT_EQ(lse_got[rows - 1], kNegInf);
  EXPECT_EQ(h_got[rows - 1], 0.0f);

  // The all-reduce form: each shard's terms on the GPU vs merge_sum_terms_ref (with and without
  // entropy), summed on the host as the all-reduce would, then the finish vs the same merged result.
  std::vector<float> max_lse(rows, kNegInf);
  for (const auto& l : lses)
    for (int64_t r = 0; r < rows; ++r) max_lse[r] = std::max(max_lse[r], l[r]);
  const int64_t width = merge_sum_width(d);
  DeviceBuffer<float> dmax(max_lse), dterms(rows * width);
  std::vector<float> sum(rows * width, 0.0f), terms_ref(rows * width);
  for (size_t s = 0; s < shard_keys.size(); ++s) {
    for (bool with_entropy : {false, true}) {
      const float* dent = with_entropy ? gparts[s].entropy : nullptr;
      ASSERT_EQ(launch_merge_sum_terms(dterms.ptr, gparts[s].out, gparts[s].lse, dent, dmax.ptr, rows, d, nullptr),
                cudaSuccess);
      SS_CHECK_CALL(cudaDeviceSynchronize());
      merge_sum_terms_ref(terms_ref.data(), outs[s].data(), lses[s].data(), with_entropy ? ents[s].data() : nullptr,
                          max_lse.data(), rows, d);
      expect_close(dterms.get(), terms_ref, 1e-5f, "sum-form terms");
    }
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += terms_ref[i];
  }
  DeviceBuffer<float> dsum(sum);
  ASSERT_EQ(launch_merge_sum_finish(o.ptr, lse.ptr, h.ptr, dsum.ptr, dmax.ptr, rows, d, nullptr), cudaSuccess);
  SS_CHECK_CALL(cudaDeviceSynchronize());
  expect_close(o.get(), o_ref, 1e-5f, "sum-form O");
  expect_close(lse.get(), lse_ref, 1e-4f, "sum-form LSE");
  expect_close(h.get(), h_ref, 1e-4f, "sum-form entropy");
  EXPECT_EQ(lse.get()[rows - 1], kNegInf);
  EXPECT_EQ(h.get()[rows - 1], 0.0f);
  EXPECT_EQ(launch_merge_sum_terms(dterms.ptr, o.ptr, lse.ptr, nullptr, dmax.ptr, rows, 0, nullptr),
            cudaErrorInvalidValue);
}

// Element-wise ops: the only rounding beyond the references is the bf16 output, |d| <= u |y|;
// 2u |y| + 1e-6 allows fp32 order/intrinsic differences.
TEST(GpuOps, RmsNormMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(5);
  for (auto [n, hidden] : {std::pair<int64_t, int>{1, 576}, {7, 4096}, {33, 8}}) {
    auto x = random_bf16(n * hidden, -3.0f, 3.0f, rng);
    auto w = random_bf16(hidden, 0.5f, 1.5f, rng);
    std::vector<float> ref(n * hidden);
    rms_norm_ref(ref.data(), x.host.data(), w.host.data(), n, hidden, 1e-5f);
    DeviceBuffer<__nv_bfloat16> dx(x.bits), dw(w.bits), dy(n * hidden);
    ASSERT_EQ(launch_rms_norm(dy.ptr, dx.ptr, dw.ptr, n, hidden, 1e-5f, nullptr), cudaSuccess);
    expect_close_rel(to_float(dy.get()), ref, 2.0f * kBf16U, "rms_norm");
  }
}

// RoPE: both sides take sin/cos of the same fp32 angle pos * inv_freq (full-range sincosf on the GPU,
// ~1e-7 apart), so the difference is the bf16 output rounding, <= u |y| with |y| <= |(x0, x1)| <= 2 sqrt 2
// for inputs in [-2, 2]. Absolute, since a rotated component can be near 0.
TEST(GpuOps, RopeMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(6);
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalf}) {
    for (auto [head_dim, rope_dim] : {std::pair{64, 64}, std::pair{128, 128}, std::pair{128, 64}}) {
      const int64_t n = 9;
      const int heads = 3;
      auto x = random_bf16(n * heads * head_dim, -2.0f, 2.0f, rng);
      std::vector<int32_t> pos(n);
      for (int64_t t = 0; t < n; ++t) pos[t] = static_cast<int32_t>(t * 15013 + 3);  // up to 120K
      std::vector<float> inv_freq(rope_dim / 2);
      for (int i = 0; i < rope_dim / 2; ++i) inv_freq[i] = std::pow(500000.0f, -2.0f * i / rope_dim);
      std::vector<float> ref = x.host;
      rope_ref(ref.data(), pos.data(), inv_freq.data(), n, heads, head_dim, rope_dim, style);
      DeviceBuffer<__nv_bfloat16> dx(x.bits);
      DeviceBuffer<int32_t> dpos(pos);
      DeviceBuffer<float> dfreq(inv_freq);
      ASSERT_EQ(launch_rope(dx.ptr, dpos.ptr, dfreq.ptr, n, heads, head_dim, rope_dim, style, nullptr), cudaSuccess);
      const auto got = to_float(dx.get());
      for (size_t i = 0; i < got.size(); ++i)
        ASSERT_NEAR(got[i], ref[i], 2.0f * kBf16U * 2.83f + 1e-5f)
            << "style " << static_cast<int>(style) << " i " << i;
    }
  }
}

TEST(GpuOps, SwigluMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(7);
  const int64_t n = 100003;
  auto g = random_bf16(n, -20.0f, 20.0f, rng);
  auto u = random_bf16(n, -4.0f, 4.0f, rng);
  std::vector<float> ref(n);
  swiglu_ref(ref.data(), g.host.data(), u.host.data(), n);
  DeviceBuffer<__nv_bfloat16> dg(g.bits), du(u.bits), dy(n);
  ASSERT_EQ(launch_swiglu(dy.ptr, dg.ptr, du.ptr, n, nullptr), cudaSuccess);
  expect_close_rel(to_float(dy.get()), ref, 2.0f * kBf16U, "swiglu");
}

// Bitwise equality of bf16 device results (the fused kernels repeat their unfused ops' arithmetic).
void expect_same_bits(const std::vector<__nv_bfloat16>& got, const std::vector<__nv_bfloat16>& want,
                      const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 5; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(__nv_bfloat16)) != 0) {
      ++bad;
      ADD_FAILURE() << what << "[" << i << "] = " << __bfloat162float(got[i]) << ", unfused "
                    << __bfloat162float(want[i]);
    }
  }
}

// The q|k|v split with RoPE: against the reference with RopeMatchesReference's tolerance (v is
// copied, so exact), and bit for bit against launch_rope on the parts split on the host.
TEST(GpuOps, SplitQkvRopeMatchesReferenceAndRope) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(8);
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalf}) {
    for (auto [head_dim, rope_dim] : {std::pair{64, 64}, std::pair{128, 128}, std::pair{128, 64}}) {
      for (int64_t n : {int64_t{1}, int64_t{7}}) {
        const int heads = 6, kv_heads = 2;
        const int64_t qd = int64_t{heads} * head_dim, kvd = int64_t{kv_heads} * head_dim, row = qd + 2 * kvd;
        auto qkv = random_bf16(n * row, -2.0f, 2.0f, rng);
        std::vector<int32_t> pos(n);
        for (int64_t t = 0; t < n; ++t) pos[t] = static_cast<int32_t>(t * 17011 + 5);
        std::vector<float> inv_freq(rope_dim / 2);
        for (int i = 0; i < rope_dim / 2; ++i) inv_freq[i] = std::pow(500000.0f, -2.0f * i / rope_dim);
        std::vector<float> q_ref(n * qd), k_ref(n * kvd), v_ref(n * kvd);
        split_qkv_rope_ref(q_ref.data(), k_ref.data(), v_ref.data(), qkv.host.data(), pos.data(), inv_freq.data(), n,
                           heads, kv_heads, head_dim, rope_dim, style);
        DeviceBuffer<__nv_bfloat16> dqkv(qkv.bits), dq(n * qd), dk(n * kvd), dv(n * kvd);
        DeviceBuffer<int32_t> dpos(pos);
        DeviceBuffer<float> dfreq(inv_freq);
        ASSERT_EQ(launch_split_qkv_rope(dq.ptr, dk.ptr, dv.ptr, dqkv.ptr, dpos.ptr, dfreq.ptr, n, heads, kv_heads,
                                        head_dim, rope_dim, style, nullptr),
                  cudaSuccess);
        const std::string what = "style " + std::to_string(static_cast<int>(style)) + " d" + std::to_string(head_dim) +
                                 " rope " + std::to_string(rope_dim) + " n" + std::to_string(n);
        expect_close(to_float(dq.get()), q_ref, 2.0f * kBf16U * 2.83f + 1e-5f, "q " + what);
        expect_close(to_float(dk.get()), k_ref, 2.0f * kBf16U * 2.83f + 1e-5f, "k " + what);
        expect_close(to_float(dv.get()), v_ref, 0.0f, "v " + what);
        // The parts split on the host, then launch_rope on q and k.
        std::vector<__nv_bfloat16> qh(n * qd), kh(n * kvd);
        for (int64_t t = 0; t < n; ++t) {
          std::copy_n(qkv.bits.begin() + t * row, qd, qh.begin() + t * qd);
          std::copy_n(qkv.bits.begin() + t * row + qd, kvd, kh.begin() + t * kvd);
        }
        DeviceBuffer<__nv_bfloat16> dq2(qh), dk2(kh);
        ASSERT_EQ(launch_rope(dq2.ptr, dpos.ptr, dfreq.ptr, n, heads, head_dim, rope_dim, style, nullptr), cudaSuccess);
        ASSERT_EQ(launch_rope(dk2.ptr, dpos.ptr, dfreq.ptr, n, kv_heads, head_dim, rope_dim, style, nullptr),
                  cudaSuccess);
        expect_same_bits(dq.get(), dq2.get(), "q vs launch_rope " + what);
        expect_same_bits(dk.get(), dk2.get(), "k vs launch_rope " + what);
      }
    }
  }
  EXPECT_EQ(launch_split_qkv_rope(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, 4, 2, 64, 96,
                                  RopeStyle::kHalf, nullptr),
            cudaErrorInvalidValue);
}

// SwiGLU over a fused gate|up row: the reference's tolerance, and bit for bit launch_swiglu on the
// halves.
TEST(GpuOps, SwigluFusedMatchesReferenceAndSwiglu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(9);
  for (auto [n, ffn] : {std::pair<int64_t, int64_t>{1, 14336}, {5, 1001}, {64, 1536}}) {
    auto gu = random_bf16(n * 2 * ffn, -20.0f, 20.0f, rng);
    std::vector<float> ref(n * ffn);
    swiglu_fused_ref(ref.data(), gu.host.data(), n, ffn);
    DeviceBuffer<__nv_bfloat16> dgu(gu.bits), dy(n * ffn);
    ASSERT_EQ(launch_swiglu_fused(dy.ptr, dgu.ptr, n, ffn, nullptr), cudaSuccess);
    expect_close_rel(to_float(dy.get()), ref, 2.0f * kBf16U, "swiglu_fused");
    std::vector<__nv_bfloat16> g(n * ffn), u(n * ffn);
    for (int64_t t = 0; t < n; ++t) {
      std::copy_n(gu.bits.begin() + t * 2 * ffn, ffn, g.begin() + t * ffn);
      std::copy_n(gu.bits.begin() + t * 2 * ffn + ffn, ffn, u.begin() + t * ffn);
    }
    DeviceBuffer<__nv_bfloat16> dg(g), du(u), dy2(n * ffn);
    ASSERT_EQ(launch_swiglu(dy2.ptr, dg.ptr, du.ptr, n * ffn, nullptr), cudaSuccess);
    expect_same_bits(dy.get(), dy2.get(), "swiglu_fused vs swiglu");
  }
}

// The residual add fused with the next norm. Against the fp32 reference: x within the bf16
// rounding of the sum (half an ulp: 2^-8 |x| with bf16's 8 significant bits, 2 kBf16U); out
// within that rounding of its input plus its own (4 kBf16U). Bit for bit against launch_add_bf16
// then launch_rms_norm.
TEST(GpuOps, AddRmsNormMatchesReferenceAndUnfused) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(10);
  for (auto [n, hidden] : {std::pair<int64_t, int>{1, 576}, {7, 4096}, {33, 8}}) {
    auto x = random_bf16(n * hidden, -3.0f, 3.0f, rng);
    auto h = random_bf16(n * hidden, -3.0f, 3.0f, rng);
    auto w = random_bf16(hidden, 0.5f, 1.5f, rng);
    std::vector<float> x_ref = x.host, out_ref(n * hidden);
    add_rms_norm_ref(out_ref.data(), x_ref.data(), h.host.data(), w.host.data(), n, hidden, 1e-5f);
    DeviceBuffer<__nv_bfloat16> dx(x.bits), dh(h.bits), dw(w.bits), dy(n * hidden);
    ASSERT_EQ(launch_add_rms_norm(dy.ptr, dx.ptr, dh.ptr, dw.ptr, n, hidden, 1e-5f, nullptr), cudaSuccess);
    expect_close_rel(to_float(dx.get()), x_ref, 2.0f * kBf16U, "add_rms_norm x");
    expect_close_rel(to_float(dy.get()), out_ref, 4.0f * kBf16U, "add_rms_norm out");
    DeviceBuffer<__nv_bfloat16> dx2(x.bits), dy2(n * hidden);
    ASSERT_EQ(launch_add_bf16(dx2.ptr, dx2.ptr, dh.ptr, n * hidden, nullptr), cudaSuccess);
    ASSERT_EQ(launch_rms_norm(dy2.ptr, dx2.ptr, dw.ptr, n, hidden, 1e-5f, nullptr), cudaSuccess);
    expect_same_bits(dx.get(), dx2.get(), "x vs launch_add_bf16");
    expect_same_bits(dy.get(), dy2.get(), "out vs launch_rms_norm");
    EXPECT_EQ(launch_add_rms_norm(dx.ptr, dx.ptr, dh.ptr, dw.ptr, n, hidden, 1e-5f, nullptr), cudaErrorInvalidValue);
  }
}

// The skinny decode GEMM against a double-precision reference. Inputs are bf16 (exact in fp32), so
// the kernel's error is its fp32 summation (each partial sum rounds with 2^-24 relative; k / 32
// terms per lane then a 32-way butterfly: 1e-6 of sum |a b| bounds it with room) plus, for bf16
// output, half an ulp (2 kBf16U |y|). Shapes cover one and eight tokens, k below one unrolled step,
// k not a multiple of the unrolled step, n not a multiple of the block's eight rows.
TEST(GpuOps, GemvMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(11);
  struct Shape {
    int64_t t, n, k;
  };
  for (const Shape sh : {Shape{1, 6144, 4096}, Shape{1, 4096, 14336}, Shape{2, 13, 8}, Shape{3, 577, 576},
                         Shape{8, 1000, 4104}, Shape{5, 49152, 576}}) {
    auto x = random_bf16(sh.t * sh.k, -2.0f, 2.0f, rng);
    auto w = random_bf16(sh.n * sh.k, -0.1f, 0.1f, rng);
    std::vector<float> ref(sh.t * sh.n), mag(sh.t * sh.n);
    matmul_ref(ref.data(), x.host.data(), w.host.data(), sh.t, sh.n, sh.k);
    std::vector<float> ax(x.host), aw(w.host);
    for (float& v : ax) v = std::fabs(v);
    for (float& v : aw) v = std::fabs(v);
    matmul_ref(mag.data(), ax.data(), aw.data(), sh.t, sh.n, sh.k);
    DeviceBuffer<__nv_bfloat16> dx(x.bits), dw(w.bits), dy(sh.t * sh.n);
    DeviceBuffer<float> dy32(sh.t * sh.n);
    ASSERT_EQ(launch_gemv(dy.ptr, false, dx.ptr, dw.ptr, sh.t, sh.n, sh.k, nullptr), cudaSuccess);
    ASSERT_EQ(launch_gemv(dy32.ptr, true, dx.ptr, dw.ptr, sh.t, sh.n, sh.k, nullptr), cudaSuccess);
    const auto got = to_float(dy.get());
    const auto got32 = dy32.get();
    int bad = 0;
    for (size_t i = 0; i < ref.size() && bad < 5; ++i) {
      const float tol32 = 1e-6f * mag[i] + 1e-7f;
      const bool ok = std::fabs(got32[i] - ref[i]) <= tol32 &&
                      std::fabs(got[i] - ref[i]) <= 2.0f * kBf16U * std::fabs(ref[i]) + tol32;
      if (!ok) {
        ++bad;
        ADD_FAILURE() << "t" << sh.t << " n" << sh.n << " k" << sh.k << " [" << i << "]: fp32 " << got32[i]
                      << ", bf16 " << got[i] << ", want " << ref[i];
      }
    }
  }
  DeviceBuffer<__nv_bfloat16> a(64), b(64), c(64);
  EXPECT_EQ(launch_gemv(c.ptr, false, a.ptr, b.ptr, 9, 1, 8, nullptr), cudaErrorInvalidValue);   // > 8 tokens
  EXPECT_EQ(launch_gemv(c.ptr, false, a.ptr, b.ptr, 1, 1, 12, nullptr), cudaErrorInvalidValue);  // k % 8
  EXPECT_EQ(launch_gemv(c.ptr, false, a.ptr + 1, b.ptr, 1, 1, 8, nullptr), cudaErrorInvalidValue);  // unaligned
}

}  // namespace
}  // namespace starserve
