#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "engine/sampling.h"
#include "tests/unit/sampling_oracle.h"

namespace starserve {
namespace {

std::vector<float> random_logits(int n_vocab, uint64_t seed, float scale = 3.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> l(static_cast<size_t>(n_vocab));
  for (float& x : l) x = dist(rng);
  return l;
}

// Softmax in double, independent of the sampler's code path.
std::vector<double> softmax_ref(const std::vector<float>& logits, double temperature = 1.0) {
  const double mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(logits.size());
  double z = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) z += p[i] = std::exp((logits[i] - mx) / temperature);
  for (double& x : p) x /= z;
  return p;
}

// Draws n tokens from fresh copies of `logits` (the sampler modifies them in place).
std::vector<int32_t> draw_many(Sampler& s, const std::vector<float>& logits, int n) {
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    std::vector<float> l = logits;
    out.push_back(s.sample(l, {}, {}, nullptr));
  }
  return out;
}

std::vector<int> histogram(const std::vector<int32_t>& tokens, int n_vocab) {
  std::vector<int> h(static_cast<size_t>(n_vocab), 0);
  for (int32_t t : tokens) ++h[t];
  return h;
}

SamplingParams seeded(uint64_t seed) {
  SamplingParams p;
  p.seed = seed;
  return p;
}

// Logits whose softmax is exactly probs (up to float rounding of the log).
std::vector<float> logits_of(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(static_cast<float>(std::log(p)));
  return l;
}

TEST(Sampling, GreedyIsArgmax) {
  SamplingParams p;
  p.temperature = 0.0f;
  for (uint64_t seed : {1, 2, 3, 4, 5}) {
    std::vector<float> l = random_logits(1000, seed);
    const auto expected = std::max_element(l.begin(), l.end()) - l.begin();
    Sampler s(p, 1000);
    EXPECT_EQ(s.sample(l, {}, {}, nullptr), expected);
  }
}

TEST(Sampling, GreedyTiesPickLowestId) {
  SamplingParams p;
  p.temperature = 0.0f;
  Sampler s(p, 6);
  std::vector<float> l = {1.0f, 3.0f, -2.0f, 3.0f, 0.0f, 3.0f};
  EXPECT_EQ(s.sample(l, {}, {}, nullptr), 1);
  // Also when top-k = 1 reduces sampling to the single best candidate.
  SamplingParams k1 = seeded(7);
  k1.top_k = 1;
  Sampler s1(k1, 6);
  for (int32_t t : draw_many(s1, {1.0f, 3.0f, -2.0f, 3.0f, 0.0f, 3.0f}, 50)) EXPECT_EQ(t, 1);
}

TEST(Sampling, LowTemperatureApproachesGreedy) {
  // With a gap of >= 0.05 between the best logit and the rest, T = 1e-3 puts a weight of at most
  // exp(-50) ~ 2e-22 on each other token: 1000 draws all agree with argmax.
  std::vector<float> l = random_logits(500, 11);
  const int32_t best = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
  for (float& x : l) {
    if (&x != &l[best]) x = std::min(x, l[best] - 0.05f);
  }
  SamplingParams p = seeded(3);
  p.temperature = 1e-3f;
  Sampler s(p, 500);
  for (int32_t t : draw_many(s, l, 1000)) EXPECT_EQ(t, best);

  // On the way there the argmax share grows as T falls: for logits {0, 0.5, 1} it is 0.42, 0.51,
  // 0.67, 0.993 at T = 2, 1, 0.5, 0.1; neighbouring steps are >= 8 sigma apart over 4000 draws
  // (sigma <= sqrt(4000 / 4) ~ 32 counts), and at T = 0.01 the others weigh exp(-50).
  const std::vector<float> small = {0.0f, 0.5f, 1.0f};
  int prev = 0;
  for (float t : {2.0f, 1.0f, 0.5f, 0.1f}) {
    SamplingParams pt = seeded(17);
    pt.temperature = t;
    Sampler st(pt, 3);
    const int n_best = histogram(draw_many(st, small, 4000), 3)[2];
    EXPECT_GT(n_best, prev) << "T = " << t;
    prev = n_best;
  }
  SamplingParams cold = seeded(17);
  cold.temperature = 0.01f;
  Sampler sc(cold, 3);
  EXPECT_EQ(histogram(draw_many(sc, small, 4000), 3)[2], 4000);
}

TEST(Sampling, TopK1EqualsGreedy) {
  for (uint64_t seed : {21, 22, 23}) {
    const std::vector<float> l = random_logits(4096, seed);
    SamplingParams g;
    g.temperature = 0.0f;
    Sampler greedy(g, 4096);
    std::vector<float> lg = l;
    const int32_t expected = greedy.sample(lg, {}, {}, nullptr);
    SamplingParams k = seeded(seed);
    k.top_k = 1;
    k.temperature = 1.5f;
    Sampler topk(k, 4096);
    for (int32_t t : draw_many(topk, l, 20)) EXPECT_EQ(t, expected);
  }
}

TEST(Sampling, TopKTiesGoToLowestIdsOnLargeVocab) {
  // Ten tokens share the best logit, scattered so the ties arrive after the streaming selection
  // has already shrunk its buffer several times; top_k = 8 must keep the eight lowest ids. Each
  // kept token has probability 1/8, so 400 draws see all of them (miss chance 8 * (7/8)^400 ~ 5e-23).
  constexpr int kVocab = 128 * 1024;
  std::vector<float> l = random_logits(kVocab, 91, 1.0f);
  for (float& x : l) x = std::min(x, 5.0f);
  const std::vector<int32_t> tied = {131000, 7, 64000, 42, 100, 120000, 3333, 5000, 90000, 100000};
  for (int32_t id : tied) l[id] = 10.0f;
  SamplingParams p = seeded(4);
  p.top_k = 8;
  Sampler s(p, kVocab);
  const std::vector<int32_t> t = draw_many(s, l, 400);
  EXPECT_EQ(std::set<int32_t>(t.begin(), t.end()), (std::set<int32_t>{7, 42, 100, 3333, 5000, 64000, 90000, 100000}));

  // All logits equal: the first k ids.
  SamplingParams p3 = seeded(4);
  p3.top_k = 3;
  Sampler s3(p3, 100);
  const std::vector<int32_t> t3 = draw_many(s3, std::vector<float>(100, 0.0f), 500);
  EXPECT_EQ(std::set<int32_t>(t3.begin(), t3.end()), (std::set<int32_t>{0, 1, 2}));
}

TEST(Sampling, MaskedLogitsAreNeverDrawn) {
  // -inf marks tokens a grammar or a banned list excludes; top-k larger than the allowed set
  // must not pick them, and neither must plain sampling or top-p.
  const float kMasked = -std::numeric_limits<float>::infinity();
  const std::vector<float> l = {kMasked, 1.0f, kMasked, 2.0f, kMasked, kMasked};
  for (int top_k : {0, 2, 4, 6}) {
    SamplingParams p = seeded(12);
    p.top_k = top_k;
    p.top_p = 0.99f;
    Sampler s(p, 6);
    const std::vector<int32_t> t = draw_many(s, l, 1000);
    EXPECT_EQ(std::set<int32_t>(t.begin(), t.end()), (std::set<int32_t>{1, 3})) << "top_k = " << top_k;
  }
}

// Probabilities by token id: 3 -> 1/2, 0 -> 1/4, 4 -> 1/8, 1 -> 1/16, 2 -> 1/16 (ids shuffled so
// sorted order differs from id order).
const std::vector<double> kDyadic = {0.25, 0.0625, 0.0625, 0.5, 0.125};

std::set<int32_t> support(const SamplingParams& p, const std::vector<double>& probs, int n_draws) {
  const int n_vocab = static_cast<int>(probs.size());
  Sampler s(p, n_vocab);
  const std::vector<int32_t> t = draw_many(s, logits_of(probs), n_draws);
  return {t.begin(), t.end()};
}

TEST(Sampling, TopPKeepsSmallestSetReachingP) {
  // Sorted masses 1/2, 1/4, 1/8, 1/16, 1/16; cumulative 0.5, 0.75, 0.875, 0.9375, 1.
  // The smallest prefix with mass >= p:
  //   p = 0.4   -> {3}             (0.5)
  //   p = 0.7   -> {3, 0}          (0.75)
  //   p = 0.8   -> {3, 0, 4}       (0.875)
  //   p = 0.9   -> {3, 0, 4, 1}    (0.9375; ties among the 1/16 tokens go to the lower id)
  //   p = 0.95  -> all five
  // Each kept token has probability >= 1/16 after renormalisation, so in 3000 draws it is missing
  // with probability < (15/16)^3000 ~ 1e-84: the observed support is the kept set.
  const std::vector<std::pair<float, std::set<int32_t>>> cases = {
      {0.4f, {3}}, {0.7f, {3, 0}}, {0.8f, {3, 0, 4}}, {0.9f, {3, 0, 4, 1}}, {0.95f, {0, 1, 2, 3, 4}}};
  for (const auto& [top_p, expected] : cases) {
    SamplingParams p = seeded(5);
    p.top_p = top_p;
    EXPECT_EQ(support(p, kDyadic, 3000), expected) << "top_p = " << top_p;
  }
  // A flat distribution puts every token in one weight bucket: 10 tokens of 0.1 each, and
  // top_p = 0.35 needs 4 of them (0.3 < 0.35 <= 0.4), the lowest ids among the ties.
  SamplingParams flat = seeded(6);
  flat.top_p = 0.35f;
  EXPECT_EQ(support(flat, std::vector<double>(10, 0.1), 2000), (std::set<int32_t>{0, 1, 2, 3}));
}

TEST(Sampling, TopPAppliesAfterTopKRenormalisation) {
  // top_k = 3 keeps {3, 0, 4} with renormalised masses 4/7, 2/7, 1/7 (cumulative 0.571, 0.857),
  // so top_p = 0.8 then keeps {3, 0}; without the renormalisation it would keep {3, 0, 4}.
  SamplingParams p = seeded(9);
  p.top_k = 3;
  p.top_p = 0.8f;
  EXPECT_EQ(support(p, kDyadic, 3000), (std::set<int32_t>{3, 0}));
  p.top_k = 2;
  p.top_p = 1.0f;
  EXPECT_EQ(support(p, kDyadic, 3000), (std::set<int32_t>{3, 0}));
}

TEST(Sampling, MinPDropsTokensBelowFractionOfMax) {
  // Threshold = min_p * 1/2.
  const std::vector<std::pair<float, std::set<int32_t>>> cases = {
      {0.1f, {0, 1, 2, 3, 4}},  // 0.05 < 1/16
      {0.2f, {3, 0, 4}},        // 0.1: drops the 1/16 tokens
      {0.3f, {3, 0}},           // 0.15: drops 1/8
      {0.6f, {3}},              // 0.3
      {1.0f, {3}}};             // only the max survives
  for (const auto& [min_p, expected] : cases) {
    SamplingParams p = seeded(13);
    p.min_p = min_p;
    EXPECT_EQ(support(p, kDyadic, 3000), expected) << "min_p = " << min_p;
  }
  // Temperature acts first: at T = 0.5 the probabilities square (1/4 : 1/16 : 1/64 : ...), so the
  // ratio to the max of token 4 is 1/16 < 0.1 and of token 0 is 1/4 >= 0.1.
  SamplingParams p = seeded(13);
  p.temperature = 0.5f;
  p.min_p = 0.1f;
  EXPECT_EQ(support(p, kDyadic, 3000), (std::set<int32_t>{3, 0}));
}

// Exact numbers: every operand below is a dyadic rational, so float arithmetic is exact.
TEST(Sampling, RepetitionPenaltyDividesPositiveMultipliesNegative) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.repetition_penalty = 2.0f;
  Sampler s(p, 6);
  std::vector<float> l = {2.0f, -1.0f, 0.5f, -3.0f, 4.0f, 0.0f};
  const std::vector<int32_t> prompt = {0, 1, 5};
  const std::vector<int32_t> generated = {1, 3, 3, 1};  // repeats are penalised once
  s.sample(l, prompt, generated, nullptr);
  EXPECT_EQ(l, (std::vector<float>{1.0f, -2.0f, 0.5f, -6.0f, 4.0f, 0.0f}));
}

TEST(Sampling, FrequencyAndPresencePenaltiesCountGeneratedTokens) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.frequency_penalty = 0.5f;
  p.presence_penalty = 0.25f;
  Sampler s(p, 5);
  const std::vector<float> raw = {1.0f, 1.0f, 0.5f, 2.0f, 4.0f};
  const std::vector<int32_t> prompt = {0, 1};            // the prompt is not counted
  const std::vector<int32_t> generated = {2, 4, 2, 2};   // token 2 x3, token 4 x1
  std::vector<float> l = raw;
  s.sample(l, prompt, generated, nullptr);
  // logit -= 0.5 * count + 0.25
  EXPECT_EQ(l, (std::vector<float>{1.0f, 1.0f, 0.5f - 1.75f, 2.0f, 4.0f - 0.75f}));
  // The per-call counts are cleared: the same input gives the same output.
  std::vector<float> again = raw;
  s.sample(again, prompt, generated, nullptr);
  EXPECT_EQ(again, l);

  // Negative penalties encourage repetition.
  SamplingParams neg;
  neg.temperature = 0.0f;
  neg.frequency_penalty = -1.0f;
  Sampler sn(neg, 5);
  std::vector<float> ln = raw;
  EXPECT_EQ(sn.sample(ln, prompt, generated, nullptr), 4);
  EXPECT_EQ(ln[2], 3.5f);  // 0.5 + 3
  EXPECT_EQ(ln[4], 5.0f);
}

TEST(Sampling, PenaltiesComposeRepetitionFirstAndChangeTheChoice) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.repetition_penalty = 2.0f;
  p.frequency_penalty = 0.5f;
  p.presence_penalty = 0.25f;
  Sampler s(p, 3);
  std::vector<float> l = {3.0f, 2.0f, -1.0f};
  const std::vector<int32_t> generated = {0, 0};
  // Token 0: 3 / 2 = 1.5, then 1.5 - (0.5 * 2 + 0.25) = 0.25, so token 1 (2.0) now wins.
  EXPECT_EQ(s.sample(l, {}, generated, nullptr), 1);
  EXPECT_EQ(l, (std::vector<float>{0.25f, 2.0f, -1.0f}));
}

TEST(Sampling, SameSeedSameSequenceDifferentSeedsDiffer) {
  const std::vector<float> l = random_logits(100, 31, 0.5f);  // flat-ish: many plausible tokens
  Sampler a(seeded(1234), 100), b(seeded(1234), 100), c(seeded(1235), 100);
  const std::vector<int32_t> ta = draw_many(a, l, 100);
  EXPECT_EQ(ta, draw_many(b, l, 100));
  // Two independent draws from this distribution agree with probability sum p^2 ~ 1.3%, so about
  // 1 of 100 positions matches by chance; 20 would mean the seed is ignored somewhere.
  const std::vector<int32_t> tc = draw_many(c, l, 100);
  int same = 0;
  for (size_t i = 0; i < ta.size(); ++i) same += ta[i] == tc[i];
  EXPECT_LT(same, 20);
  EXPECT_EQ(a.seed(), 1234u);

  // Unset seed: a random one, reported so the run can be reproduced.
  SamplingParams unseeded;
  Sampler r1(unseeded, 100), r2(unseeded, 100);
  EXPECT_NE(r1.seed(), r2.seed());
  Sampler replay(seeded(r1.seed()), 100);
  EXPECT_EQ(draw_many(r1, l, 50), draw_many(replay, l, 50));
}

// Empirical frequencies vs the exact distribution. Each token's count over N draws is
// Binomial(N, p): mean N p, sigma = sqrt(N p (1 - p)). Allowing 5 sigma per token, a correct
// sampler fails one of 8 tokens with probability < 8 * 5.7e-7 ~ 5e-6 (and the seed is fixed, so
// the test is deterministic anyway). Sensitivity: at N = 20000 a p = 0.2 token has sigma ~57
// counts, so a 10% relative error (400 counts) is ~7 sigma.
void expect_matches(const std::vector<int>& hist, const std::vector<double>& probs, int n) {
  for (size_t i = 0; i < probs.size(); ++i) {
    const double mean = n * probs[i];
    const double sigma = std::sqrt(n * probs[i] * (1.0 - probs[i]));
    EXPECT_NEAR(hist[i], mean, 5.0 * sigma + 1e-9) << "token " << i << " p = " << probs[i];
  }
}

TEST(Sampling, EmpiricalFrequenciesMatchSoftmax) {
  constexpr int kDraws = 20000;
  const std::vector<float> l = {0.0f, 1.0f, 2.0f, -1.0f, 0.5f, 1.5f, -0.5f, 2.5f};
  const int n_vocab = static_cast<int>(l.size());
  {
    Sampler s(seeded(42), n_vocab);
    expect_matches(histogram(draw_many(s, l, kDraws), n_vocab), softmax_ref(l, 1.0), kDraws);
  }
  {
    SamplingParams p = seeded(43);
    p.temperature = 0.7f;
    Sampler s(p, n_vocab);
    expect_matches(histogram(draw_many(s, l, kDraws), n_vocab), softmax_ref(l, 0.7), kDraws);
  }
  {
    // top_k = 4 keeps logits 2.5, 2, 1.5, 1 (ids 7, 2, 5, 1) and renormalises over them.
    SamplingParams p = seeded(44);
    p.top_k = 4;
    Sampler s(p, n_vocab);
    std::vector<float> kept(l.size(), -std::numeric_limits<float>::infinity());
    for (int id : {7, 2, 5, 1}) kept[id] = l[id];
    expect_matches(histogram(draw_many(s, l, kDraws), n_vocab), softmax_ref(kept, 1.0), kDraws);
  }
}

TEST(Sampling, LargeVocabTruncationStaysInTheNucleus) {
  // 128K vocab: the chunked top-p sort must still find the exact nucleus.
  constexpr int kVocab = 128 * 1024;
  const std::vector<float> l = random_logits(kVocab, 77, 4.0f);
  const std::vector<double> probs = softmax_ref(l);
  std::vector<int32_t> order(kVocab);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
  double cum = 0.0;
  std::set<int32_t> nucleus;
  for (int32_t id : order) {
    nucleus.insert(id);
    if ((cum += probs[id]) >= 0.9) break;
  }
  SamplingParams p = seeded(8);
  p.top_p = 0.9f;
  Sampler s(p, kVocab);
  for (int32_t t : draw_many(s, l, 100)) EXPECT_TRUE(nucleus.count(t)) << t;
  // The nucleus spans many weight buckets, with the cut inside the boundary bucket.
  EXPECT_GT(nucleus.size(), 64u);
}

TEST(Sampling, LogprobsAreLogSoftmaxOfPenalisedLogits) {
  constexpr int kVocab = 20;
  const std::vector<float> raw = random_logits(kVocab, 55);
  SamplingParams p = seeded(3);
  p.temperature = 0.5f;  // must not change the reported logprobs
  p.top_k = 3;           // neither must truncation
  p.repetition_penalty = 1.5f;
  p.logprobs = kVocab;   // top-N covers the whole vocab
  Sampler s(p, kVocab);
  const std::vector<int32_t> generated = {4, 9};
  std::vector<float> l = raw;
  TokenLogprobs lp;
  const int32_t token = s.sample(l, {}, generated, &lp);

  // Reference: penalise by hand, log-softmax in double.
  std::vector<float> penalised = raw;
  for (int32_t t : generated) penalised[t] = penalised[t] > 0 ? penalised[t] / 1.5f : penalised[t] * 1.5f;
  const std::vector<double> ref = softmax_ref(penalised);

  EXPECT_EQ(lp.token, token);
  EXPECT_NEAR(lp.logprob, std::log(ref[token]), 1e-5);
  ASSERT_EQ(lp.top.size(), static_cast<size_t>(kVocab));
  double sum = 0.0;
  for (size_t i = 0; i < lp.top.size(); ++i) {
    sum += std::exp(static_cast<double>(lp.top[i].logprob));
    EXPECT_NEAR(lp.top[i].logprob, std::log(ref[lp.top[i].token]), 1e-5);
    if (i > 0) {
      EXPECT_GE(lp.top[i - 1].logprob, lp.top[i].logprob);
    }
  }
  // 20 float logprobs, each within ~1e-6 relative: the sum is 1 to well under 1e-5.
  EXPECT_NEAR(sum, 1.0, 1e-5);
}

TEST(Sampling, LogprobsTopNOnLargeVocabAndGreedy) {
  constexpr int kVocab = 50000;
  const std::vector<float> raw = random_logits(kVocab, 66);
  SamplingParams p;
  p.temperature = 0.0f;
  p.logprobs = 5;
  Sampler s(p, kVocab);
  std::vector<float> l = raw;
  TokenLogprobs lp;
  const int32_t token = s.sample(l, {}, {}, &lp);
  std::vector<int32_t> order(kVocab);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + 5, order.end(), [&](int32_t a, int32_t b) { return raw[a] > raw[b]; });
  ASSERT_EQ(lp.top.size(), 5u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(lp.top[i].token, order[i]);
  EXPECT_EQ(lp.top[0].token, token);
  EXPECT_EQ(lp.top[0].logprob, lp.logprob);
  EXPECT_LT(lp.logprob, 0.0f);  // the model's confidence, not the greedy rule's certainty
  // logprobs = 0: the chosen token only.
  SamplingParams p0 = p;
  p0.logprobs = 0;
  Sampler s0(p0, kVocab);
  l = raw;
  s0.sample(l, {}, {}, &lp);
  EXPECT_TRUE(lp.top.empty());
}

// The draw walks the survivors in increasing token id, not in the order truncation leaves them:
// with weights 1/e (id 0) and 1 (id 1) the CDF is [0, 0.37) -> 0, [0.37, 1.37) -> 1, so a small u
// picks id 0 although id 1 is the more likely token and comes first in any sorted order.
TEST(Sampling, DrawWalksSurvivorsInIncreasingId) {
  const float kMasked = -std::numeric_limits<float>::infinity();
  const std::vector<float> l = {0.0f, 1.0f, -3.0f, kMasked, -2.0f};
  for (int top_k : {0, 2, 4}) {
    SamplingParams p = seeded(1);
    p.top_k = top_k;
    Sampler s(p, 5);
    if (top_k == 2) {
      const double total = std::exp(-1.0) + 1.0;
      EXPECT_EQ(s.choose(l, 0.1), 0);
      EXPECT_EQ(s.choose(l, 0.36 / total), 0);
      EXPECT_EQ(s.choose(l, 0.38 / total), 1);
    }
    EXPECT_EQ(s.choose(l, 0.0), 0) << "u = 0: the first survivor with a positive weight";
    EXPECT_EQ(s.choose(l, 1.0 - 0x1.0p-53), top_k == 2 ? 1 : 4) << "u -> 1: the last one";
  }
}

// sample() is exactly: penalty entries, apply them, one uniform draw when not greedy, choose().
TEST(Sampling, SampleIsPenaltiesThenOneDrawThenChoose) {
  std::mt19937_64 rng(5);
  for (int i = 0; i < 200; ++i) {
    sampling_test::SamplingCase c = sampling_test::random_sampling_case(300, rng);
    c.params.seed = 1000 + i;
    Sampler a(c.params, 300), b(c.params, 300);
    for (int step = 0; step < 3; ++step) {
      std::vector<float> la = c.logits, lb = c.logits;
      const int32_t ta = a.sample(la, c.prompt, c.generated, nullptr);
      std::vector<int32_t> tokens, counts;
      b.penalty_entries(c.prompt, c.generated, &tokens, &counts);
      apply_penalty_entries(c.params, lb, tokens, counts);
      const double u = c.params.temperature > 0.0f ? b.draw_uniform() : 0.0;
      EXPECT_EQ(b.choose(lb, u), ta) << "case " << i << " step " << step;
      EXPECT_EQ(lb, la);
      c.generated.push_back(ta);
    }
  }
}

TEST(Sampling, PenaltyEntriesListEachTouchedTokenOnce) {
  const std::vector<int32_t> prompt = {5, 1, 5, 2};
  const std::vector<int32_t> generated = {2, 7, 2, 2, 3};
  const auto entries = [&](float rep, float freq, float presence) {
    SamplingParams p;
    p.repetition_penalty = rep;
    p.frequency_penalty = freq;
    p.presence_penalty = presence;
    Sampler s(p, 10);
    std::vector<int32_t> tokens, counts;
    s.penalty_entries(prompt, generated, &tokens, &counts);
    std::vector<std::pair<int32_t, int32_t>> out;
    for (size_t i = 0; i < tokens.size(); ++i) out.emplace_back(tokens[i], counts[i]);
    return out;
  };
  using V = std::vector<std::pair<int32_t, int32_t>>;
  EXPECT_EQ(entries(1.0f, 0.0f, 0.0f), V{});
  // Repetition only: prompt + generated in first-seen order, counts unused (0).
  EXPECT_EQ(entries(1.2f, 0.0f, 0.0f), (V{{5, 0}, {1, 0}, {2, 0}, {7, 0}, {3, 0}}));
  // Frequency / presence only: the generated tokens with their counts.
  EXPECT_EQ(entries(1.0f, 0.5f, 0.0f), (V{{2, 3}, {7, 1}, {3, 1}}));
  EXPECT_EQ(entries(1.0f, 0.0f, 0.5f), (V{{2, 3}, {7, 1}, {3, 1}}));
  // Both: every touched token, counts from the generated tokens (0: prompt only). Repeated calls
  // give the same entries (the scratch is restored).
  EXPECT_EQ(entries(1.2f, 0.5f, 0.1f), (V{{5, 0}, {1, 0}, {2, 3}, {7, 1}, {3, 1}}));
  SamplingParams p;
  p.repetition_penalty = 1.2f;
  p.frequency_penalty = 0.5f;
  Sampler s(p, 10);
  std::vector<int32_t> t1, c1, t2, c2;
  s.penalty_entries(prompt, generated, &t1, &c1);
  s.penalty_entries(prompt, generated, &t2, &c2);
  EXPECT_EQ(t1, t2);
  EXPECT_EQ(c1, c2);
}

// choose() against the independent oracle on random rows and parameters: the same token unless the
// case sits within rounding of a top-p or draw boundary, which must be rare.
TEST(Sampling, ChooseMatchesIndependentOracle) {
  std::mt19937_64 rng(17);
  int cases = 0, ambiguous = 0;
  for (const auto& [n_vocab, n_cases] : {std::pair{1, 50}, {7, 600}, {1000, 600}, {49152, 40}}) {
    for (int i = 0; i < n_cases; ++i) {
      const sampling_test::SamplingCase c = sampling_test::random_sampling_case(n_vocab, rng);
      Sampler s(c.params, n_vocab);
      std::vector<float> l = c.logits;
      std::vector<int32_t> tokens, counts;
      s.penalty_entries(c.prompt, c.generated, &tokens, &counts);
      apply_penalty_entries(c.params, l, tokens, counts);
      const int32_t got = s.choose(l, c.u);
      const sampling_test::OracleResult want = sampling_test::sampling_oracle(l, c.params, c.u);
      ++cases;
      if (want.ambiguous) {
        ++ambiguous;
        continue;
      }
      EXPECT_EQ(got, want.token) << "n_vocab " << n_vocab << " case " << i << " T " << c.params.temperature
                                 << " top_k " << c.params.top_k << " top_p " << c.params.top_p << " min_p "
                                 << c.params.min_p << " u " << c.u;
    }
  }
  EXPECT_LE(ambiguous * 100, cases) << ambiguous << " of " << cases << " cases within rounding of a boundary";
}

TEST(SamplingParams, DefaultsAreValidAndOff) {
  const SamplingParams p;
  EXPECT_TRUE(p.validate(32000).ok());
  EXPECT_EQ(p.temperature, 1.0f);
  EXPECT_EQ(p.top_k, 0);
  EXPECT_EQ(p.top_p, 1.0f);
  EXPECT_EQ(p.min_p, 0.0f);
  EXPECT_EQ(p.repetition_penalty, 1.0f);
  EXPECT_EQ(p.max_tokens, 16);
  EXPECT_FALSE(p.seed.has_value());
  EXPECT_FALSE(p.logprobs.has_value());
}

TEST(SamplingParams, ValidateNamesFieldValueAndRange) {
  struct Case {
    void (*mutate)(SamplingParams&);
    const char* expected;  // a substring of the message
  };
  const std::vector<Case> cases = {
      {[](SamplingParams& p) { p.temperature = -0.5f; }, "temperature = -0.5 must be in [0, 100]"},
      {[](SamplingParams& p) { p.temperature = std::nanf(""); }, "temperature = nan"},
      {[](SamplingParams& p) { p.top_k = -1; }, "top_k = -1 must be in [0, 1000]"},
      {[](SamplingParams& p) { p.top_k = 1001; }, "top_k = 1001 must be in [0, 1000]"},
      {[](SamplingParams& p) { p.top_p = 1.5f; }, "top_p = 1.5 must be in (0, 1]"},
      {[](SamplingParams& p) { p.top_p = 0.0f; }, "top_p = 0 must be in (0, 1]"},
      {[](SamplingParams& p) { p.min_p = 2.0f; }, "min_p = 2 must be in [0, 1]"},
      {[](SamplingParams& p) { p.repetition_penalty = 0.0f; }, "repetition_penalty = 0 must be in (0, 10]"},
      {[](SamplingParams& p) { p.frequency_penalty = 2.5f; }, "frequency_penalty = 2.5 must be in [-2, 2]"},
      {[](SamplingParams& p) { p.presence_penalty = -3.0f; }, "presence_penalty = -3 must be in [-2, 2]"},
      {[](SamplingParams& p) { p.max_tokens = 0; }, "max_tokens = 0 must be in [1, 1048576]"},
      {[](SamplingParams& p) { p.stop = {"ok", ""}; }, "stop[1] has 0 bytes, must be in [1, 256]"},
      {[](SamplingParams& p) { p.stop.assign(17, "x"); }, "stop has 17 strings, must be in [0, 16]"},
      {[](SamplingParams& p) { p.stop_token_ids = {5, 1000}; }, "stop_token_ids[1] = 1000 must be in [0, 1000)"},
      {[](SamplingParams& p) { p.logprobs = 21; }, "logprobs = 21 must be in [0, 20]"},
  };
  for (const Case& c : cases) {
    SamplingParams p;
    c.mutate(p);
    const Status st = p.validate(1000);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << c.expected;
    EXPECT_NE(st.message().find(c.expected), std::string::npos) << st.message();
  }
  // Boundaries are accepted.
  SamplingParams edge;
  edge.temperature = 0.0f;
  edge.top_k = 1000;
  edge.top_p = 1.0f;
  edge.min_p = 1.0f;
  edge.frequency_penalty = -2.0f;
  edge.presence_penalty = 2.0f;
  edge.logprobs = 20;
  edge.stop_token_ids = {0, 999};
  EXPECT_TRUE(edge.validate(1000).ok()) << edge.validate(1000).to_string();
}

}  // namespace
}  // namespace starserve
