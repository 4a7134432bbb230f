// The chunk-local SSM references (kernels/ref/ssm_ref.h) on hand-checkable cases: a width-4 conv on a
// known signal with a reset and a carried tail, the scalar SSD recurrence against its closed form,
// the head-to-group mapping, the gated RMS norm; then prefill = decode: one call over a batch of
// several sequences with random chunk starts equals the same rows fed in two calls or one row per
// sequence per call, with the tail and the state carried (bit for bit: the references process rows
// in order, so the same operations happen in the same order).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/ref/ssm_ref.h"

namespace starserve {
namespace {

float silu(float v) { return v / (1.0f + std::exp(-v)); }

SsmRows rows_of(const std::vector<int32_t>& seq, const std::vector<uint8_t>& reset, size_t begin = 0,
                size_t count = static_cast<size_t>(-1)) {
  if (count == static_cast<size_t>(-1)) count = seq.size() - begin;
  return {std::span<const int32_t>(seq).subspan(begin, count), std::span<const uint8_t>(reset).subspan(begin, count)};
}

// fp32 relative rounding of a handful of operations on values of order 1..10.
constexpr float kTol = 1e-5f;

TEST(SsmRef, ConvWidth4KnownSignal) {
  // One channel, weights 0.001 / 0.01 / 0.1 / 1 (tap 3 = current): the pre-activations read the
  // window as decimal digits. Input read at stride 3 (a slice of a wider row).
  const int W = 4;
  const std::vector<float> weight = {0.001f, 0.01f, 0.1f, 1.0f}, bias = {0.5f};
  const std::vector<float> signal = {1, 2, 3, 4, 5, 6};
  std::vector<float> in(signal.size() * 3, -99.0f);
  for (size_t t = 0; t < signal.size(); ++t) in[t * 3 + 1] = signal[t];
  std::vector<int32_t> seq(6, 0);
  std::vector<uint8_t> reset = {1, 0, 0, 0, 1, 0};  // chunks [1 2 3 4] and [5 6]
  std::vector<float> tail(W - 1, 7.0f);            // discarded by the reset at row 0
  std::vector<float> out(6);
  causal_conv1d_silu_ref(out.data(), in.data() + 1, 3, weight.data(), bias.data(), tail.data(), 6, 1, W,
                         rows_of(seq, reset));
  const float pre[] = {1.0f, 2.1f, 3.21f, 4.321f, 5.0f, 6.5f};
  for (int t = 0; t < 6; ++t) EXPECT_NEAR(out[t], silu(pre[t] + 0.5f), kTol) << "row " << t;
  // The tail now holds the last W-1 inputs of the current chunk [5 6], zeros before its start.
  EXPECT_EQ(tail, (std::vector<float>{0.0f, 5.0f, 6.0f}));

  // Continue the chunk in a second call: row 7 sees 5, 6 from the tail.
  std::vector<float> in2 = {7.0f};
  std::vector<int32_t> seq2 = {0};
  std::vector<uint8_t> reset2 = {0};
  float out2 = 0.0f;
  causal_conv1d_silu_ref(&out2, in2.data(), 1, weight.data(), bias.data(), tail.data(), 1, 1, W,
                         rows_of(seq2, reset2));
  EXPECT_NEAR(out2, silu(7.65f + 0.5f), kTol);
  EXPECT_EQ(tail, (std::vector<float>{5.0f, 6.0f, 7.0f}));
}

TEST(SsmRef, ConvChannelsAndSequencesAreIndependent) {
  // Two channels with different weights, two sequences each with its own tail.
  const int W = 3;
  const std::vector<float> weight = {1, 2, 3,    // channel 0
                                     -1, 0, 1};  // channel 1
  const std::vector<float> bias = {0.0f, 0.25f};
  // rows: seq 0 (x2), seq 1 (x2); row r, channel c has input r + 1 + 10 c
  std::vector<float> in = {1, 11, 2, 12, 3, 13, 4, 14};
  std::vector<int32_t> seq = {0, 0, 1, 1};
  std::vector<uint8_t> reset = {0, 0, 1, 0};
  // seq 0 continues a chunk whose last two inputs were (ch0: 0.5, 0.25; ch1: -1, -2); seq 1 restarts.
  std::vector<float> tail = {0.5f, -1.0f, 0.25f, -2.0f, 9.0f, 9.0f, 9.0f, 9.0f};
  std::vector<float> out(8);
  causal_conv1d_silu_ref(out.data(), in.data(), 2, weight.data(), bias.data(), tail.data(), 4, 2, W,
                         rows_of(seq, reset));
  const float want[] = {
      1 * 0.5f + 2 * 0.25f + 3 * 1.0f, -1 * -1.0f + 0 + 1 * 11.0f + 0.25f,  // seq 0 row 0
      1 * 0.25f + 2 * 1.0f + 3 * 2.0f, -1 * -2.0f + 0 + 1 * 12.0f + 0.25f,  // seq 0 row 1
      3 * 3.0f, 13.0f + 0.25f,                                              // seq 1 row 0 (reset)
      2 * 3.0f + 3 * 4.0f, 14.0f + 0.25f,                                   // seq 1 row 1
  };
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(out[i], silu(want[i]), kTol) << i;
  EXPECT_EQ(tail, (std::vector<float>{1, 11, 2, 12, 3, 13, 4, 14}));
}

TEST(SsmRef, ScalarSsdMatchesClosedForm) {
  // H = Pd = N = G = 1, x = B = 1, C = c, dt_raw + dt_bias = log(e - 1) so dt = 1, A = -0.5:
  // S_t = a S_{t-1} + 1 with a = e^-0.5, so from a chunk start S_t = (1 - a^(t+1)) / (1 - a), and
  // y_t = c S_t + D.
  const int T = 12;
  const float c = 0.75f, Dv = 0.3f;
  const float A_log = std::log(0.5f), dt_bias = 0.25f;
  std::vector<float> x(T, 1.0f), bc(2 * T), dt_raw(T, std::log(std::exp(1.0f) - 1.0f) - dt_bias);
  for (int t = 0; t < T; ++t) {
    bc[2 * t] = 1.0f;
    bc[2 * t + 1] = c;
  }
  std::vector<int32_t> seq(T, 0);
  std::vector<uint8_t> reset(T, 0);
  reset[0] = 1;
  reset[7] = 1;
  std::vector<float> y(T), state = {123.0f};
  ssd_scan_ref(y.data(), x.data(), 1, bc.data(), bc.data() + 1, 2, dt_raw.data(), 1, &A_log, &Dv, &dt_bias,
               state.data(), T, 1, 1, 1, 1, rows_of(seq, reset));
  const double a = std::exp(-0.5);
  for (int t = 0; t < T; ++t) {
    const int k = t < 7 ? t : t - 7;  // steps since the chunk start
    const double s = (1.0 - std::pow(a, k + 1)) / (1.0 - a);
    EXPECT_NEAR(y[t], c * s + Dv, kTol) << "row " << t;
  }
  EXPECT_NEAR(state[0], (1.0 - std::pow(a, 5)) / (1.0 - a), kTol);
}

TEST(SsmRef, SsdHeadsReadTheirGroup) {
  // H = 4, G = 2 (heads 0,1 -> group 0; 2,3 -> group 1), Pd = 2, N = 2, one row from a zero state:
  // S = dt x B, so y[h, p] = dt x[h, p] (B_g . C_g) + D_h x[h, p].
  const int H = 4, Pd = 2, G = 2, N = 2;
  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<float> Bv = {1, 2, 3, 4}, Cv = {0.5f, -1, 2, 0.25f};  // (G, N)
  const float dt_bias[H] = {0, 0, 0, 0};
  const float dt_raw[H] = {25.0f, 30.0f, 21.0f, 40.0f};  // softplus = identity above 20
  const float A_log[H] = {0, 0, 0, 0}, Dv[H] = {0.1f, 0.2f, 0.3f, 0.4f};
  std::vector<int32_t> seq = {0};
  std::vector<uint8_t> reset = {0};
  std::vector<float> state(H * Pd * N, 0.0f), y(H * Pd);
  ssd_scan_ref(y.data(), x.data(), 8, Bv.data(), Cv.data(), 4, dt_raw, 4, A_log, Dv, dt_bias, state.data(), 1, H, Pd,
               G, N, rows_of(seq, reset));
  const float bc[G] = {1 * 0.5f + 2 * -1.0f, 3 * 2.0f + 4 * 0.25f};
  for (int h = 0; h < H; ++h)
    for (int p = 0; p < Pd; ++p) {
      const float xv = x[h * Pd + p];
      EXPECT_NEAR(y[h * Pd + p], dt_raw[h] * xv * bc[h / 2] + Dv[h] * xv, 1e-5f * 40 * 8 * 7) << h << "," << p;
      for (int n = 0; n < N; ++n)
        EXPECT_NEAR(state[(h * Pd + p) * N + n], dt_raw[h] * xv * Bv[(h / 2) * N + n], 1e-5f * 40 * 8 * 4);
    }
}

TEST(SsmRef, GatedRmsNorm) {
  // A constant gate cancels in the norm: out = y / rms(y) * w.
  const std::vector<float> y = {3, 4, 1, -1}, w = {2.0f, 0.5f};
  const std::vector<float> z = {2, 2, 9, 1, -1, 9};  // stride 3
  std::vector<float> out(4);
  gated_rms_norm_ref(out.data(), y.data(), z.data(), 3, w.data(), 2, 2, 0.0f);
  EXPECT_NEAR(out[0], 3 / std::sqrt(12.5f) * 2.0f, kTol);
  EXPECT_NEAR(out[1], 4 / std::sqrt(12.5f) * 0.5f, kTol);
  const float g0 = silu(1.0f), g1 = -silu(-1.0f);
  const float r = std::sqrt((g0 * g0 + g1 * g1) / 2 + 0.0f);
  EXPECT_NEAR(out[2], g0 / r * 2.0f, kTol);
  EXPECT_NEAR(out[3], g1 / r * 0.5f, kTol);
  // eps enters under the root.
  gated_rms_norm_ref(out.data(), y.data(), z.data(), 3, w.data(), 1, 2, 0.5f);
  const float s2 = silu(2.0f);
  EXPECT_NEAR(out[0], 3 * s2 / std::sqrt(12.5f * s2 * s2 + 0.5f) * 2.0f, kTol);
}

// A random batch: sequences of the given lengths, each already under way (its first row sits at a
// random place in its chunk, so the entry carry matters unless that place is 0), chunk starts every
// `chunk` rows after.
struct Batch {
  std::vector<int32_t> seq;
  std::vector<uint8_t> reset;
};

Batch make_batch(const std::vector<int>& lengths, int chunk, std::mt19937& rng) {
  Batch b;
  for (size_t s = 0; s < lengths.size(); ++s) {
    const int off = static_cast<int>(rng() % chunk);
    for (int p = 0; p < lengths[s]; ++p) {
      b.seq.push_back(static_cast<int32_t>(s));
      b.reset.push_back((p + off) % chunk == 0);
    }
  }
  return b;
}

std::vector<float> random_vec(size_t n, float lo, float hi, std::mt19937& rng) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& e : v) e = d(rng);
  return v;
}

// The SSM block's three steps (conv over xBC, scan, gated norm) on rows [begin, begin + count) of
// one in_proj output (T, [z | xBC | dt]), carrying tail and state.
struct Block {
  int H = 4, Pd = 8, G = 2, N = 16, W = 4;
  int64_t d_inner() const { return int64_t{H} * Pd; }
  int64_t conv_dim() const { return d_inner() + 2 * G * N; }
  int64_t row() const { return d_inner() + conv_dim() + H; }
  std::vector<float> conv_w, conv_b, A_log, D, dt_bias, norm_w;

  explicit Block(std::mt19937& rng) {
    conv_w = random_vec(conv_dim() * W, -0.5f, 0.5f, rng);
    conv_b = random_vec(conv_dim(), -0.2f, 0.2f, rng);
    A_log = random_vec(H, -1.0f, 1.0f, rng);
    D = random_vec(H, 0.5f, 1.5f, rng);
    dt_bias = random_vec(H, -2.0f, 0.0f, rng);
    norm_w = random_vec(d_inner(), 0.5f, 1.5f, rng);
  }

  void run(std::vector<float>& out, const std::vector<float>& zxbcdt, std::vector<float>& tail,
           std::vector<float>& state, const Batch& b, size_t begin, size_t count) const {
    std::vector<float> xbc(count * conv_dim()), y(count * d_inner());
    const float* base = zxbcdt.data() + begin * row();
    const SsmRows rows = rows_of(b.seq, b.reset, begin, count);
    causal_conv1d_silu_ref(xbc.data(), base + d_inner(), row(), conv_w.data(), conv_b.data(), tail.data(),
                           static_cast<int64_t>(count), conv_dim(), W, rows);
    ssd_scan_ref(y.data(), xbc.data(), conv_dim(), xbc.data() + d_inner(), xbc.data() + d_inner() + G * N, conv_dim(),
                 base + d_inner() + conv_dim(), row(), A_log.data(), D.data(), dt_bias.data(), state.data(),
                 static_cast<int64_t>(count), H, Pd, G, N, rows);
    gated_rms_norm_ref(out.data() + begin * d_inner(), y.data(), base, row(), norm_w.data(),
                       static_cast<int64_t>(count), d_inner(), 1e-5f);
  }
};

TEST(SsmRef, SplitCallsEqualOneCall) {
  std::mt19937 rng(7);
  const Block blk(rng);
  const Batch b = make_batch({37, 1, 20, 9}, 8, rng);
  const size_t T = b.seq.size();
  const size_t n_seqs = 4;
  const auto zxbcdt = random_vec(T * blk.row(), -1.5f, 1.5f, rng);
  // Entry carry: nonzero, as for sequences already under way (discarded where a first row resets).
  const auto tail0 = random_vec(n_seqs * (blk.W - 1) * blk.conv_dim(), -1.0f, 1.0f, rng);
  const auto state0 = random_vec(n_seqs * blk.H * blk.Pd * blk.N, -1.0f, 1.0f, rng);

  std::vector<float> out_one(T * blk.d_inner()), tail_one = tail0, state_one = state0;
  blk.run(out_one, zxbcdt, tail_one, state_one, b, 0, T);

  // Two calls, split inside sequence 0 and inside sequence 2.
  for (size_t split : {size_t{13}, size_t{45}}) {
    std::vector<float> out(T * blk.d_inner()), tail = tail0, state = state0;
    blk.run(out, zxbcdt, tail, state, b, 0, split);
    blk.run(out, zxbcdt, tail, state, b, split, T - split);
    EXPECT_EQ(out, out_one) << "split at " << split;
    EXPECT_EQ(tail, tail_one);
    EXPECT_EQ(state, state_one);
  }
}

TEST(SsmRef, PrefillEqualsDecode) {
  // Prefill: each sequence's rows in one call. Decode: one call per step holding the next row of
  // every sequence still running (rows of a call in sequence order), as a decode batch is.
  std::mt19937 rng(11);
  const Block blk(rng);
  const std::vector<int> lengths = {5, 17, 1, 12};
  const Batch b = make_batch(lengths, 6, rng);
  const size_t T = b.seq.size(), n_seqs = lengths.size();
  const auto zxbcdt = random_vec(T * blk.row(), -1.5f, 1.5f, rng);
  const auto tail0 = random_vec(n_seqs * (blk.W - 1) * blk.conv_dim(), -1.0f, 1.0f, rng);
  const auto state0 = random_vec(n_seqs * blk.H * blk.Pd * blk.N, -1.0f, 1.0f, rng);

  std::vector<float> out_pre(T * blk.d_inner()), tail_pre = tail0, state_pre = state0;
  blk.run(out_pre, zxbcdt, tail_pre, state_pre, b, 0, T);

  std::vector<size_t> first(n_seqs);
  for (size_t s = 1; s < n_seqs; ++s) first[s] = first[s - 1] + lengths[s - 1];
  std::vector<float> out_dec(T * blk.d_inner(), 0.0f), tail = tail0, state = state0;
  for (int step = 0;; ++step) {
    Batch call;
    std::vector<float> rows_in, out_rows;
    std::vector<size_t> src;
    for (size_t s = 0; s < n_seqs; ++s) {
      if (step >= lengths[s]) continue;
      const size_t r = first[s] + step;
      src.push_back(r);
      call.seq.push_back(static_cast<int32_t>(s));
      call.reset.push_back(b.reset[r]);
      rows_in.insert(rows_in.end(), zxbcdt.begin() + r * blk.row(), zxbcdt.begin() + (r + 1) * blk.row());
    }
    if (src.empty()) break;
    out_rows.resize(src.size() * blk.d_inner());
    blk.run(out_rows, rows_in, tail, state, call, 0, src.size());
    for (size_t i = 0; i < src.size(); ++i)
      std::copy(out_rows.begin() + i * blk.d_inner(), out_rows.begin() + (i + 1) * blk.d_inner(),
                out_dec.begin() + src[i] * blk.d_inner());
  }
  EXPECT_EQ(out_dec, out_pre);
  EXPECT_EQ(tail, tail_pre);
  EXPECT_EQ(state, state_pre);
}

TEST(SsmRef, ResetForgetsTheCarry) {
  // A row that resets gives the same output whatever tail and state came before it.
  std::mt19937 rng(3);
  const Block blk(rng);
  Batch b;
  for (int p = 0; p < 6; ++p) {
    b.seq.push_back(0);
    b.reset.push_back(p == 0);
  }
  const auto zxbcdt = random_vec(6 * blk.row(), -1.5f, 1.5f, rng);
  std::vector<float> out_a(6 * blk.d_inner()), out_b(6 * blk.d_inner());
  std::vector<float> tail_a((blk.W - 1) * blk.conv_dim(), 0.0f), state_a(blk.H * blk.Pd * blk.N, 0.0f);
  auto tail_b = random_vec(tail_a.size(), -3.0f, 3.0f, rng);
  auto state_b = random_vec(state_a.size(), -3.0f, 3.0f, rng);
  blk.run(out_a, zxbcdt, tail_a, state_a, b, 0, 6);
  blk.run(out_b, zxbcdt, tail_b, state_b, b, 0, 6);
  EXPECT_EQ(out_a, out_b);
  // Without the reset the carry is used: the outputs differ.
  b.reset[0] = 0;
  tail_b = random_vec(tail_a.size(), -3.0f, 3.0f, rng);
  state_b = random_vec(state_a.size(), -3.0f, 3.0f, rng);
  blk.run(out_b, zxbcdt, tail_b, state_b, b, 0, 6);
  EXPECT_NE(out_a, out_b);
}

}  // namespace
}  // namespace starserve
