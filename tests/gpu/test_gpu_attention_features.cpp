// The sliding window and logit soft-capping of the CUDA attention kernels against the CPU
// reference partial_attention_ref (kernels/ref/attention_ref.h): the shipped prefill kernels
// (mma.sync; wgmma where the device and build allow), decode (one launch and batched), and the
// small-head kernel, over windows smaller than a key tile, around the tiles, and at least the
// context, with and without causality, Star phase 1's position jump ([anchor ; block]), soft-caps
// alone and with a window, contiguous and paged keys. O, LSE and the entropy are compared.
//
// Keys no query row sees under the window are NaN on both sides, from the first key up to a
// multiple of 128 keys (the largest key tile), so a kernel that loads and multiplies a tile
// wholly behind the window (instead of skipping it) turns its output into NaN, which the checks
// reject. The kernels' tiles are 64 (mma.sync) and 128 (wgmma) keys; decode drops the keys in front
// of its first query row's window (by whole pages when paged, so there the NaN keys stop at a page).
//
// Tolerances as the plain parity tests (test_gpu_kernels.cpp): O within 4u max|v| (P rounded to
// bf16 before P V, O on output, u = 2^-9), LSE and entropy within 1e-3 (fp32 sums in another
// order). Soft-capping adds no error of its own beyond a few fp32 ulps (tanhf against std::tanh,
// and d tanh <= 1, so a score's rounding is not amplified).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/cuda_call.h"
#include "kernels/attention/attention.h"
#include "kernels/baselines/prefill_baselines.h"
#include "kernels/ref/attention_ref.h"
#include "tests/gpu/gpu_test_util.h"

namespace starserve {
namespace {

using namespace gpu_test;

struct FeatureCase {
  int64_t n_q, n_kv;
  int n_heads, n_kv_heads, head_dim;
  bool causal;
  int64_t offset;  // causal_offset
  AttentionMask mask;  // window fields (causal ones are set from the two above)
  float softcap;
  bool out_fp32;
  std::vector<int32_t> key_limit = {};  // AttentionMask::key_limit (n_q) or empty
};

std::string name(const FeatureCase& c) {
  std::ostringstream os;
  os << "q" << c.n_q << " kv" << c.n_kv << " h" << c.n_heads << "/" << c.n_kv_heads << " d" << c.head_dim
     << (c.causal ? " causal+" + std::to_string(c.offset) : std::string(" full")) << " window " << c.mask.window
     << " (qpos-i " << c.mask.window_offset << ", gap " << c.mask.key_gap << " from " << c.mask.key_gap_from << ")"
     << " softcap " << c.softcap << (c.out_fp32 ? " fp32" : " bf16");
  return os.str();
}

enum class Kernel { kMma, kWgmma, kDecode, kDecodeBatch, kSmallHead };

const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::kMma: return "prefill(mma) ";
    case Kernel::kWgmma: return "prefill(wgmma) ";
    case Kernel::kDecode: return "decode ";
    case Kernel::kDecodeBatch: return "decode(batch of 2) ";
    case Kernel::kSmallHead: return "small-head ";
  }
  return "?";
}

AttentionMask full_mask(const FeatureCase& c) {
  AttentionMask m = c.mask;
  m.causal = c.causal;
  m.causal_offset = c.offset;
  return m;
}

// Keys [0, nan_keys) are seen by no query row (the lowest bound is row 0's), rounded down to 128
// keys (the largest key tile) or to a page when pages are larger (paged decode drops whole pages).
int64_t nan_keys(const FeatureCase& c, int page_shift) {
  if (c.mask.window <= 0 || c.n_kv <= 1) return 0;
  const int64_t unit = std::max<int64_t>(128, page_shift ? int64_t{1} << page_shift : 0);
  const int64_t first = std::min(full_mask(c).first_visible(0), c.n_kv - 1);
  return first / unit * unit;
}

// One case on one kernel against the reference. page_shift > 0: keys through page tables (pages
// of 2^page_shift keys in order in one pool).
void check_case(const FeatureCase& c, Kernel kernel, std::mt19937& rng, int page_shift = 0) {
  if (kernel == Kernel::kWgmma && !prefill_wgmma_supported()) {
    static bool said = false;
    if (!said) std::printf("  prefill(wgmma) not run: the device is not sm_90 or the build has no sm_90a code\n");
    said = true;
    return;
  }
  SCOPED_TRACE(std::string(kernel_name(kernel)) + name(c) +
               (page_shift ? " page_shift " + std::to_string(page_shift) : std::string()));
  const int d = c.head_dim;
  const int64_t row = static_cast<int64_t>(c.n_kv_heads) * d;
  auto q = random_bf16(c.n_q * c.n_heads * d, -1.0f, 1.0f, rng);
  auto k = random_bf16(c.n_kv * row, -1.0f, 1.0f, rng);
  auto v = random_bf16(c.n_kv * row, -1.0f, 1.0f, rng);
  const int64_t hidden = nan_keys(c, page_shift);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 0; i < hidden * row; ++i) {
    k.host[i] = v.host[i] = nan;
    k.bits[i] = v.bits[i] = __float2bfloat16(nan);
  }
  const float scale = 2.0f / std::sqrt(static_cast<float>(d));  // sharper than 1/sqrt(d)

  const int64_t rows = c.n_q * c.n_heads;
  std::vector<float> o_ref(rows * d), lse_ref(rows), h_ref(rows);
  KvSegment seg{k.host.data(), v.host.data(), c.n_kv};
  PartialAttentionParams rp;
  rp.out = o_ref.data();
  rp.lse = lse_ref.data();
  rp.entropy = h_ref.data();
  rp.q = q.host.data();
  rp.kv = {&seg, 1};
  rp.n_q = c.n_q;
  rp.n_heads = c.n_heads;
  rp.n_kv_heads = c.n_kv_heads;
  rp.head_dim = d;
  rp.scale = scale;
  rp.mask = full_mask(c);
  rp.softcap = c.softcap;
  if (!c.key_limit.empty()) rp.mask.key_limit = c.key_limit.data();
  partial_attention_ref(rp);

  // Paged: the keys in order in a pool with the last page padded by NaN (never read).
  const int64_t page = page_shift ? int64_t{1} << page_shift : 0;
  const int64_t n_pages = page ? (c.n_kv + page - 1) / page : 0;
  std::vector<__nv_bfloat16> k_pool = k.bits, v_pool = v.bits;
  if (page) {
    k_pool.resize(n_pages * page * row, __float2bfloat16(nan));
    v_pool.resize(n_pages * page * row, __float2bfloat16(nan));
  }
  DeviceBuffer<__nv_bfloat16> dq(q.bits), dk(k_pool), dv(v_pool);
  std::vector<const __nv_bfloat16*> k_table, v_table;
  for (int64_t i = 0; i < n_pages; ++i) {
    k_table.push_back(dk.ptr + i * page * row);
    v_table.push_back(dv.ptr + i * page * row);
  }
  DeviceBuffer<const __nv_bfloat16*> dk_table(k_table), dv_table(v_table);
  DeviceBuffer<float> d_of(c.out_fp32 ? rows * d : 0), d_lse(rows), d_h(rows);
  DeviceBuffer<__nv_bfloat16> d_ob(c.out_fp32 ? 0 : rows * d);
  AttentionGpuParams p;
  p.out = c.out_fp32 ? static_cast<void*>(d_of.ptr) : static_cast<void*>(d_ob.ptr);
  p.out_fp32 = c.out_fp32;
  p.lse = d_lse.ptr;
  p.entropy = d_h.ptr;
  p.q = dq.ptr;
  if (page) {
    p.k_pages = dk_table.ptr;
    p.v_pages = dv_table.ptr;
    p.page_shift = page_shift;
    p.k_pool = dk.ptr;
    p.v_pool = dv.ptr;
    p.pool_rows = n_pages * page;
  } else {
    p.k = dk.ptr;
    p.v = dv.ptr;
  }
  p.n_q = c.n_q;
  p.n_kv = c.n_kv;
  p.n_heads = c.n_heads;
  p.n_kv_heads = c.n_kv_heads;
  p.head_dim = d;
  p.scale = scale;
  p.causal = c.causal;
  p.causal_offset = c.offset;
  p.window = c.mask.window;
  p.window_offset = c.mask.window_offset;
  p.key_gap_from = c.mask.key_gap_from;
  p.key_gap = c.mask.key_gap;
  p.softcap = c.softcap;
  DeviceBuffer<int32_t> d_limit(c.key_limit);
  if (!c.key_limit.empty()) p.key_limit = d_limit.ptr;
  switch (kernel) {
    case Kernel::kMma: ASSERT_EQ(launch_prefill_attention_mma(p, nullptr), cudaSuccess); break;
    case Kernel::kWgmma: ASSERT_EQ(launch_prefill_attention_wgmma(p, nullptr), cudaSuccess); break;
    case Kernel::kSmallHead: ASSERT_EQ(launch_attention_small_head(p, nullptr), cudaSuccess); break;
    case Kernel::kDecode: {
      const size_t ws_bytes = decode_attention_workspace_bytes(p);
      ASSERT_GT(ws_bytes, 0u);
      DeviceBuffer<unsigned char> ws(ws_bytes);
      ASSERT_EQ(launch_decode_attention(p, ws.ptr, ws_bytes, nullptr), cudaSuccess);
      SS_CHECK_CALL(cudaDeviceSynchronize());
      break;
    }
    case Kernel::kDecodeBatch: {
      // The case twice in one batch, the second without the window and soft-cap writing to its own
      // outputs: each must match its own reference (the calls of a batch keep their own masks).
      DeviceBuffer<float> d_of2(c.out_fp32 ? rows * d : 0), d_lse2(rows), d_h2(rows);
      DeviceBuffer<__nv_bfloat16> d_ob2(c.out_fp32 ? 0 : rows * d);
      AttentionGpuParams plain = p;
      plain.out = c.out_fp32 ? static_cast<void*>(d_of2.ptr) : static_cast<void*>(d_ob2.ptr);
      plain.lse = d_lse2.ptr;
      plain.entropy = d_h2.ptr;
      plain.window = 0;
      plain.softcap = 0.0f;
      ASSERT_GE(decode_attention_batch_key(p), 0);
      ASSERT_EQ(decode_attention_batch_key(p), decode_attention_batch_key(plain));
      const AttentionGpuParams seqs[2] = {p, plain};
      DeviceBuffer<unsigned char> ws0(decode_attention_workspace_bytes(p)), ws1(decode_attention_workspace_bytes(plain));
      void* const wss[2] = {ws0.ptr, ws1.ptr};
      ASSERT_EQ(launch_decode_attention_batch(seqs, wss, 2, nullptr), cudaSuccess);
      SS_CHECK_CALL(cudaDeviceSynchronize());
      if (hidden == 0) {  // the plain call reads every key: only meaningful without NaN keys
        std::vector<float> o2(rows * d), lse2(rows), h2(rows);
        PartialAttentionParams rp2 = rp;
        rp2.out = o2.data();
        rp2.lse = lse2.data();
        rp2.entropy = h2.data();
        rp2.mask.window = 0;
        rp2.softcap = 0.0f;
        partial_attention_ref(rp2);
        const std::vector<float> og = c.out_fp32 ? d_of2.get() : to_float(d_ob2.get());
        expect_close(og, o2, 4.0f * kBf16U, "O (plain call of the batch)");
        expect_close(d_lse2.get(), lse2, 1e-3f, "LSE (plain call of the batch)");
        expect_close(d_h2.get(), h2, 1e-3f, "entropy (plain call of the batch)");
      }
      break;
    }
  }
  SS_CHECK_CALL(cudaDeviceSynchronize());
  const std::vector<float> o = c.out_fp32 ? d_of.get() : to_float(d_ob.get());
  expect_close(o, o_ref, 4.0f * kBf16U, "O");  // max|v| = 1
  expect_close(d_lse.get(), lse_ref, 1e-3f, "LSE");
  expect_close(d_h.get(), h_ref, 1e-3f, "entropy");
}

FeatureCase windowed(int64_t n_q, int64_t n_kv, int heads, int kv_heads, int d, int64_t window, float softcap = 0.0f,
                     bool out_fp32 = false) {
  FeatureCase c{n_q, n_kv, heads, kv_heads, d, true, n_kv - n_q, {}, softcap, out_fp32};
  c.mask.window = window;
  c.mask.window_offset = n_kv - n_q;  // queries are the last n_q of the n_kv positions
  return c;
}

// Windows below a 64-key tile (1, 7, 40), around tiles (64, 100, 128, 200), and at or beyond the
// context (no key hidden: the plain result); soft-cap alone and with a window; prefill shapes
// from a few rows to several blocks, GQA and not, both head sizes and output types.
std::vector<FeatureCase> prefill_cases() {
  std::vector<FeatureCase> cs;
  for (int64_t w : {1, 7, 40, 64, 100, 128, 200, 700, 5000}) cs.push_back(windowed(700, 700, 4, 2, 128, w));
  for (int64_t w : {7, 64, 129}) cs.push_back(windowed(300, 300, 2, 2, 64, w, 0.0f, true));
  // Queries after a cached prefix (causal offset > 0), rows not a multiple of the block.
  for (int64_t w : {16, 300}) cs.push_back(windowed(333, 1100, 8, 2, 128, w));
  for (int64_t w : {1, 64, 129}) cs.push_back(windowed(300, 2000, 4, 2, 64, w));
  // Soft-cap alone (window 0), then with windows; caps that bind (scores reach ~3).
  cs.push_back(windowed(257, 257, 4, 4, 128, 0, 1.0f));
  cs.push_back(windowed(200, 520, 4, 1, 64, 0, 0.5f, true));
  cs.push_back(windowed(400, 400, 4, 2, 128, 50, 1.5f));
  cs.push_back(windowed(129, 900, 2, 1, 64, 256, 2.0f));
  // Not causal: a context shard seen by later queries (qpos = i + 600 over keys 0..499), the window
  // hiding the start of the shard, and one hiding all of it from the first rows.
  FeatureCase nc{160, 500, 4, 2, 128, false, 0, {}, 0.0f, false};
  nc.mask.window = 300;
  nc.mask.window_offset = 600;
  cs.push_back(nc);
  nc.mask.window = 150;  // rows i < 50 see nothing (qpos - 499 >= 150)
  nc.softcap = 1.0f;
  cs.push_back(nc);
  // Star phase 1: [anchor of 128 at 0.. ; block of 256 at positions 1024..], block queries causal.
  FeatureCase star{256, 384, 4, 2, 128, true, 128, {}, 0.0f, false};
  star.mask.window = 100;
  star.mask.window_offset = 1024;
  star.mask.key_gap_from = 128;
  star.mask.key_gap = 1024 - 128;
  cs.push_back(star);
  star.mask.window = 1500;  // the anchor within reach of the first rows, not of the last
  cs.push_back(star);
  return cs;
}

TEST(GpuAttentionFeatures, PrefillWindowSoftcapMatchReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(301);
  for (const FeatureCase& c : prefill_cases()) {
    for (Kernel kernel : {Kernel::kMma, Kernel::kWgmma}) check_case(c, kernel, rng);
  }
}

TEST(GpuAttentionFeatures, PagedPrefillWindowMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(302);
  for (int shift : {6, 8}) {
    for (Kernel kernel : {Kernel::kMma, Kernel::kWgmma}) {
      check_case(windowed(600, 900, 4, 2, 128, 100, 0.0f), kernel, rng, shift);
      check_case(windowed(300, 300, 4, 2, 64, 7, 1.0f, true), kernel, rng, shift);
    }
  }
}

// Decode shapes: 1 token (MHA: the simt kernel) and GQA / several tokens (the tensor-core kernel),
// windows shorter than a split and than a page, and longer than the context.
std::vector<FeatureCase> decode_cases() {
  std::vector<FeatureCase> cs;
  for (int64_t w : {1, 5, 64, 300, 3000, 20000}) {
    cs.push_back(windowed(1, 4000, 8, 8, 128, w));
    cs.push_back(windowed(1, 4000, 8, 2, 128, w, 0.0f, true));
    cs.push_back(windowed(4, 2500, 4, 1, 64, w));
  }
  cs.push_back(windowed(1, 3000, 4, 4, 64, 0, 1.0f));
  cs.push_back(windowed(3, 3000, 8, 2, 128, 0, 0.75f, true));
  cs.push_back(windowed(2, 3000, 8, 2, 128, 500, 1.5f));
  cs.push_back(windowed(16, 1000, 2, 2, 128, 9, 2.0f));
  // Phase 2 on a shard without the query's keys: not causal, queries 2000 positions on.
  FeatureCase nc{2, 1500, 8, 2, 128, false, 0, {}, 0.0f, false};
  nc.mask.window = 1000;
  nc.mask.window_offset = 2000;
  cs.push_back(nc);
  nc.mask.window = 400;  // nothing within reach: O = 0, LSE = -inf, H = 0
  nc.softcap = 1.0f;
  cs.push_back(nc);
  return cs;
}

TEST(GpuAttentionFeatures, DecodeWindowSoftcapMatchReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(303);
  for (const FeatureCase& c : decode_cases()) check_case(c, Kernel::kDecode, rng);
  for (int shift : {6, 9}) {
    check_case(windowed(1, 4000, 8, 2, 128, 300), Kernel::kDecode, rng, shift);
    check_case(windowed(4, 2500, 4, 1, 64, 70, 1.0f), Kernel::kDecode, rng, shift);
  }
}

TEST(GpuAttentionFeatures, DecodeBatchWindowSoftcapMatchReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(304);
  check_case(windowed(1, 3000, 8, 2, 128, 100, 1.0f), Kernel::kDecodeBatch, rng);
  check_case(windowed(2, 1200, 4, 4, 64, 5000), Kernel::kDecodeBatch, rng);  // window > context: no NaN keys
  check_case(windowed(1, 1200, 4, 1, 128, 0, 1.5f), Kernel::kDecodeBatch, rng);
  check_case(windowed(1, 3000, 8, 2, 128, 200), Kernel::kDecodeBatch, rng, 6);
}

// The small-head kernel: head sizes the tensor-core kernels do not take (and 64 for comparison),
// prefill and decode shapes, window, soft-cap, star's gap, paged.
TEST(GpuAttentionFeatures, SmallHeadMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(305);
  for (int d : {16, 32, 64, 80, 256}) {
    check_case(windowed(40, 40, 4, 2, d, 0), Kernel::kSmallHead, rng);
    check_case(windowed(40, 300, 4, 2, d, 8), Kernel::kSmallHead, rng);
    check_case(windowed(1, 500, 4, 1, d, 200, 2.0f, true), Kernel::kSmallHead, rng);
    check_case(windowed(33, 33, 2, 2, d, 0, 1.0f), Kernel::kSmallHead, rng);
  }
  FeatureCase star{64, 96, 4, 2, 16, true, 32, {}, 1.0f, false};
  star.mask.window = 12;
  star.mask.window_offset = 512;
  star.mask.key_gap_from = 32;
  star.mask.key_gap = 512 - 32;
  check_case(star, Kernel::kSmallHead, rng);
  check_case(windowed(70, 400, 4, 2, 16, 8), Kernel::kSmallHead, rng, 6);
}

// Per-row key limits (Attamba's compressed keys): the small-head kernel against the reference,
// limits that rise in steps of P, 0 (an empty row), past the keys; with a window and causal bound
// too; the tensor-core and decode launchers refuse them.
TEST(GpuAttentionFeatures, SmallHeadKeyLimitsMatchReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(306);
  for (int d : {16, 64, 128}) {
    for (int P : {4, 8}) {
      FeatureCase c{100, 70, 4, 2, d, false, 0, {}, 0.0f, true};
      for (int64_t i = 0; i < c.n_q; ++i) c.key_limit.push_back(static_cast<int32_t>(i < 5 ? 0 : i / P + 3));
      c.key_limit.back() = 1000;
      check_case(c, Kernel::kSmallHead, rng);
      FeatureCase w = windowed(50, 300, 4, 1, d, 40);
      for (int64_t i = 0; i < w.n_q; ++i) w.key_limit.push_back(static_cast<int32_t>(260 + i / P * P));
      check_case(w, Kernel::kSmallHead, rng);
    }
  }
  DeviceBuffer<__nv_bfloat16> buf(64 * 64);
  DeviceBuffer<float> lse(64);
  DeviceBuffer<int32_t> limit(8);
  AttentionGpuParams p;
  p.out = buf.ptr;
  p.lse = lse.ptr;
  p.q = p.k = p.v = buf.ptr;
  p.n_q = 8;
  p.n_kv = 8;
  p.n_heads = p.n_kv_heads = 1;
  p.head_dim = 64;
  p.key_limit = limit.ptr;
  EXPECT_EQ(launch_prefill_attention_mma(p, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_prefill_attention_wgmma(p, nullptr), cudaErrorInvalidValue);
  p.n_q = 1;  // a decode shape, refused for the limits alone
  DeviceBuffer<unsigned char> ws(1 << 20);
  EXPECT_EQ(launch_decode_attention(p, ws.ptr, 1 << 20, nullptr), cudaErrorInvalidValue);
}

// The baselines take neither feature: they refuse instead of ignoring it.
TEST(GpuAttentionFeatures, BaselinesRefuseWindowAndSoftcap) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<__nv_bfloat16> buf(64 * 64);
  DeviceBuffer<float> lse(64);
  AttentionGpuParams p;
  p.out = buf.ptr;
  p.lse = lse.ptr;
  p.q = p.k = p.v = buf.ptr;
  p.n_q = 8;
  p.n_kv = 8;
  p.n_heads = p.n_kv_heads = 1;
  p.head_dim = 64;
  for (int feature = 0; feature < 2; ++feature) {
    AttentionGpuParams f = p;
    if (feature == 0) f.window = 4;
    else f.softcap = 1.0f;
    SCOPED_TRACE(feature == 0 ? "window" : "softcap");
    EXPECT_EQ(launch_prefill_attention_wmma(f, nullptr), cudaErrorNotSupported);
    EXPECT_EQ(launch_prefill_attention_mma_m64(f, nullptr), cudaErrorNotSupported);
    EXPECT_EQ(launch_prefill_attention_mma_m64_lean(f, nullptr), cudaErrorNotSupported);
    EXPECT_EQ(launch_prefill_attention_wgmma_pingpong(f, nullptr), cudaErrorNotSupported);
    EXPECT_EQ(launch_prefill_attention_wgmma_three_consumers(f, nullptr), cudaErrorNotSupported);
    EXPECT_EQ(launch_prefill_attention_wgmma_cp_async(f, nullptr), cudaErrorNotSupported);
  }
}

}  // namespace
}  // namespace starserve
