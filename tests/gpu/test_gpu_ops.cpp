// Parity of the small CUDA ops (element-wise add and conversions, embedding gather, row argmax)
// with CPU references. These ops do at most one IEEE operation per element and round once, the same
// way on both sides (fp32 round to nearest, then bf16 round to nearest even), so the checks are
// bit-exact except that any NaN matches any NaN. Without a CUDA device every test reports SKIPPED.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/argmax.h"
#include "common/cuda_call.h"
#include "kernels/elementwise.h"
#include "kernels/embedding.h"
#include "kernels/ref/ops_ref.h"
#include "tests/gpu/gpu_test_util.h"

namespace starserve {
namespace {

using namespace gpu_test;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNan = std::numeric_limits<float>::quiet_NaN();

uint16_t bits_of(__nv_bfloat16 x) { return static_cast<__nv_bfloat16_raw>(x).x; }

uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
}

// Equal bit patterns, or both NaN (the payload of a NaN is not specified by either side).
void expect_same_bf16(const std::vector<__nv_bfloat16>& got, const std::vector<__nv_bfloat16>& want,
                      const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size() && bad < 5; ++i) {
    const float g = __bfloat162float(got[i]), w = __bfloat162float(want[i]);
    if (std::isnan(g) && std::isnan(w)) continue;
    if (bits_of(got[i]) != bits_of(want[i])) {
      ++bad;
      ADD_FAILURE() << what << "[" << i << "] = " << g << " (0x" << std::hex << bits_of(got[i]) << "), want " << w
                    << " (0x" << bits_of(want[i]) << std::dec << ")";
    }
  }
}

// Offsets of 0 elements (16-byte aligned: the vector path) and 1 element (the element path).
constexpr int64_t kOffsets[] = {0, 1};

TEST(GpuOps, AddBf16MatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(21);
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{1000}, int64_t{100003}, int64_t{(1 << 20) + 5}}) {
    for (int64_t off : kOffsets) {
      for (bool in_place : {false, true}) {
        SCOPED_TRACE("n " + std::to_string(n) + " offset " + std::to_string(off) + (in_place ? " in place" : ""));
        auto a = random_bf16(n + off, -8.0f, 8.0f, rng);
        auto b = random_bf16(n + off, -8.0f, 8.0f, rng);
        std::vector<float> ref(n);
        add_ref(ref.data(), a.host.data() + off, b.host.data() + off, n);
        std::vector<__nv_bfloat16> want(n);
        for (int64_t i = 0; i < n; ++i) want[i] = __float2bfloat16(ref[i]);
        DeviceBuffer<__nv_bfloat16> da(a.bits), db(b.bits), dout(n + off);
        __nv_bfloat16* out = in_place ? da.ptr + off : dout.ptr + off;
        ASSERT_EQ(launch_add_bf16(out, da.ptr + off, db.ptr + off, n, nullptr), cudaSuccess);
        const auto got_all = in_place ? da.get() : dout.get();
        expect_same_bf16(std::vector<__nv_bfloat16>(got_all.begin() + off, got_all.end()), want, "add");
      }
    }
  }
}

// Every rounding regime: random magnitudes over the whole fp32 range, ties (round to even),
// subnormals, values that round up to inf, signed zeros, inf, NaN.
TEST(GpuOps, F32ToBf16MatchesHostRounding) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(22);
  std::vector<float> src = {0.0f, -0.0f, kInf, -kInf, kNan, -kNan, 1e-40f, -1e-45f,
                            std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::min(), 3.3961775e38f /* rounds up to inf */};
  for (uint32_t tie : {0x3F808000u, 0x3F818000u, 0xC0008000u, 0x00018000u, 0x7F7F8000u}) {
    float f;
    std::memcpy(&f, &tie, sizeof(f));
    src.push_back(f);
  }
  std::uniform_int_distribution<uint32_t> any_bits;
  while (src.size() < 100011) {
    const uint32_t b = any_bits(rng);
    float f;
    std::memcpy(&f, &b, sizeof(f));
    src.push_back(f);
  }
  for (int64_t off : kOffsets) {
    const int64_t n = static_cast<int64_t>(src.size()) - off;
    std::vector<__nv_bfloat16> want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = __float2bfloat16_rn(src[off + i]);
    DeviceBuffer<float> dsrc(src);
    DeviceBuffer<__nv_bfloat16> ddst(n + off);
    ASSERT_EQ(launch_f32_to_bf16(ddst.ptr + off, dsrc.ptr + off, n, nullptr), cudaSuccess);
    const auto got_all = ddst.get();
    expect_same_bf16(std::vector<__nv_bfloat16>(got_all.begin() + off, got_all.end()), want,
                     "f32_to_bf16 offset " + std::to_string(off));
  }
}

// Exhaustive: all 2^16 bf16 patterns (plus a tail that is not a multiple of the vector); a bf16 is
// the upper half of the fp32 with the same value.
TEST(GpuOps, Bf16ToF32IsExact) {
  SKIP_WITHOUT_GPU();
  std::vector<__nv_bfloat16> src;
  for (uint32_t b = 0; b < 65536 + 13; ++b) {
    __nv_bfloat16_raw raw;
    raw.x = static_cast<uint16_t>(b & 0xffff);
    src.push_back(__nv_bfloat16(raw));
  }
  for (int64_t off : kOffsets) {
    const int64_t n = static_cast<int64_t>(src.size()) - off;
    DeviceBuffer<__nv_bfloat16> dsrc(src);
    DeviceBuffer<float> ddst(n + off);
    ASSERT_EQ(launch_bf16_to_f32(ddst.ptr + off, dsrc.ptr + off, n, nullptr), cudaSuccess);
    const auto got = ddst.get();
    int bad = 0;
    for (int64_t i = 0; i < n && bad < 5; ++i) {
      const uint32_t want = static_cast<uint32_t>(bits_of(src[off + i])) << 16;
      const bool ok = std::isnan(got[off + i]) ? std::isnan(__bfloat162float(src[off + i]))
                                               : bits_of(got[off + i]) == want;
      if (!ok) {
        ++bad;
        ADD_FAILURE() << "bf16_to_f32 offset " << off << " [" << i << "]: 0x" << std::hex << bits_of(got[off + i])
                      << ", want 0x" << want << std::dec;
      }
    }
  }
}

// Scattered rows against a memcpy per row: whole 16-byte rows (the vector path) and rows of odd
// sizes and offsets (the byte path), rows skipped by a null destination left untouched, more rows
// than the grid has blocks.
TEST(GpuOps, ScatterRowsMatchesRowCopies) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(7);
  for (const auto& [n_rows, row_bytes, shift] : {std::tuple<int64_t, int64_t, int64_t>{5, 384, 0},
                                              {3000, 64, 0}, {7, 100, 3}, {1, 2048, 0}}) {
    std::vector<uint8_t> src(static_cast<size_t>(n_rows * row_bytes));
    for (uint8_t& b : src) b = static_cast<uint8_t>(rng());
    const int64_t dst_bytes = 2 * n_rows * row_bytes + shift;
    std::vector<uint8_t> before(static_cast<size_t>(dst_bytes));
    for (uint8_t& b : before) b = static_cast<uint8_t>(rng());
    DeviceBuffer<uint8_t> dsrc(src), ddst(before);
    // Row r goes to slot (r * 7919) % (2 n_rows), every third row nowhere.
    std::vector<void*> table(static_cast<size_t>(n_rows));
    std::vector<uint8_t> want = before;
    for (int64_t r = 0; r < n_rows; ++r) {
      if (r % 3 == 2) continue;
      const int64_t at = shift + ((r * 7919) % (2 * n_rows)) * row_bytes;
      table[r] = ddst.ptr + at;
      std::memcpy(want.data() + at, src.data() + r * row_bytes, static_cast<size_t>(row_bytes));
    }
    // Distinct slots: 7919 is prime and larger than any 2 n_rows here.
    DeviceBuffer<void*> dtable(table);
    ASSERT_EQ(launch_scatter_rows(dtable.ptr, dsrc.ptr, n_rows, row_bytes, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(ddst.get(), want) << n_rows << " rows of " << row_bytes << " bytes, shift " << shift;
  }
  EXPECT_EQ(launch_scatter_rows(nullptr, nullptr, -1, 16, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_scatter_rows(nullptr, nullptr, 0, 16, nullptr), cudaSuccess);
}

TEST(GpuOps, EmbeddingMatchesReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(23);
  const int n_vocab = 1000;
  for (int hidden : {576, 4096, 100}) {  // 100: not a multiple of 8 (element path)
    auto table = random_bf16(static_cast<size_t>(n_vocab) * hidden, -1.0f, 1.0f, rng);
    for (int64_t n_tokens : {int64_t{1}, int64_t{37}}) {
      SCOPED_TRACE("hidden " + std::to_string(hidden) + " n_tokens " + std::to_string(n_tokens));
      std::uniform_int_distribution<int32_t> id(0, n_vocab - 1);
      std::vector<int32_t> ids(n_tokens);
      for (auto& t : ids) t = id(rng);
      ids[0] = n_vocab - 1;  // the last row of the table
      if (n_tokens > 2) {
        ids[1] = 0;
        ids[2] = ids[1];  // repeats
      }
      std::vector<float> ref(n_tokens * hidden);
      embedding_ref(ref.data(), table.host.data(), ids.data(), n_tokens, hidden);
      std::vector<__nv_bfloat16> want(ref.size());
      for (size_t i = 0; i < ref.size(); ++i) want[i] = __float2bfloat16(ref[i]);  // exact: ref holds bf16 values
      DeviceBuffer<__nv_bfloat16> dtable(table.bits), dout(n_tokens * hidden);
      DeviceBuffer<int32_t> dids(ids);
      ASSERT_EQ(launch_embedding_bf16(dout.ptr, dtable.ptr, dids.ptr, n_tokens, hidden, nullptr), cudaSuccess);
      expect_same_bf16(dout.get(), want, "embedding");
    }
  }
}

// The CPU greedy pick of Sampler::sample (src/engine/sampling.cpp): a serial scan with a strict '>'
// from -inf, so ties keep the lowest index, NaN never wins, and a row with nothing above -inf gives 0.
void argmax_rows_ref(int32_t* out, const float* logits, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float best = -kInf;
    int32_t arg = 0;
    for (int64_t i = 0; i < cols; ++i) {
      const float x = logits[r * cols + i];
      if (x > best) {
        best = x;
        arg = static_cast<int32_t>(i);
      }
    }
    out[r] = arg;
  }
}

// Rows of one matrix, each a scenario: random; the maximum repeated at spots that different threads
// and vector lanes scan (lowest must win); NaN at the front, around and in place of the maximum;
// all -inf; all NaN; NaN then -inf; +inf twice; a single finite value among -inf.
std::vector<float> argmax_rows_data(int64_t cols, std::mt19937& rng, int64_t* rows_out) {
  std::uniform_real_distribution<float> dist(-30.0f, 30.0f);
  std::vector<std::vector<float>> rows;
  auto random_row = [&] {
    std::vector<float> r(cols);
    for (auto& x : r) x = dist(rng);
    return r;
  };
  auto at = [&](int64_t i) { return std::clamp<int64_t>(i, 0, cols - 1); };  // spots that exist in short rows
  for (int k = 0; k < 3; ++k) rows.push_back(random_row());
  {
    auto r = random_row();
    for (int64_t i : {cols - 1, at(cols / 2 + 1), at(4 * 1024 + 3), at(1025), at(33), at(6), at(5)}) r[i] = 100.0f;
    rows.push_back(r);
  }
  {
    auto r = random_row();
    r[0] = kNan;
    r[at(cols / 3)] = 50.0f;
    r[at(cols / 3 + 1)] = kNan;
    r[cols - 1] = kNan;
    rows.push_back(r);
  }
  {
    auto r = random_row();  // the NaN sits where a maximum would be
    for (int64_t i = 0; i < cols; i += 7) r[i] = kNan;
    rows.push_back(r);
  }
  rows.push_back(std::vector<float>(cols, -kInf));
  rows.push_back(std::vector<float>(cols, kNan));
  {
    std::vector<float> r(cols, -kInf);
    r[0] = kNan;
    rows.push_back(r);
  }
  {
    auto r = random_row();
    r[at(cols - 2)] = kInf;
    r[at(cols / 2)] = kInf;
    rows.push_back(r);
  }
  {
    std::vector<float> r(cols, -kInf);
    r[at(cols * 2 / 3)] = -1e30f;
    rows.push_back(r);
  }
  std::vector<float> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  *rows_out = static_cast<int64_t>(rows.size());
  return flat;
}

TEST(GpuOps, ArgmaxRowsMatchesGreedySampler) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(24);
  // 128256 / 151936: Llama 3 / Qwen 2 vocabularies; 1 and 3: fewer columns than threads or a vector.
  for (int64_t cols : {int64_t{1}, int64_t{3}, int64_t{1000}, int64_t{4099}, int64_t{128256}, int64_t{151936}}) {
    for (int64_t off : kOffsets) {
      SCOPED_TRACE("cols " + std::to_string(cols) + " offset " + std::to_string(off));
      int64_t rows = 0;
      std::vector<float> logits = argmax_rows_data(cols, rng, &rows);
      std::vector<int32_t> want(rows);
      argmax_rows_ref(want.data(), logits.data(), rows, cols);
      logits.insert(logits.begin(), off, 0.0f);
      DeviceBuffer<float> dlogits(logits);
      DeviceBuffer<int32_t> dout(rows);
      ASSERT_EQ(launch_argmax_rows(dout.ptr, dlogits.ptr + off, rows, cols, nullptr), cudaSuccess);
      const auto got = dout.get();
      for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(got[r], want[r]) << "row " << r;
    }
  }
}

// Shapes the launchers cannot run are refused before any device work.
TEST(GpuOps, SmallOpsValidateArguments) {
  float f = 0.0f;
  __nv_bfloat16 h{};
  int32_t i = 0;
  EXPECT_EQ(launch_add_bf16(&h, &h, &h, -1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_add_bf16(&h, &h, &h, 0, nullptr), cudaSuccess);
  EXPECT_EQ(launch_f32_to_bf16(&h, &f, -1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_bf16_to_f32(&f, &h, -1, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_embedding_bf16(&h, &h, &i, 1, 0, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_embedding_bf16(&h, &h, &i, 0, 8, nullptr), cudaSuccess);
  EXPECT_EQ(launch_argmax_rows(&i, &f, 1, 0, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_argmax_rows(&i, &f, 1, int64_t{1} << 31, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_argmax_rows(&i, &f, 0, 10, nullptr), cudaSuccess);
}

}  // namespace
}  // namespace starserve
