// An independent statement of what Sampler::choose (src/engine/sampling.h) returns, written with
// full sorts and long double sums, and a generator of random sampling cases. Used by the sampler's
// unit tests and by the GPU sampling parity test (tests/gpu/test_gpu_sampling.cpp).
//
// Two implementations that compute the same float weights (sampling_weight) but sum them in
// another order in double may only disagree where a decision compares a sum with a target that
// is within rounding of it: the top-p edge (cumulative mass in Before order vs top_p * total) and
// the draw (cumulative mass in id order vs u * total). The oracle flags those cases as ambiguous.
// Bound: a double sum of m non-negative terms of exact sum S is within (m - 1) 2^-53 S of it,
// whatever the order; the targets (top_p * total, u * total) carry the relative error of the total
// plus one rounding. Both sides are at most that far from the exact decision, so they can differ
// only if |sum - target| is below twice it. The bound used, 4 (n + 8192) 2^-53 max(sum, target),
// adds margin for sums taken in several stages (the GPU's histogram levels: at most 8192 more
// additions).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <vector>

#include "engine/sampling.h"

namespace starserve::sampling_test {

struct OracleResult {
  int32_t token = -1;
  bool ambiguous = false;  // a rounding-level change of a sum could change the token
};

inline OracleResult sampling_oracle(std::span<const float> logits, const SamplingParams& p, double u) {
  const int n = static_cast<int>(logits.size());
  float max_logit = -std::numeric_limits<float>::infinity();
  int32_t argmax = 0;
  for (int i = 0; i < n; ++i) {
    if (logits[i] > max_logit) {
      max_logit = logits[i];
      argmax = i;
    }
  }
  if (p.temperature == 0.0f) return {argmax, false};

  // Candidates in Before order: higher logit first, ties by lower id.
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  if (p.top_k > 0 && p.top_k < n) order.resize(p.top_k);

  const float inv_t = 1.0f / p.temperature;
  std::vector<float> w(n, 0.0f);
  long double total = 0.0L;
  for (int32_t id : order) total += w[id] = sampling_weight(logits[id], max_logit, inv_t);
  // Rounding bound of a comparison between a partial sum and a target near it (see the top).
  const auto bound = [&](long double a, long double b) { return 4.0L * (n + 8192) * 0x1.0p-53L * std::max(a, b); };
  // When every weight is a multiple of the smallest one's last bit q and the total stays below
  // 2^53 q (ties, small integers, all-equal rows), every partial sum is exact in double in any
  // order, and so is the host's running u * total - sum while it is positive (u * total < 2^53 q
  // has an ulp <= q): both sides compute the same numbers and nothing is ambiguous. The targets
  // are then taken as the double products both sides compute.
  long double q = 1.0L;
  for (int32_t id : order) {
    if (w[id] > 0.0f) q = std::min(q, static_cast<long double>(std::ldexp(1.0f, std::ilogb(w[id]) - 23)));
  }
  const bool exact_sums = total < 0x1.0p53L * q;

  OracleResult r;
  if (p.top_p < 1.0f) {
    const long double target = static_cast<long double>(static_cast<double>(p.top_p) * static_cast<double>(total));
    long double cum = 0.0L;
    size_t cut = order.size();
    for (size_t j = 0; j < order.size(); ++j) {
      const long double before = cum;
      cum += w[order[j]];
      if (cum >= target) {
        cut = j + 1;
        if (!exact_sums && (cum - target <= bound(cum, target) || target - before <= bound(before, target))) {
          r.ambiguous = true;
        }
        break;
      }
    }
    order.resize(cut);
  }
  if (p.min_p > 0.0f) {
    std::erase_if(order, [&](int32_t id) { return !(w[id] >= p.min_p); });
  }
  std::sort(order.begin(), order.end());  // the draw walks the survivors in increasing id
  std::erase_if(order, [&](int32_t id) { return w[id] <= 0.0f; });  // never drawn
  long double kept = 0.0L;
  for (int32_t id : order) kept += w[id];
  // A boundary between two survivors is ambiguous when u * total is within the bound of it; the
  // ends (0 and the total) are not: u = 0 gives the first survivor and rounding past the total
  // the last one on both sides.
  const long double x = exact_sums ? static_cast<long double>(u * static_cast<double>(kept))
                                   : static_cast<long double>(u) * kept;
  long double cum = 0.0L;
  for (size_t j = 0; j < order.size(); ++j) {
    const long double before = cum;
    cum += w[order[j]];
    if (cum > x || j + 1 == order.size()) {
      r.token = order[j];
      if (!exact_sums &&
          ((j + 1 < order.size() && cum - x <= bound(cum, x)) || (j > 0 && x - before <= bound(before, x)))) {
        r.ambiguous = true;
      }
      return r;
    }
  }
  return r;
}

// One row to sample: raw logits, the request's parameters, its token history and the draw.
struct SamplingCase {
  std::vector<float> logits;  // (n_vocab) before penalties
  SamplingParams params;
  std::vector<int32_t> prompt, generated;
  double u = 0.0;
};

// Rows that stress every decision: ties (few distinct values, bf16-rounded values), -inf masks,
// peaked and flat distributions, extreme temperatures, top-k at 0 / 1 / random / n_vocab, top-p
// tiny to 1, min-p, penalties of both signs over prompt and generated tokens, and u at its ends.
inline SamplingCase random_sampling_case(int n_vocab, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const auto pick = [&](auto... v) {
    const double all[] = {static_cast<double>(v)...};
    return all[rng() % sizeof...(v)];
  };
  SamplingCase c;
  c.logits.resize(n_vocab);
  const int style = static_cast<int>(rng() % 5);
  const double scale = pick(0.3, 2.0, 6.0);
  std::normal_distribution<float> normal(0.0f, static_cast<float>(scale));
  for (float& x : c.logits) {
    switch (style) {
      case 0: x = normal(rng); break;
      case 1: {  // bf16-rounded: many exact ties on a large vocabulary
        const float f = normal(rng);
        uint32_t b;
        std::memcpy(&b, &f, 4);
        b = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;
        std::memcpy(&x, &b, 4);
        break;
      }
      case 2: x = static_cast<float>(static_cast<int>(rng() % 7) - 3); break;  // 7 values
      case 3: x = static_cast<float>(rng() % 2 == 0 ? -0.0 : 0.0); break;     // all (signed) zeros
      default: x = normal(rng) * 0.01f; break;                                 // nearly flat
    }
  }
  if (rng() % 3 == 0) {  // a -inf mask over a random share of the vocabulary
    const double share = pick(0.1, 0.5, 0.99);
    for (float& x : c.logits) {
      if (unit(rng) < share) x = -std::numeric_limits<float>::infinity();
    }
  }
  if (rng() % 4 == 0) c.logits[rng() % n_vocab] = static_cast<float>(pick(8.0, 30.0));  // a peak
  c.logits[rng() % n_vocab] = static_cast<float>(normal(rng));  // at least one finite logit

  SamplingParams& p = c.params;
  p.temperature = static_cast<float>(pick(0.0, 0.05, 0.7, 1.0, 1.0, 1.5, 100.0));
  switch (rng() % 6) {
    case 0: p.top_k = 1; break;
    case 1: p.top_k = static_cast<int>(1 + rng() % n_vocab); break;
    case 2: p.top_k = n_vocab; break;
    case 3: p.top_k = std::min(50, n_vocab); break;
    default: p.top_k = 0; break;
  }
  p.top_p = static_cast<float>(pick(1.0, 1.0, 0.9, 0.5, 0.1, 1e-3));
  p.min_p = static_cast<float>(pick(0.0, 0.0, 0.0, 0.05, 0.3, 1.0));
  if (rng() % 2 == 0) {
    p.repetition_penalty = static_cast<float>(pick(1.0, 1.1, 1.3, 0.8, 10.0));
    p.frequency_penalty = static_cast<float>(pick(0.0, 0.1, 0.5, -0.7, 2.0));
    p.presence_penalty = static_cast<float>(pick(0.0, 0.3, -0.25, 1.5));
    std::uniform_int_distribution<int32_t> tok(0, n_vocab - 1);
    c.prompt.resize(rng() % 300);
    for (int32_t& t : c.prompt) t = tok(rng);
    c.generated.resize(rng() % 100);
    // Repeats: draw generated tokens from a small pool so counts exceed 1.
    std::vector<int32_t> pool(8);
    for (int32_t& t : pool) t = tok(rng);
    for (int32_t& t : c.generated) t = rng() % 2 ? pool[rng() % pool.size()] : tok(rng);
  }
  switch (rng() % 8) {
    case 0: c.u = 0.0; break;
    case 1: c.u = 1.0 - 0x1.0p-53; break;
    default: c.u = static_cast<double>(rng() >> 11) * 0x1.0p-53; break;
  }
  return c;
}

}  // namespace starserve::sampling_test
