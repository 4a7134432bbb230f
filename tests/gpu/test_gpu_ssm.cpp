// launch_causal_conv1d_silu / launch_ssd_scan / launch_gated_rms_norm (kernels/ssm.h) against
// causal_conv1d_silu_ref / ssd_scan_ref / gated_rms_norm_ref over batches of several sequences with
// random chunk starts (chunks of 1..16 rows, sequences already under way so the entry carry is read),
// decode batches (one row per sequence), one long chunk, fp32 and bf16 rows, inputs read as slices of
// one wider row (the in_proj output), and the same rows fed in two calls with the carry kept on the
// device (the kernels' result must equal the reference's one call).
// Tolerances: inputs are bf16-exact, so kernel and reference see the same values. The conv differs
// by a few fp32 roundings of terms of order 1 (2^-18 relative + absolute), the norm by its fp32 sum
// of squares (2^-15). The scan's
// state and y differ by fp32 roundings that grow with N (the dot) and the steps since the chunk start
// (the recurrence), each at most 2^-24 of the magnitude sum M (the same recurrence run on |x|, |B|,
// |C|, an upper bound of every partial sum); 2^-14 M covers N + steps ≤ 1024. bf16 outputs add one
// rounding, 2^-8 of the value.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "kernels/ref/ssm_ref.h"
#include "kernels/ssm.h"

namespace starserve {
namespace {

using namespace gpu_test;

struct Shape {
  std::vector<int> lengths;  // rows per sequence, in batch order
  int max_chunk;             // chunk length drawn per sequence from 1..max_chunk; 0 = no resets
  int H, Pd, G, N, W;
};

struct Batch {
  std::vector<int32_t> seq;
  std::vector<uint8_t> reset;
};

Batch make_batch(const Shape& s, std::mt19937& rng) {
  Batch b;
  for (size_t q = 0; q < s.lengths.size(); ++q) {
    const int chunk = s.max_chunk > 0 ? 1 + static_cast<int>(rng() % s.max_chunk) : 0;
    const int off = chunk > 0 ? static_cast<int>(rng() % chunk) : 1;
    for (int p = 0; p < s.lengths[q]; ++p) {
      b.seq.push_back(static_cast<int32_t>(q));
      b.reset.push_back(chunk > 0 && (p + off) % chunk == 0);
    }
  }
  return b;
}

std::vector<float> uniform(size_t n, float lo, float hi, std::mt19937& rng) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& e : v) e = d(rng);
  return v;
}

// Row data in the test's dtype: the host values (bf16-exact when dtype is bf16) and device bytes.
struct Rows {
  std::vector<float> host;
  std::vector<float> f32;
  std::vector<__nv_bfloat16> bf16;
  Rows(size_t n, float lo, float hi, SsmDtype dt, std::mt19937& rng) {
    if (dt == SsmDtype::kBf16) {
      Bf16Data d = random_bf16(n, lo, hi, rng);
      host = d.host;
      bf16 = d.bits;
    } else {
      host = uniform(n, lo, hi, rng);
      f32 = host;
    }
  }
};

// A device copy of Rows in its dtype, and downloads of outputs as float.
struct DeviceRows {
  SsmDtype dt;
  size_t n;
  DeviceBuffer<float> f;
  DeviceBuffer<__nv_bfloat16> b;
  DeviceRows(size_t count, SsmDtype dtype) : dt(dtype), n(count), f(dtype == SsmDtype::kF32 ? count : 0),
                                              b(dtype == SsmDtype::kBf16 ? count : 0) {}
  explicit DeviceRows(const Rows& r, SsmDtype dtype) : DeviceRows(r.host.size(), dtype) {
    if (dt == SsmDtype::kF32)
      SS_CHECK_CALL(cudaMemcpy(f.ptr, r.f32.data(), 4 * n, cudaMemcpyHostToDevice));
    else
      SS_CHECK_CALL(cudaMemcpy(b.ptr, r.bf16.data(), 2 * n, cudaMemcpyHostToDevice));
  }
  void* ptr() { return dt == SsmDtype::kF32 ? static_cast<void*>(f.ptr) : static_cast<void*>(b.ptr); }
  void* at(int64_t i) {
    return dt == SsmDtype::kF32 ? static_cast<void*>(f.ptr + i) : static_cast<void*>(b.ptr + i);
  }
  std::vector<float> get() const { return dt == SsmDtype::kF32 ? f.get() : to_float(b.get()); }
};

// |got - want| <= rel |want| + abs[i] (abs scalar or per element).
void expect_within(const std::vector<float>& got, const std::vector<float>& want, float rel,
                   const std::vector<float>& abs, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 5; ++i) {
    const float a = abs.size() == 1 ? abs[0] : abs[i];
    if (!(std::fabs(got[i] - want[i]) <= rel * std::fabs(want[i]) + a)) {
      ++bad;
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want " << want[i] << " (tol " << rel << " rel + "
                    << a << ")";
    }
  }
}

std::string name(const Shape& s, SsmDtype dt, int64_t split) {
  return std::string(dt == SsmDtype::kBf16 ? "bf16" : "fp32") + " seqs " + std::to_string(s.lengths.size()) +
         " H " + std::to_string(s.H) + " N " + std::to_string(s.N) + " split " + std::to_string(split);
}

SsmRows host_rows(const Batch& b) { return {b.seq, b.reset}; }

void check_conv(const Shape& s, SsmDtype dt, int64_t split) {
  std::mt19937 rng(static_cast<uint32_t>(s.lengths.size() * 977 + s.N * 13 + s.W + (dt == SsmDtype::kBf16)));
  const Batch b = make_batch(s, rng);
  const int64_t T = static_cast<int64_t>(b.seq.size()), n_seqs = static_cast<int64_t>(s.lengths.size());
  const int64_t conv_dim = int64_t{s.H} * s.Pd + 2 * s.G * s.N, stride = conv_dim + 7;
  const Rows in(static_cast<size_t>(T * stride), -2.0f, 2.0f, dt, rng);
  const auto weight = uniform(conv_dim * s.W, -0.6f, 0.6f, rng), bias = uniform(conv_dim, -0.3f, 0.3f, rng);
  const auto tail0 = uniform(static_cast<size_t>(n_seqs * (s.W - 1) * conv_dim), -2.0f, 2.0f, rng);
  std::vector<float> out_ref(T * conv_dim), tail_ref = tail0;
  causal_conv1d_silu_ref(out_ref.data(), in.host.data() + 3, stride, weight.data(), bias.data(), tail_ref.data(), T,
                         conv_dim, s.W, host_rows(b));

  DeviceRows d_in(in, dt), d_out(static_cast<size_t>(T * conv_dim), dt);
  DeviceBuffer<float> d_w(weight), d_b(bias), d_tail(tail0);
  DeviceBuffer<int32_t> d_seq(b.seq);
  DeviceBuffer<uint8_t> d_reset(b.reset);
  const int64_t cuts[] = {0, split, T};
  for (int k = 0; k < 2; ++k) {
    const int64_t r0 = cuts[k], n = cuts[k + 1] - cuts[k];
    if (n == 0) continue;
    CausalConv1dParams p;
    p.out = d_out.at(r0 * conv_dim);
    p.in = d_in.at(r0 * stride + 3);
    p.in_stride = stride;
    p.weight = d_w.ptr;
    p.bias = d_b.ptr;
    p.tail = d_tail.ptr;
    p.seq = d_seq.ptr + r0;
    p.reset = d_reset.ptr + r0;
    p.n_rows = n;
    p.conv_dim = conv_dim;
    p.width = s.W;
    p.dtype = dt;
    SS_CHECK_CALL(launch_causal_conv1d_silu(p, nullptr));
  }
  SS_CHECK_CALL(cudaDeviceSynchronize());
  const float rel = dt == SsmDtype::kBf16 ? 2 * kBf16U : std::ldexp(1.0f, -18);
  expect_within(d_out.get(), out_ref, rel, {std::ldexp(1.0f, -18)}, "conv out " + name(s, dt, split));
  // The tail holds input values (bf16-exact or fp32 copies): equal.
  expect_within(d_tail.get(), tail_ref, 0.0f, {0.0f}, "conv tail " + name(s, dt, split));
}

void check_scan(const Shape& s, SsmDtype dt, int64_t split) {
  std::mt19937 rng(static_cast<uint32_t>(s.lengths.size() * 131 + s.N * 7 + s.H + (dt == SsmDtype::kBf16)));
  const Batch b = make_batch(s, rng);
  const int64_t T = static_cast<int64_t>(b.seq.size()), n_seqs = static_cast<int64_t>(s.lengths.size());
  const int64_t d_inner = int64_t{s.H} * s.Pd, gn = int64_t{s.G} * s.N;
  // One packed row [x | B | C | dt_raw], as the conv output beside in_proj's dt columns.
  const int64_t row = d_inner + 2 * gn + s.H;
  Rows packed(static_cast<size_t>(T * row), -1.0f, 1.0f, dt, rng);
  const auto A_log = uniform(s.H, -1.0f, 1.0f, rng), D = uniform(s.H, 0.5f, 1.5f, rng);
  const auto dt_bias = uniform(s.H, -2.5f, 0.5f, rng);
  const size_t n_state = static_cast<size_t>(n_seqs * d_inner * s.N);
  const auto state0 = uniform(n_state, -1.0f, 1.0f, rng);

  std::vector<float> y_ref(T * d_inner), state_ref = state0;
  const float* h = packed.host.data();
  ssd_scan_ref(y_ref.data(), h, row, h + d_inner, h + d_inner + gn, row, h + d_inner + 2 * gn, row, A_log.data(),
               D.data(), dt_bias.data(), state_ref.data(), T, s.H, s.Pd, s.G, s.N, host_rows(b));
  // The magnitude sums: the same recurrence on |x|, |B|, |C|, |D|, |state|.
  std::vector<float> abs_packed(packed.host.size()), abs_state0(n_state), abs_D(D.size());
  for (size_t i = 0; i < abs_packed.size(); ++i) abs_packed[i] = std::fabs(packed.host[i]);
  for (int64_t t = 0; t < T; ++t)  // dt_raw keeps its sign (it only sets dt > 0)
    for (int q = 0; q < s.H; ++q) abs_packed[t * row + d_inner + 2 * gn + q] = h[t * row + d_inner + 2 * gn + q];
  for (size_t i = 0; i < n_state; ++i) abs_state0[i] = std::fabs(state0[i]);
  for (size_t i = 0; i < D.size(); ++i) abs_D[i] = std::fabs(D[i]);
  std::vector<float> y_mag(T * d_inner), state_mag = abs_state0;
  const float* a = abs_packed.data();
  ssd_scan_ref(y_mag.data(), a, row, a + d_inner, a + d_inner + gn, row, a + d_inner + 2 * gn, row, A_log.data(),
               abs_D.data(), dt_bias.data(), state_mag.data(), T, s.H, s.Pd, s.G, s.N, host_rows(b));
  for (auto& v : y_mag) v = std::ldexp(v, -14) + 1e-6f;
  for (auto& v : state_mag) v = std::ldexp(v, -14) + 1e-6f;

  DeviceRows d_packed(packed, dt), d_y(static_cast<size_t>(T * d_inner), dt);
  DeviceBuffer<float> d_A(A_log), d_D(D), d_dtb(dt_bias), d_state(state0);
  DeviceBuffer<int32_t> d_seq(b.seq);
  DeviceBuffer<uint8_t> d_reset(b.reset);
  const int64_t cuts[] = {0, split, T};
  for (int k = 0; k < 2; ++k) {
    const int64_t r0 = cuts[k], n = cuts[k + 1] - cuts[k];
    if (n == 0) continue;
    SsdScanParams p;
    p.y = d_y.at(r0 * d_inner);
    p.x = d_packed.at(r0 * row);
    p.B = d_packed.at(r0 * row + d_inner);
    p.C = d_packed.at(r0 * row + d_inner + gn);
    p.dt_raw = d_packed.at(r0 * row + d_inner + 2 * gn);
    p.x_stride = p.bc_stride = p.dt_stride = row;
    p.A_log = d_A.ptr;
    p.D = d_D.ptr;
    p.dt_bias = d_dtb.ptr;
    p.state = d_state.ptr;
    p.seq = d_seq.ptr + r0;
    p.reset = d_reset.ptr + r0;
    p.n_rows = n;
    p.H = s.H;
    p.Pd = s.Pd;
    p.G = s.G;
    p.N = s.N;
    p.dtype = dt;
    SS_CHECK_CALL(launch_ssd_scan(p, nullptr));
  }
  SS_CHECK_CALL(cudaDeviceSynchronize());
  expect_within(d_y.get(), y_ref, dt == SsmDtype::kBf16 ? 2 * kBf16U : 0.0f, y_mag, "scan y " + name(s, dt, split));
  expect_within(d_state.get(), state_ref, 0.0f, state_mag, "scan state " + name(s, dt, split));
}

void check_norm(const Shape& s, SsmDtype dt) {
  std::mt19937 rng(static_cast<uint32_t>(s.lengths.size() * 31 + s.H + (dt == SsmDtype::kBf16)));
  int64_t T = 0;
  for (int l : s.lengths) T += l;
  const int64_t d = int64_t{s.H} * s.Pd, zs = 3 * d + 5;
  const Rows y(static_cast<size_t>(T * d), -3.0f, 3.0f, dt, rng), z(static_cast<size_t>(T * zs), -4.0f, 4.0f, dt, rng);
  const auto w = uniform(d, 0.5f, 1.5f, rng);
  std::vector<float> out_ref(T * d);
  gated_rms_norm_ref(out_ref.data(), y.host.data(), z.host.data(), zs, w.data(), T, d, 1e-5f);
  DeviceRows d_y(y, dt), d_z(z, dt);
  DeviceBuffer<float> d_w(w);
  GatedRmsNormParams p;
  p.out = d_y.ptr();  // in place, as the layer uses it
  p.y = d_y.ptr();
  p.z = d_z.ptr();
  p.z_stride = zs;
  p.weight = d_w.ptr;
  p.n_rows = T;
  p.d = d;
  p.eps = 1e-5f;
  p.dtype = dt;
  SS_CHECK_CALL(launch_gated_rms_norm(p, nullptr));
  SS_CHECK_CALL(cudaDeviceSynchronize());
  // fp32: the sum of d <= 256 squares may differ by d 2^-24 relative from the reference's double sum.
  const float rel = dt == SsmDtype::kBf16 ? 2 * kBf16U : std::ldexp(1.0f, -15);
  expect_within(d_y.get(), out_ref, rel, {std::ldexp(1.0f, -18)}, "norm " + name(s, dt, 0));
}

std::vector<Shape> shapes() {
  return {
      {{1}, 8, 4, 32, 1, 64, 4},                                // one decode row
      {{37, 1, 20, 9}, 16, 4, 32, 1, 64, 4},                    // prefill, several sequences
      {{300, 129}, 8, 8, 32, 1, 128, 4},                        // the dim-512 model's SSM, chunks <= 8
      {{50, 33}, 16, 6, 12, 3, 40, 3},                          // G = 3, N not a multiple of 32, W = 3
      {{200}, 0, 2, 16, 2, 64, 4},                              // one long chunk (no resets)
      {std::vector<int>(64, 1), 16, 4, 32, 1, 64, 4},           // decode: 64 sequences, one row each
      {{5, 17, 1, 12}, 1, 4, 8, 4, 16, 2},                      // every row resets (chunk of 1), W = 2
  };
}

TEST(GpuSsm, ConvMatchesReference) {
  SKIP_WITHOUT_GPU();
  for (const Shape& s : shapes())
    for (SsmDtype dt : {SsmDtype::kF32, SsmDtype::kBf16}) {
      int64_t T = 0;
      for (int l : s.lengths) T += l;
      for (int64_t split : {int64_t{0}, T / 2, T / 3 + 1}) check_conv(s, dt, std::min(split, T));
    }
}

TEST(GpuSsm, ScanMatchesReference) {
  SKIP_WITHOUT_GPU();
  for (const Shape& s : shapes())
    for (SsmDtype dt : {SsmDtype::kF32, SsmDtype::kBf16}) {
      int64_t T = 0;
      for (int l : s.lengths) T += l;
      for (int64_t split : {int64_t{0}, T / 2, T / 3 + 1}) check_scan(s, dt, std::min(split, T));
    }
}

TEST(GpuSsm, GatedRmsNormMatchesReference) {
  SKIP_WITHOUT_GPU();
  for (const Shape& s : shapes())
    for (SsmDtype dt : {SsmDtype::kF32, SsmDtype::kBf16}) check_norm(s, dt);
}

}  // namespace
}  // namespace starserve
