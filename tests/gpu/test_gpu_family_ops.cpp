// The ops of the model families beyond Llama on the GPU against their CPU references
// (kernels/ref/ops_ref.h): the bias add (Qwen2), GeGLU with the tanh-approximate GELU (Gemma) and
// scale / soft-cap (Gemma's embedding scale and final logit soft-capping). Inputs are bf16 on both
// sides; the GPU computes in fp32 and rounds once to bf16, so the bias add (the same fp32 sum) is
// bit-identical to the rounded reference, and GeGLU and the soft-cap (whose tanhf differs from
// std::tanh by a few fp32 ulps) are within one rounding to bf16 of it: half the spacing of 8-bit
// significands, 2^-8 of the value at the bottom of a binade (kOneRounding), plus 1e-6 absolute
// (GELU's 1 + tanh cancels for gate << 0, where both sides are below 1e-6 anyway).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/cuda_call.h"
#include "kernels/bias.h"
#include "kernels/geglu.h"
#include "kernels/ref/ops_ref.h"
#include "kernels/softcap.h"
#include "tests/gpu/gpu_test_util.h"

namespace starserve {
namespace {

using namespace gpu_test;

constexpr float kOneRounding = 2.0f * kBf16U;  // 2^-8

std::vector<float> round_bf16(const std::vector<float>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = __bfloat162float(__float2bfloat16(v[i]));
  return r;
}

TEST(GpuFamilyOps, AddBiasMatchesReferenceBitwise) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(41);
  // (rows, cols): one token, q / k / v widths of small and real models, a ragged column count.
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 64}, {7, 1024}, {300, 256}, {5, 1000}, {129, 3584}}) {
    SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(cols));
    auto x = random_bf16(rows * cols, -4.0f, 4.0f, rng);
    auto bias = random_bf16(cols, -2.0f, 2.0f, rng);
    std::vector<float> ref = x.host;
    add_bias_ref(ref.data(), bias.host.data(), rows, cols);
    DeviceBuffer<__nv_bfloat16> dx(x.bits), db(bias.bits);
    ASSERT_EQ(launch_add_bias(dx.ptr, db.ptr, rows, cols, nullptr), cudaSuccess);
    expect_close(to_float(dx.get()), round_bf16(ref), 0.0f, "add_bias");
  }
}

TEST(GpuFamilyOps, GeluTanhMulMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(42);
  for (int64_t n : {int64_t{1}, int64_t{33}, int64_t{4096}, int64_t{100003}}) {
    for (bool in_place : {false, true}) {
      SCOPED_TRACE("n " + std::to_string(n) + (in_place ? " in place" : ""));
      auto gate = random_bf16(n, -4.0f, 4.0f, rng);
      auto up = random_bf16(n, -2.0f, 2.0f, rng);
      std::vector<float> ref(n);
      gelu_tanh_mul_ref(ref.data(), gate.host.data(), up.host.data(), n);
      DeviceBuffer<__nv_bfloat16> dg(gate.bits), du(up.bits), dout(n);
      __nv_bfloat16* out = in_place ? dg.ptr : dout.ptr;
      ASSERT_EQ(launch_gelu_tanh_mul(out, dg.ptr, du.ptr, n, nullptr), cudaSuccess);
      expect_close_rel(to_float(in_place ? dg.get() : dout.get()), ref, kOneRounding, "gelu_tanh_mul");
    }
  }
}

// Scale alone (Gemma's sqrt(hidden) embedding scale), and the cap with the logit ranges it meets
// (final soft-cap 30 over logits up to ~+-60, so tanh saturates on part of them), bf16 and fp32.
TEST(GpuFamilyOps, ScaleSoftcapMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(43);
  for (auto [scale, cap] : {std::pair<float, float>{48.0f, 0.0f}, {1.0f, 30.0f}, {0.5f, 2.0f}, {1.0f, 0.0f}}) {
    for (int64_t n : {int64_t{1}, int64_t{1000}, int64_t{65537}}) {
      SCOPED_TRACE("scale " + std::to_string(scale) + " cap " + std::to_string(cap) + " n " + std::to_string(n));
      auto x = random_bf16(n, -60.0f, 60.0f, rng);
      std::vector<float> ref = x.host;
      scale_softcap_ref(ref.data(), scale, cap, n);
      DeviceBuffer<__nv_bfloat16> db(x.bits);
      ASSERT_EQ(launch_scale_softcap(db.ptr, scale, cap, n, nullptr), cudaSuccess);
      expect_close_rel(to_float(db.get()), ref, kOneRounding, "scale_softcap bf16");
      DeviceBuffer<float> df(x.host);
      ASSERT_EQ(launch_scale_softcap(df.ptr, scale, cap, n, nullptr), cudaSuccess);
      expect_close_rel(df.get(), ref, 1e-6f, "scale_softcap fp32");
    }
  }
}

TEST(GpuFamilyOps, InvalidSizesRejected) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<__nv_bfloat16> b(8);
  EXPECT_EQ(launch_add_bias(b.ptr, b.ptr, -1, 8, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_add_bias(b.ptr, nullptr, 1, 8, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_gelu_tanh_mul(b.ptr, b.ptr, b.ptr, -1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_scale_softcap(static_cast<__nv_bfloat16*>(nullptr), 1.0f, 0.0f, 8, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(launch_add_bias(b.ptr, b.ptr, 0, 8, nullptr), cudaSuccess);  // nothing to do
}

}  // namespace
}  // namespace starserve
