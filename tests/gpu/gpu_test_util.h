// Shared by the GPU parity tests: the GPU check, bf16 test data, a device buffer, and comparisons.
// Without a CUDA device a test calls SKIP_WITHOUT_GPU() and reports SKIPPED ("no CUDA device").
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/cuda_call.h"

namespace starserve::gpu_test {

inline constexpr float kBf16U = 1.0f / 512.0f;  // bf16 unit roundoff 2^-9
inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define SKIP_WITHOUT_GPU()                                                    \
  do {                                                                        \
    if (!::starserve::gpu_test::have_gpu()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

// Random values already rounded to bf16: `host` holds them as float for the references.
struct Bf16Data {
  std::vector<float> host;
  std::vector<__nv_bfloat16> bits;
};

inline Bf16Data random_bf16(size_t n, float lo, float hi, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(lo, hi);
  Bf16Data d;
  d.host.resize(n);
  d.bits.resize(n);
  for (size_t i = 0; i < n; ++i) {
    d.bits[i] = __float2bfloat16(dist(rng));
    d.host[i] = __bfloat162float(d.bits[i]);
  }
  return d;
}

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) { SS_CHECK_CALL(cudaMalloc(&ptr, sizeof(T) * (count ? count : 1))); }
  explicit DeviceBuffer(const std::vector<T>& v) : DeviceBuffer(v.size()) {
    SS_CHECK_CALL(cudaMemcpy(ptr, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  std::vector<T> get() const {
    std::vector<T> v(n);
    SS_CHECK_CALL(cudaMemcpy(v.data(), ptr, sizeof(T) * n, cudaMemcpyDeviceToHost));
    return v;
  }
};

inline std::vector<float> to_float(const std::vector<__nv_bfloat16>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = __bfloat162float(v[i]);
  return f;
}

// -inf must match -inf exactly; otherwise |a - b| <= tol. Reports the first few mismatches.
inline void expect_close(const std::vector<float>& got, const std::vector<float>& want, float tol,
                         const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 5; ++i) {
    const bool ok = (std::isinf(want[i]) || std::isinf(got[i])) ? got[i] == want[i]
                                                                 : std::fabs(got[i] - want[i]) <= tol;
    if (!ok || std::isnan(got[i])) {
      ++bad;
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want " << want[i] << " (tol " << tol << ")";
    }
  }
}

// |got - want| <= rel |want| + 1e-6 (the absolute term covers fp32 order/intrinsic differences near 0).
inline void expect_close_rel(const std::vector<float>& got, const std::vector<float>& want, float rel,
                             const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 5; ++i) {
    if (!(std::fabs(got[i] - want[i]) <= rel * std::fabs(want[i]) + 1e-6f)) {
      ++bad;
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want " << want[i];
    }
  }
}

}  // namespace starserve::gpu_test
