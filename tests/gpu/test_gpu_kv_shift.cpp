// launch_kv_shift_rope (kernels/kv_shift.h) against kv_shift_ref / split_qkv_shift_rope_ref over
// shapes: one token, several sequences (prev rows), GQA ratios, partial rotation, both RoPE styles,
// fused (q split too) and unfused (separate raw k/v). Inputs are bf16-exact, so the kernel and the
// fp32 reference see the same values; the kernel mixes and rotates in fp32 and rounds once to bf16
// (within 2^-8 of the value: bf16 keeps 8 significant bits), and the two fp32 computations differ by a few fp32 roundings of
// products of terms below 4 in magnitude (2^-20 absolute covers them).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "gpu_test_util.h"
#include "kernels/kv_shift.h"
#include "kernels/ref/ops_ref.h"

namespace starserve {
namespace {

using namespace gpu_test;

struct Shape {
  int64_t n_tokens;
  int n_seqs, n_heads, n_kv_heads, head_dim, rope_dim;
  RopeStyle style;
};

void expect_bf16_close(const std::vector<float>& got, const std::vector<float>& want, const char* what,
                       const Shape& s) {
  ASSERT_EQ(got.size(), want.size());
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 5; ++i) {
    if (!(std::fabs(got[i] - want[i]) <= 2.0f * kBf16U * std::fabs(want[i]) + std::ldexp(1.0f, -20))) {
      ++bad;
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want " << want[i] << " (T " << s.n_tokens
                    << ", seqs " << s.n_seqs << ", kv heads " << s.n_kv_heads << ", rope " << s.rope_dim << ")";
    }
  }
}

void run(const Shape& s, bool fused) {
  std::mt19937 rng(static_cast<uint32_t>(s.n_tokens * 131 + s.n_kv_heads * 7 + s.rope_dim + fused));
  const int64_t qd = int64_t{s.n_heads} * s.head_dim, kvd = int64_t{s.n_kv_heads} * s.head_dim;
  const int64_t row = qd + 2 * kvd;
  const Bf16Data qkv = random_bf16(static_cast<size_t>(s.n_tokens * row), -2.0f, 2.0f, rng);
  const Bf16Data prev = random_bf16(static_cast<size_t>(s.n_seqs * 2 * kvd), -2.0f, 2.0f, rng);
  std::vector<float> ks(2 * s.n_kv_heads), vs(2 * s.n_kv_heads);
  std::uniform_real_distribution<float> w(-1.0f, 1.0f);
  for (auto& x : ks) x = w(rng);
  for (auto& x : vs) x = w(rng);
  // Sequences of near-equal length; each one's first token takes its prev row.
  std::vector<int32_t> idx(s.n_tokens, -1), pos(s.n_tokens);
  for (int i = 0; i < s.n_seqs; ++i) idx[static_cast<size_t>(i * s.n_tokens / s.n_seqs)] = i;
  for (int64_t t = 0; t < s.n_tokens; ++t) pos[t] = static_cast<int32_t>(1000 + 37 * t);
  std::vector<float> inv(s.rope_dim / 2);
  for (int i = 0; i < s.rope_dim / 2; ++i) inv[i] = std::pow(10000.0f, -2.0f * i / s.rope_dim);

  std::vector<float> q_ref(s.n_tokens * qd), k_ref(s.n_tokens * kvd), v_ref(s.n_tokens * kvd);
  // Unfused: raw k and v in their own buffers.
  std::vector<__nv_bfloat16> kraw_bits(s.n_tokens * kvd), vraw_bits(s.n_tokens * kvd);
  std::vector<float> kraw(s.n_tokens * kvd), vraw(s.n_tokens * kvd);
  for (int64_t t = 0; t < s.n_tokens; ++t) {
    for (int64_t j = 0; j < kvd; ++j) {
      kraw_bits[t * kvd + j] = qkv.bits[t * row + qd + j];
      vraw_bits[t * kvd + j] = qkv.bits[t * row + qd + kvd + j];
      kraw[t * kvd + j] = qkv.host[t * row + qd + j];
      vraw[t * kvd + j] = qkv.host[t * row + qd + kvd + j];
    }
  }
  if (fused) {
    split_qkv_shift_rope_ref(q_ref.data(), k_ref.data(), v_ref.data(), qkv.host.data(), prev.host.data(), idx.data(),
                             ks.data(), vs.data(), pos.data(), inv.data(), s.n_tokens, s.n_heads, s.n_kv_heads,
                             s.head_dim, s.rope_dim, s.style);
  } else {
    kv_shift_ref(k_ref.data(), v_ref.data(), kraw.data(), vraw.data(), kvd, prev.host.data(), idx.data(), ks.data(),
                 vs.data(), s.n_tokens, s.n_kv_heads, s.head_dim);
    rope_ref(k_ref.data(), pos.data(), inv.data(), s.n_tokens, s.n_kv_heads, s.head_dim, s.rope_dim, s.style);
  }

  DeviceBuffer<__nv_bfloat16> d_qkv(qkv.bits), d_prev(prev.bits), d_kraw(kraw_bits), d_vraw(vraw_bits);
  DeviceBuffer<__nv_bfloat16> d_q(static_cast<size_t>(s.n_tokens * qd)), d_k(static_cast<size_t>(s.n_tokens * kvd)),
      d_v(static_cast<size_t>(s.n_tokens * kvd));
  DeviceBuffer<int32_t> d_idx(idx), d_pos(pos);
  DeviceBuffer<float> d_ks(ks), d_vs(vs), d_inv(inv);
  KvShiftParams p;
  p.k = d_k.ptr;
  p.v = d_v.ptr;
  if (fused) {
    p.q = d_q.ptr;
    p.q_src = d_qkv.ptr;
    p.k_src = d_qkv.ptr + qd;
    p.v_src = d_qkv.ptr + qd + kvd;
    p.src_stride = row;
  } else {
    p.k_src = d_kraw.ptr;
    p.v_src = d_vraw.ptr;
    p.src_stride = kvd;
  }
  p.prev = d_prev.ptr;
  p.prev_index = d_idx.ptr;
  p.k_shift = d_ks.ptr;
  p.v_shift = d_vs.ptr;
  p.positions = d_pos.ptr;
  p.inv_freq = d_inv.ptr;
  p.n_tokens = s.n_tokens;
  p.n_heads = s.n_heads;
  p.n_kv_heads = s.n_kv_heads;
  p.head_dim = s.head_dim;
  p.rope_dim = s.rope_dim;
  p.style = s.style;
  SS_CHECK_CALL(launch_kv_shift_rope(p, nullptr));
  SS_CHECK_CALL(cudaDeviceSynchronize());
  expect_bf16_close(to_float(d_k.get()), k_ref, "k", s);
  expect_bf16_close(to_float(d_v.get()), v_ref, "v", s);
  if (fused) expect_bf16_close(to_float(d_q.get()), q_ref, "q", s);
}

const Shape kShapes[] = {
    {1, 1, 4, 4, 64, 64, RopeStyle::kHalf},           // one decode token: all from prev
    {3, 3, 8, 2, 64, 64, RopeStyle::kHalf},           // three sequences of one token each, GQA 4
    {37, 1, 4, 4, 64, 64, RopeStyle::kHalf},          // a prefill not a multiple of anything
    {50, 3, 8, 1, 128, 128, RopeStyle::kInterleaved},  // MQA, head 128, interleaved pairs
    {29, 2, 6, 2, 96, 32, RopeStyle::kHalf},          // partial rotation (Phi-style), GQA 3
    {257, 4, 32, 8, 128, 128, RopeStyle::kHalf},      // 8B shape
};

TEST(GpuKvShift, FusedSplitMatchesReference) {
  SKIP_WITHOUT_GPU();
  for (const Shape& s : kShapes) run(s, true);
}

TEST(GpuKvShift, UnfusedMatchesReference) {
  SKIP_WITHOUT_GPU();
  for (const Shape& s : kShapes) run(s, false);
}

}  // namespace
}  // namespace starserve
