// Parity of the GPU sampler (kernels/sampling.cu) with the host Sampler (src/engine/sampling.h),
// the reference: the same raw logits, penalty entries, parameters and u must give the same token
// and bit-identical penalised logits. Tokens may differ only where the independent oracle
// (tests/unit/sampling_oracle.h) finds u * total or the top-p target within double rounding of a
// cumulative sum, since the two sides sum the same float weights in different orders; those cases
// are counted and must be rare. Without a CUDA device every test that launches reports SKIPPED.
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

#include <cuda_runtime.h>

#include "engine/sampling.h"
#include "common/cuda_call.h"
#include "kernels/sampling.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/unit/sampling_oracle.h"

namespace starserve {
namespace {

using namespace gpu_test;
using sampling_test::SamplingCase;

SampleRowParams row_params(const SamplingParams& s, int n_vocab, double u, int32_t begin, int32_t count) {
  SampleRowParams p{};
  p.u = u;
  p.temperature = s.temperature;
  p.top_p = s.top_p;
  p.min_p = s.min_p;
  p.repetition_penalty = s.repetition_penalty;
  p.frequency_penalty = s.frequency_penalty;
  p.presence_penalty = s.presence_penalty;
  p.top_k = s.top_k;
  p.n_vocab = n_vocab;
  p.penalty_begin = begin;
  p.penalty_count = count;
  return p;
}

// Rows of one launch, (rows, ld) with ld >= n_vocab, and what the host says about each.
struct Batch {
  int64_t ld = 0;
  std::vector<float> logits;     // (rows, ld) raw
  std::vector<float> penalised;  // (rows, ld) the host's penalised logits (padding untouched)
  std::vector<SampleRowParams> params;
  std::vector<int32_t> penalty_tokens, penalty_counts;
  std::vector<int32_t> want;     // the host Sampler's token; -1 where it would abort
  std::vector<bool> ambiguous;
  std::vector<std::string> what;

  void add(const SamplingCase& c) {
    const int n_vocab = static_cast<int>(c.logits.size());
    Sampler sampler(c.params, n_vocab);
    std::vector<int32_t> tokens, counts;
    sampler.penalty_entries(c.prompt, c.generated, &tokens, &counts);
    std::vector<float> pen = c.logits;
    apply_penalty_entries(c.params, pen, tokens, counts);
    params.push_back(row_params(c.params, n_vocab, c.u, static_cast<int32_t>(penalty_tokens.size()),
                                static_cast<int32_t>(tokens.size())));
    penalty_tokens.insert(penalty_tokens.end(), tokens.begin(), tokens.end());
    penalty_counts.insert(penalty_counts.end(), counts.begin(), counts.end());
    const size_t at = logits.size();
    logits.resize(at + ld, 0.5f);
    penalised.resize(at + ld, 0.5f);
    std::copy(c.logits.begin(), c.logits.end(), logits.begin() + at);
    std::copy(pen.begin(), pen.end(), penalised.begin() + at);
    const sampling_test::OracleResult oracle = sampling_test::sampling_oracle(pen, c.params, c.u);
    want.push_back(sampler.choose(pen, c.u));
    ambiguous.push_back(oracle.ambiguous);
    // The reference itself against the oracle (the unit tests check this on more cases).
    EXPECT_TRUE(oracle.ambiguous || oracle.token == want.back()) << "host " << want.back() << " oracle " << oracle.token;
    what.push_back("n_vocab " + std::to_string(n_vocab) + " T " + std::to_string(c.params.temperature) + " top_k " +
                   std::to_string(c.params.top_k) + " top_p " + std::to_string(c.params.top_p) + " min_p " +
                   std::to_string(c.params.min_p) + " rep " + std::to_string(c.params.repetition_penalty) +
                   " entries " + std::to_string(tokens.size()) + " u " + std::to_string(c.u));
  }

  // A row the host would refuse (NaN, no finite logit): the kernel answers -1, logits as given.
  void add_refused(const std::vector<float>& row) {
    params.push_back(row_params(SamplingParams{}, static_cast<int>(row.size()), 0.5, 0, 0));
    const size_t at = logits.size();
    logits.resize(at + ld, 0.5f);
    penalised.resize(at + ld, 0.5f);
    std::copy(row.begin(), row.end(), logits.begin() + at);
    std::copy(row.begin(), row.end(), penalised.begin() + at);
    want.push_back(-1);
    ambiguous.push_back(false);
    what.push_back("refused row");
  }

  int64_t rows() const { return static_cast<int64_t>(params.size()); }
};

// Launches the batch; checks tokens and logits; returns the number of ambiguous rows.
int run_and_check(const Batch& b) {
  DeviceBuffer<float> dlogits(b.logits);
  DeviceBuffer<SampleRowParams> dparams(b.params);
  DeviceBuffer<int32_t> dtok(b.penalty_tokens), dcnt(b.penalty_counts), dout(b.params.size());
  EXPECT_EQ(launch_sample_rows(dout.ptr, dlogits.ptr, dparams.ptr, dtok.ptr, dcnt.ptr, b.rows(), b.ld, nullptr),
            cudaSuccess);
  SS_CHECK_CALL(cudaDeviceSynchronize());
  const std::vector<int32_t> got = dout.get();
  const std::vector<float> got_logits = dlogits.get();
  int ambiguous = 0;
  for (int64_t r = 0; r < b.rows(); ++r) {
    if (b.ambiguous[r]) {
      ++ambiguous;
    } else {
      EXPECT_EQ(got[r], b.want[r]) << "row " << r << ": " << b.what[r];
    }
    int bad = 0;
    for (int64_t i = 0; i < b.ld && bad < 3; ++i) {
      const float g = got_logits[r * b.ld + i], w = b.penalised[r * b.ld + i];
      if (std::memcmp(&g, &w, sizeof(float)) != 0 && !(std::isnan(g) && std::isnan(w))) {
        ++bad;
        ADD_FAILURE() << "row " << r << " logit " << i << " = " << g << ", want " << w << ": " << b.what[r];
      }
    }
  }
  return ambiguous;
}

// Random rows and parameters (sampling_oracle.h: ties, -inf masks, extreme temperatures, top-k
// 0 / 1 / k / n_vocab, top-p 1e-3 .. 1, min-p, penalties, u at its ends), many rows per launch,
// with and without padding between rows (ld > n_vocab: a vocabulary smaller than the logits row).
TEST(GpuSampling, MatchesHostSamplerOnRandomRows) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(31);
  int rows = 0, ambiguous = 0;
  // 49152: SmolLM2; 128256: Llama 3; 1 and 7: fewer ids than a warp.
  for (const auto& [n_vocab, n_rows] : {std::pair{1, 40}, {7, 400}, {1000, 400}, {49152, 120}, {128256, 60}}) {
    for (int pad : {0, 3}) {
      SCOPED_TRACE("n_vocab " + std::to_string(n_vocab) + " pad " + std::to_string(pad));
      Batch b;
      b.ld = n_vocab + pad;
      for (int r = 0; r < n_rows / 2; ++r) b.add(sampling_test::random_sampling_case(n_vocab, rng));
      ambiguous += run_and_check(b);
      rows += static_cast<int>(b.rows());
    }
  }
  // Ambiguity needs u * total within ~1e-10 relative of a boundary (or u at its very ends with a
  // negligible tail weight): a handful per thousand rows at most.
  EXPECT_LE(ambiguous * 100, rows) << ambiguous << " of " << rows << " rows within rounding of a boundary";
}

// A sampled sequence: each step's token joins the history, so the penalty entries grow and repeat.
TEST(GpuSampling, MatchesHostSamplerAlongAGeneration) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(32);
  constexpr int kVocab = 49152;
  for (int seq = 0; seq < 4; ++seq) {
    SamplingCase c = sampling_test::random_sampling_case(kVocab, rng);
    c.params.temperature = 0.9f;
    c.params.repetition_penalty = 1.2f;
    c.params.frequency_penalty = 0.4f;
    c.params.presence_penalty = 0.3f;
    c.params.seed = 100 + seq;
    Sampler host(c.params, kVocab), draws(c.params, kVocab);
    for (int step = 0; step < 24; ++step) {
      std::vector<float> l = c.logits;
      const int32_t want = host.sample(l, c.prompt, c.generated, nullptr);
      Batch b;
      b.ld = kVocab;
      c.u = draws.draw_uniform();  // the device path's draw: the same RNG stream as sample()
      b.add(c);
      ASSERT_EQ(b.want[0], want);
      run_and_check(b);
      c.generated.push_back(want);  // the history follows the host (also past an ambiguous step)
    }
  }
}

// Rows the host refuses (NaN anywhere, nothing finite) give -1; a one-token vocabulary; greedy ties.
TEST(GpuSampling, EdgeRows) {
  SKIP_WITHOUT_GPU();
  constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
  for (int n_vocab : {1, 33, 5000}) {
    SCOPED_TRACE("n_vocab " + std::to_string(n_vocab));
    Batch b;
    b.ld = n_vocab;
    std::vector<float> nan_row(n_vocab, 1.0f);
    nan_row[n_vocab / 2] = kNan;
    b.add_refused(nan_row);
    b.add_refused(std::vector<float>(n_vocab, kNegInf));
    std::vector<float> inf_row(n_vocab, 0.0f);
    inf_row[n_vocab - 1] = std::numeric_limits<float>::infinity();
    b.add_refused(inf_row);
    // Greedy and top-k = 1 with the maximum tied at several ids: the lowest.
    for (float t : {0.0f, 1.0f}) {
      SamplingCase c;
      c.logits.assign(n_vocab, -1.0f);
      for (int i = n_vocab - 1; i >= 0; i -= 7) c.logits[i] = 4.0f;
      c.params.temperature = t;
      c.params.top_k = 1;
      c.u = 0.999;
      b.add(c);
    }
    // Every logit equal, signed zeros: top-k and top-p cut among ties by id.
    for (int k : {1, std::min(2, n_vocab), n_vocab}) {
      SamplingCase c;
      c.logits.resize(n_vocab);
      for (int i = 0; i < n_vocab; ++i) c.logits[i] = i % 2 ? -0.0f : 0.0f;
      c.params.top_k = k;
      c.params.top_p = 0.5f;
      c.u = 0.75;
      b.add(c);
    }
    EXPECT_EQ(run_and_check(b), 0);
  }
  // A row whose n_vocab does not fit its stride is refused too.
  std::vector<float> logits(8, 0.0f);
  std::vector<SampleRowParams> params = {row_params(SamplingParams{}, 9, 0.5, 0, 0),
                                         row_params(SamplingParams{}, 0, 0.5, 0, 0)};
  DeviceBuffer<float> dl(logits);
  DeviceBuffer<SampleRowParams> dp(params);
  DeviceBuffer<int32_t> dout(2);
  ASSERT_EQ(launch_sample_rows(dout.ptr, dl.ptr, dp.ptr, nullptr, nullptr, 2, 4, nullptr), cudaSuccess);
  EXPECT_EQ(dout.get(), (std::vector<int32_t>{-1, -1}));
}

// Few rows of a long stride: the launcher splits each row over a team of blocks (a slice of ids
// each, histograms and sums combined across the team). One launch per single row gives the
// largest team; the mixed batches put vocabularies shorter than one slice (so most of the team
// holds no id), ties that span every slice, and refused rows in teams.
TEST(GpuSampling, RowsSplitOverBlocks) {
  SKIP_WITHOUT_GPU();
  constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
  std::mt19937_64 rng(33);
  int rows = 0, ambiguous = 0;
  for (int r = 0; r < 24; ++r) {  // one row of 128256 per launch
    Batch b;
    b.ld = 128256;
    b.add(sampling_test::random_sampling_case(128256, rng));
    ambiguous += run_and_check(b);
    ++rows;
  }
  // A stride of 131072 with vocabularies from 1 id to the whole stride, 2048 and its neighbours
  // (slice-sized), in batches of up to 6 rows.
  for (int batch = 0; batch < 6; ++batch) {
    Batch b;
    b.ld = 131072;
    for (int n_vocab : {1, 7, 2047, 2048, 2049, 131072}) b.add(sampling_test::random_sampling_case(n_vocab, rng));
    ambiguous += run_and_check(b);
    rows += static_cast<int>(b.rows());
  }
  EXPECT_LE(ambiguous * 20, rows) << ambiguous << " of " << rows << " rows within rounding of a boundary";

  for (int n_vocab : {3000, 128256}) {
    SCOPED_TRACE("n_vocab " + std::to_string(n_vocab));
    Batch b;
    b.ld = n_vocab;
    // Refused: a NaN in the last slice, nothing finite, a vocabulary longer than the stride.
    std::vector<float> nan_row(n_vocab, 1.0f);
    nan_row[n_vocab - 2] = kNan;
    b.add_refused(nan_row);
    b.add_refused(std::vector<float>(n_vocab, kNegInf));
    // Every logit equal: top-k, top-p and the draw cut among ties by id, across every slice, and
    // the tie searches cross slice boundaries. All sums are exact (equal weights), so none is
    // ambiguous.
    for (const auto& [k, top_p, u] : {std::tuple{n_vocab / 2 + 3, 1.0f, 0.999}, {0, 0.5f, 0.75}, {n_vocab - 1, 0.3f, 0.0},
                                      {2, 1.0f, 0.6}, {0, 1.0f, 0.4321}, {1, 1.0f, 0.5}}) {
      SamplingCase c;
      c.logits.assign(n_vocab, 0.5f);
      c.params.top_k = k;
      c.params.top_p = top_p;
      c.u = u;
      b.add(c);
    }
    // -inf everywhere but one id (in the last slice; and in the first): every mode picks it.
    for (int at : {n_vocab - 1, 0}) {
      for (float top_p : {1.0f, 0.9f}) {
        SamplingCase c;
        c.logits.assign(n_vocab, kNegInf);
        c.logits[at] = -3.0f;
        c.params.top_k = top_p < 1.0f ? 40 : 0;
        c.params.top_p = top_p;
        c.u = 0.999;
        b.add(c);
      }
    }
    // Greedy with the maximum tied in every slice: the lowest id.
    SamplingCase g;
    g.logits.assign(n_vocab, -1.0f);
    for (int i = n_vocab - 1; i >= 0; i -= 1999) g.logits[i] = 4.0f;
    g.params.temperature = 0.0f;
    b.add(g);
    EXPECT_EQ(run_and_check(b), 0);
  }
  // A row whose n_vocab does not fit its stride, among teams.
  const int64_t ld = 65536;
  std::vector<float> logits(2 * ld, 0.0f);
  std::vector<SampleRowParams> params = {row_params(SamplingParams{}, ld + 1, 0.5, 0, 0),
                                         row_params(SamplingParams{}, ld, 0.5, 0, 0)};
  DeviceBuffer<float> dl(logits);
  DeviceBuffer<SampleRowParams> dp(params);
  DeviceBuffer<int32_t> dout(2);
  ASSERT_EQ(launch_sample_rows(dout.ptr, dl.ptr, dp.ptr, nullptr, nullptr, 2, ld, nullptr), cudaSuccess);
  const std::vector<int32_t> got = dout.get();
  EXPECT_EQ(got[0], -1);
  EXPECT_EQ(got[1], static_cast<int32_t>(0.5 * ld));  // equal weights: u * n_vocab, exactly
}

// Shapes the launcher cannot run are refused before any device work.
TEST(GpuSampling, ValidatesArguments) {
  float f = 0.0f;
  int32_t i = 0;
  SampleRowParams p{};
  EXPECT_EQ(launch_sample_rows(&i, &f, &p, nullptr, nullptr, -1, 8, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_sample_rows(&i, &f, &p, nullptr, nullptr, 1, 0, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_sample_rows(&i, &f, &p, nullptr, nullptr, 1, int64_t{1} << 31, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_sample_rows(nullptr, &f, &p, nullptr, nullptr, 1, 8, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_sample_rows(&i, nullptr, &p, nullptr, nullptr, 1, 8, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_sample_rows(&i, &f, nullptr, nullptr, nullptr, 1, 8, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_sample_rows(&i, &f, &p, nullptr, nullptr, 0, 8, nullptr), cudaSuccess);
}

}  // namespace
}  // namespace starserve
