// GPT-2's ops on the GPU against their CPU references (kernels/ref/ops_ref.h): LayerNorm with
// weight and bias (kernels/layer_norm.h) and the plain tanh-approximate GELU (kernels/geglu.h).
// Inputs are bf16 on both sides; the GPU computes in fp32 and rounds once to bf16, the reference in
// double / fp32 without rounding. So each output is within one rounding to bf16 of the reference
// (2^-8 of the value at the bottom of a binade, kOneRounding) plus, for LayerNorm, what fp32
// statistics add: a sum of `hidden` terms in fp32 (per thread hidden / 256 sequential adds, then a
// 5 + 3 level tree) is off by at most about (hidden / 256 + 8) * 2^-24 of the sum of |x|, which the
// normalisation scales by 1 / std and the affine by |weight| (stat_tolerance). For GELU the
// tanhf / std::tanh difference of a few fp32 ulps adds 1e-6 absolute (as for GeGLU). The LN-free
// variant's temperature (kernels/head_temperature.h) divides in fp32 like the reference: fp32 data
// equal to the bit, bf16 data within one rounding of the reference's fp32 quotient.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/cuda_call.h"
#include "kernels/geglu.h"
#include "kernels/head_temperature.h"
#include "kernels/layer_norm.h"
#include "kernels/ref/ops_ref.h"
#include "tests/gpu/gpu_test_util.h"

namespace starserve {
namespace {

using namespace gpu_test;

constexpr float kOneRounding = 2.0f * kBf16U;  // 2^-8
constexpr float kF32U = 1.0f / 16777216.0f;    // 2^-24

// The fp32 statistics' error bound of one row (see the file comment), with a factor 4 of room.
float stat_tolerance(const float* x, const float* w, int hidden) {
  double sum = 0.0, abs_sum = 0.0;
  for (int c = 0; c < hidden; ++c) {
    sum += x[c];
    abs_sum += std::fabs(x[c]);
  }
  const double mean = sum / hidden;
  double ss = 0.0;
  for (int c = 0; c < hidden; ++c) ss += (x[c] - mean) * (x[c] - mean);
  const double std_dev = std::sqrt(ss / hidden + 1e-5);
  float max_w = 0.0f;
  for (int c = 0; c < hidden; ++c) max_w = std::max(max_w, std::fabs(w[c]));
  const double steps = hidden / 256.0 + 8.0;
  return static_cast<float>(4.0 * steps * kF32U * (abs_sum / hidden) / std_dev * max_w);
}

void check_layer_norm(int64_t rows, int hidden, float lo, float hi, bool in_place, std::mt19937& rng) {
  SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(hidden) + " in [" + std::to_string(lo) + ", " +
               std::to_string(hi) + "]" + (in_place ? " in place" : ""));
  const float eps = 1e-5f;
  auto x = random_bf16(rows * hidden, lo, hi, rng);
  auto w = random_bf16(hidden, -2.0f, 2.0f, rng);
  auto b = random_bf16(hidden, -1.0f, 1.0f, rng);
  std::vector<float> ref(rows * hidden);
  layer_norm_ref(ref.data(), x.host.data(), w.host.data(), b.host.data(), rows, hidden, eps);
  DeviceBuffer<__nv_bfloat16> dx(x.bits), dw(w.bits), db(b.bits), dout(rows * hidden);
  __nv_bfloat16* out = in_place ? dx.ptr : dout.ptr;
  ASSERT_EQ(launch_layer_norm(out, dx.ptr, dw.ptr, db.ptr, rows, hidden, eps, nullptr), cudaSuccess);
  const std::vector<float> got = to_float(in_place ? dx.get() : dout.get());
  int bad = 0;
  for (int64_t r = 0; r < rows && bad < 5; ++r) {
    const float stat = stat_tolerance(x.host.data() + r * hidden, w.host.data(), hidden);
    for (int c = 0; c < hidden && bad < 5; ++c) {
      const int64_t i = r * hidden + c;
      const float tol = kOneRounding * std::fabs(ref[i]) + stat;
      if (!(std::fabs(got[i] - ref[i]) <= tol)) {
        ++bad;
        ADD_FAILURE() << "layer_norm[" << r << ", " << c << "] = " << got[i] << ", want " << ref[i] << " (tol " << tol
                      << ")";
      }
    }
  }
}

TEST(GpuGpt2Ops, LayerNormMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(71);
  // One token; GPT-2's widths (768, 1024); sizes not a multiple of the block or of 8; a wide row.
  for (auto [rows, hidden] : {std::pair<int64_t, int>{1, 64}, {7, 768}, {300, 1024}, {5, 1000}, {3, 17}, {129, 4096}}) {
    for (bool in_place : {false, true}) check_layer_norm(rows, hidden, -4.0f, 4.0f, in_place, rng);
  }
  // A large mean against a small spread (residual streams drift): the two-pass variance keeps it.
  check_layer_norm(9, 768, 96.0f, 104.0f, false, rng);
  // A constant row: variance 0, the output is the bias (inv = 1 / sqrt(eps) times exact zeros).
  std::vector<__nv_bfloat16> flat(64, __float2bfloat16(3.0f));
  auto w = random_bf16(64, -2.0f, 2.0f, rng);
  auto b = random_bf16(64, -1.0f, 1.0f, rng);
  DeviceBuffer<__nv_bfloat16> dx(flat), dw(w.bits), db(b.bits), dout(64);
  ASSERT_EQ(launch_layer_norm(dout.ptr, dx.ptr, dw.ptr, db.ptr, 1, 64, 1e-5f, nullptr), cudaSuccess);
  expect_close(to_float(dout.get()), b.host, 0.0f, "layer_norm of a constant row");
}

TEST(GpuGpt2Ops, GeluTanhMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(72);
  for (int64_t n : {int64_t{1}, int64_t{33}, int64_t{4096}, int64_t{100003}}) {
    for (bool in_place : {false, true}) {
      SCOPED_TRACE("n " + std::to_string(n) + (in_place ? " in place" : ""));
      auto x = random_bf16(n, -6.0f, 6.0f, rng);
      std::vector<float> ref(n);
      gelu_tanh_ref(ref.data(), x.host.data(), n);
      DeviceBuffer<__nv_bfloat16> dx(x.bits), dout(n);
      __nv_bfloat16* out = in_place ? dx.ptr : dout.ptr;
      ASSERT_EQ(launch_gelu_tanh(out, dx.ptr, n, nullptr), cudaSuccess);
      expect_close_rel(to_float(in_place ? dx.get() : dout.get()), ref, kOneRounding, "gelu_tanh");
    }
  }
}

// x[i, h, :] /= t[h, pos_i] against head_temperature_ref: fp32 in place bit for bit, bf16 within one
// rounding; positions out of order and repeated (decode batches), GPT-2's head sizes and odd ones.
void check_head_temperature(int64_t n_tokens, int n_heads, int head_dim, int64_t n_positions, std::mt19937& rng) {
  SCOPED_TRACE(std::to_string(n_tokens) + " tokens x " + std::to_string(n_heads) + " heads x " +
               std::to_string(head_dim) + ", " + std::to_string(n_positions) + " positions");
  const int64_t n = n_tokens * n_heads * head_dim;
  auto x = random_bf16(n, -3.0f, 3.0f, rng);
  std::uniform_real_distribution<float> tdist(0.25f, 2.5f);
  std::vector<float> t(static_cast<size_t>(n_heads) * n_positions);
  for (float& v : t) v = tdist(rng);
  std::uniform_int_distribution<int32_t> pdist(0, static_cast<int32_t>(n_positions - 1));
  std::vector<int32_t> pos(n_tokens);
  for (int32_t& p : pos) p = pdist(rng);
  std::vector<float> ref = x.host;
  head_temperature_ref(ref.data(), t.data(), pos.data(), n_tokens, n_heads, head_dim, n_positions);
  DeviceBuffer<float> dt(t), dx32(x.host);
  DeviceBuffer<int32_t> dpos(pos);
  DeviceBuffer<__nv_bfloat16> dx(x.bits);
  ASSERT_EQ(launch_head_temperature(dx32.ptr, dt.ptr, dpos.ptr, n_tokens, n_heads, head_dim, n_positions, nullptr),
            cudaSuccess);
  ASSERT_EQ(launch_head_temperature(dx.ptr, dt.ptr, dpos.ptr, n_tokens, n_heads, head_dim, n_positions, nullptr),
            cudaSuccess);
  expect_close(dx32.get(), ref, 0.0f, "head_temperature fp32");
  expect_close_rel(to_float(dx.get()), ref, kOneRounding, "head_temperature bf16");
}

TEST(GpuGpt2Ops, HeadTemperatureMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(73);
  check_head_temperature(1, 4, 16, 64, rng);      // one decode row, tests/golden/lnfree's heads
  check_head_temperature(127, 4, 64, 128, rng);   // the trained models' prefill
  check_head_temperature(300, 12, 64, 1024, rng);  // GPT-2 small
  check_head_temperature(9, 3, 7, 5, rng);         // odd sizes, a row narrower than a warp
  check_head_temperature(2, 40, 128, 33, rng);     // a row wider than the block
  DeviceBuffer<__nv_bfloat16> b(8);
  DeviceBuffer<float> t(8);
  DeviceBuffer<int32_t> p(2);
  EXPECT_EQ(launch_head_temperature(b.ptr, t.ptr, p.ptr, 1, 0, 8, 1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_head_temperature(b.ptr, nullptr, p.ptr, 1, 1, 8, 1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_head_temperature(b.ptr, t.ptr, p.ptr, 0, 1, 8, 1, nullptr), cudaSuccess);  // nothing to do
}

TEST(GpuGpt2Ops, InvalidSizesRejected) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<__nv_bfloat16> b(8);
  EXPECT_EQ(launch_layer_norm(b.ptr, b.ptr, b.ptr, b.ptr, 1, 0, 1e-5f, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_layer_norm(b.ptr, b.ptr, b.ptr, b.ptr, -1, 8, 1e-5f, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_layer_norm(b.ptr, b.ptr, b.ptr, nullptr, 1, 8, 1e-5f, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_gelu_tanh(b.ptr, nullptr, 8, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_gelu_tanh(b.ptr, b.ptr, -1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_layer_norm(b.ptr, b.ptr, b.ptr, b.ptr, 0, 8, 1e-5f, nullptr), cudaSuccess);  // nothing to do
  EXPECT_EQ(launch_gelu_tanh(b.ptr, b.ptr, 0, nullptr), cudaSuccess);
}

}  // namespace
}  // namespace starserve
