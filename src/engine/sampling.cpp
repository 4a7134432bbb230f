// The penalties' arithmetic (a product, then a sum) is repeated bit for bit by the GPU kernel, which
// rounds the product first; a fused multiply-add would round once and differ in the last bit, so
// contraction is switched off for this file whatever -march or -ffp-contract the build uses.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "engine/sampling.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "common/check.h"

namespace starserve {

namespace {

// False for NaN, so a NaN field is reported like any other out-of-range value.
bool in_closed(float x, float lo, float hi) { return lo <= x && x <= hi; }

// Candidate order: higher logit first, ties by lower id, so every truncation is deterministic.
struct Before {
  std::span<const float> logits;
  bool operator()(int32_t a, int32_t b) const {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  }
};

// Top-p buckets: a weight is in [0, 1], and non-negative floats order like their bit patterns, so
// the top bits (exponent + 5 mantissa bits) give monotone buckets about 3% wide in relative terms.
constexpr int kWeightBucketShift = 18;
constexpr uint32_t kWeightOneBits = 0x3F800000u;  // bit pattern of 1.0f
constexpr int kWeightBuckets = static_cast<int>(kWeightOneBits >> kWeightBucketShift) + 1;

int weight_bucket(float w) { return static_cast<int>(std::bit_cast<uint32_t>(w) >> kWeightBucketShift); }

}  // namespace

Status SamplingParams::validate(int n_vocab) const {
  SS_CHECK(n_vocab > 0, "n_vocab = {}", n_vocab);
  if (!in_closed(temperature, 0.0f, kMaxTemperature)) {
    return invalid_argument("temperature = {} must be in [0, {}] (0 = greedy)", temperature, kMaxTemperature);
  }
  if (top_k < 0 || top_k > n_vocab) {
    return invalid_argument("top_k = {} must be in [0, {}] (0 = off; {} = n_vocab)", top_k, n_vocab, n_vocab);
  }
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    return invalid_argument("top_p = {} must be in (0, 1] (1 = off)", top_p);
  }
  if (!in_closed(min_p, 0.0f, 1.0f)) {
    return invalid_argument("min_p = {} must be in [0, 1] (0 = off)", min_p);
  }
  if (!(repetition_penalty > 0.0f && repetition_penalty <= kMaxRepetitionPenalty)) {
    return invalid_argument("repetition_penalty = {} must be in (0, {}] (1 = off)", repetition_penalty,
                            kMaxRepetitionPenalty);
  }
  if (!in_closed(frequency_penalty, -kMaxAbsTokenPenalty, kMaxAbsTokenPenalty)) {
    return invalid_argument("frequency_penalty = {} must be in [{}, {}] (0 = off)", frequency_penalty,
                            -kMaxAbsTokenPenalty, kMaxAbsTokenPenalty);
  }
  if (!in_closed(presence_penalty, -kMaxAbsTokenPenalty, kMaxAbsTokenPenalty)) {
    return invalid_argument("presence_penalty = {} must be in [{}, {}] (0 = off)", presence_penalty,
                            -kMaxAbsTokenPenalty, kMaxAbsTokenPenalty);
  }
  if (max_tokens < 1 || max_tokens > kMaxMaxTokens) {
    return invalid_argument("max_tokens = {} must be in [1, {}]", max_tokens, kMaxMaxTokens);
  }
  if (stop.size() > static_cast<size_t>(kMaxStopStrings)) {
    return invalid_argument("stop has {} strings, must be in [0, {}]", stop.size(), kMaxStopStrings);
  }
  for (size_t i = 0; i < stop.size(); ++i) {
    if (stop[i].empty() || stop[i].size() > static_cast<size_t>(kMaxStopStringBytes)) {
      return invalid_argument("stop[{}] has {} bytes, must be in [1, {}]", i, stop[i].size(), kMaxStopStringBytes);
    }
  }
  if (stop_token_ids.size() > static_cast<size_t>(kMaxStopTokenIds)) {
    return invalid_argument("stop_token_ids has {} ids, must be in [0, {}]", stop_token_ids.size(),
                            kMaxStopTokenIds);
  }
  for (size_t i = 0; i < stop_token_ids.size(); ++i) {
    if (stop_token_ids[i] < 0 || stop_token_ids[i] >= n_vocab) {
      return invalid_argument("stop_token_ids[{}] = {} must be in [0, {})", i, stop_token_ids[i], n_vocab);
    }
  }
  if (logprobs && (*logprobs < 0 || *logprobs > kMaxLogprobs)) {
    return invalid_argument("logprobs = {} must be in [0, {}]", *logprobs, kMaxLogprobs);
  }
  return Status::ok_status();
}

Sampler::Sampler(const SamplingParams& params, int n_vocab) : params_(params), n_vocab_(n_vocab) {
  const Status st = params_.validate(n_vocab_);
  SS_CHECK(st.ok(), "{}", st.to_string());
  if (params_.seed) {
    seed_ = *params_.seed;
  } else {
    // random_device yields 32 bits per call.
    std::random_device rd;
    seed_ = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }
  rng_.seed(seed_);
  const size_t n = static_cast<size_t>(n_vocab_);
  if (params_.repetition_penalty != 1.0f) seen_stamp_.assign(n, 0);
  if (params_.frequency_penalty != 0.0f || params_.presence_penalty != 0.0f) counts_.assign(n, 0);
  if (params_.temperature > 0.0f) {
    order_.resize(n);
    weights_.resize(n);
    if (params_.top_k > 0 && params_.top_k < n_vocab_) {
      top_k_buffer_.reserve(2 * static_cast<size_t>(params_.top_k));
      if (static_cast<int64_t>(params_.top_k) * 16 > n_vocab_) marked_.resize(n);
    }
    if (params_.top_p < 1.0f) bucket_mass_.resize(kWeightBuckets);
  }
}

void apply_penalty_entries(const SamplingParams& params, std::span<float> logits, std::span<const int32_t> tokens,
                           std::span<const int32_t> counts) {
  SS_CHECK(tokens.size() == counts.size(), "{} penalty tokens, {} counts", tokens.size(), counts.size());
  const float rep = params.repetition_penalty;
  const float freq = params.frequency_penalty;
  const float presence = params.presence_penalty;
  const bool apply_rep = rep != 1.0f;
  const bool apply_freq = freq != 0.0f || presence != 0.0f;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int32_t t = tokens[i];
    SS_CHECK(t >= 0 && static_cast<size_t>(t) < logits.size(), "token {} not in [0, {})", t, logits.size());
    float l = logits[t];
    if (apply_rep) l = l > 0.0f ? l / rep : l * rep;
    if (apply_freq && counts[i] > 0) l -= freq * static_cast<float>(counts[i]) + presence;
    logits[t] = l;
  }
}

void Sampler::penalty_entries(std::span<const int32_t> prompt_tokens, std::span<const int32_t> generated_tokens,
                              std::vector<int32_t>* tokens, std::vector<int32_t>* counts) {
  tokens->clear();
  counts->clear();
  const bool rep = params_.repetition_penalty != 1.0f;
  const bool freq = params_.frequency_penalty != 0.0f || params_.presence_penalty != 0.0f;
  const auto check_token = [&](int32_t t) { SS_CHECK(t >= 0 && t < n_vocab_, "token {} not in [0, {})", t, n_vocab_); };
  if (freq) {
    for (int32_t t : generated_tokens) {
      check_token(t);
      ++counts_[t];
    }
  }
  if (rep) {
    // A stamp per call instead of clearing an n_vocab array: O(history) per step, not O(n_vocab).
    if (++stamp_ == 0) {
      std::fill(seen_stamp_.begin(), seen_stamp_.end(), 0u);
      stamp_ = 1;
    }
    // Each distinct token is penalised once, however often it occurs (HF / vLLM semantics).
    const auto add = [&](int32_t t) {
      check_token(t);
      if (seen_stamp_[t] == stamp_) return;
      seen_stamp_[t] = stamp_;
      tokens->push_back(t);
      counts->push_back(freq ? counts_[t] : 0);
    };
    for (int32_t t : prompt_tokens) add(t);
    for (int32_t t : generated_tokens) add(t);
    if (freq) {
      for (int32_t t : generated_tokens) counts_[t] = 0;
    }
  } else if (freq) {
    // Once per distinct token; restores counts_ to all zero.
    for (int32_t t : generated_tokens) {
      const int32_t c = counts_[t];
      if (c == 0) continue;
      tokens->push_back(t);
      counts->push_back(c);
      counts_[t] = 0;
    }
  }
}

int32_t Sampler::sample(std::span<float> logits, std::span<const int32_t> prompt_tokens,
                        std::span<const int32_t> generated_tokens, TokenLogprobs* logprobs_out) {
  SS_CHECK(logits.size() == static_cast<size_t>(n_vocab_), "logits has {} entries, n_vocab = {}", logits.size(),
           n_vocab_);
  penalty_entries(prompt_tokens, generated_tokens, &penalty_tokens_, &penalty_counts_);
  apply_penalty_entries(params_, logits, penalty_tokens_, penalty_counts_);
  const double u = params_.temperature > 0.0f ? draw_uniform() : 0.0;
  float max_logit = 0.0f;
  const int32_t token = pick(logits, u, &max_logit);
  if (logprobs_out != nullptr) fill_logprobs(logits, max_logit, token, logprobs_out);
  return token;
}

int32_t Sampler::choose(std::span<const float> penalised_logits, double u) {
  SS_CHECK(penalised_logits.size() == static_cast<size_t>(n_vocab_), "logits has {} entries, n_vocab = {}",
           penalised_logits.size(), n_vocab_);
  SS_CHECK(u >= 0.0 && u < 1.0, "u = {} not in [0, 1)", u);
  float max_logit = 0.0f;
  return pick(penalised_logits, u, &max_logit);
}

int32_t Sampler::pick(std::span<const float> logits, double u, float* max_out) {
  // Strict '>' keeps the lowest id among equal maxima. NaN is checked once after the loop (a NaN
  // would break the orderings used by truncation).
  float max_logit = -std::numeric_limits<float>::infinity();
  int32_t argmax = 0;
  bool any_nan = false;
  for (int32_t i = 0; i < n_vocab_; ++i) {
    const float x = logits[i];
    any_nan |= std::isnan(x);
    if (x > max_logit) {
      max_logit = x;
      argmax = i;
    }
  }
  SS_CHECK(!any_nan, "NaN in the logits");
  SS_CHECK(std::isfinite(max_logit), "max logit = {}: no token can be sampled", max_logit);
  *max_out = max_logit;
  return params_.temperature == 0.0f ? argmax : draw(logits, max_logit, u);
}

int32_t Sampler::select_top_k(std::span<const float> logits) {
  // One streaming pass: keep (logit, id) pairs above a threshold in a buffer; when it reaches 2k,
  // nth_element it down to its k best and raise the threshold to the k-th. Almost every logit
  // then fails one comparison, so this is O(n_vocab) with sequential access, far cheaper than
  // nth_element over all n_vocab. A dropped logit is <= the threshold while k kept pairs are >= it
  // with lower ids (ids arrive in increasing order), so it is never among the k best in Before
  // order, ties included. Until the first shrink everything is kept, so -inf logits still fill k.
  const int32_t k = params_.top_k;
  const size_t cap = 2 * static_cast<size_t>(k);
  const auto better = [](const TopKEntry& a, const TopKEntry& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
  };
  top_k_buffer_.clear();
  float threshold = 0.0f;
  bool shrunk = false;
  const auto shrink = [&] {
    std::nth_element(top_k_buffer_.begin(), top_k_buffer_.begin() + (k - 1), top_k_buffer_.end(), better);
    top_k_buffer_.resize(static_cast<size_t>(k));
    threshold = top_k_buffer_[k - 1].logit;
    shrunk = true;
  };
  for (int32_t i = 0; i < n_vocab_; ++i) {
    const float x = logits[i];
    if (!shrunk || x > threshold) {
      top_k_buffer_.push_back({x, i});
      if (top_k_buffer_.size() == cap) shrink();
    }
  }
  if (top_k_buffer_.size() > static_cast<size_t>(k)) shrink();
  // The candidates in increasing id: sort a small k; for a large one, flag them and list the
  // flags, O(n_vocab) instead of O(k log k).
  if (static_cast<int64_t>(k) * 16 <= n_vocab_) {
    for (int32_t j = 0; j < k; ++j) order_[j] = top_k_buffer_[j].id;
    std::sort(order_.begin(), order_.begin() + k);
  } else {
    std::fill(marked_.begin(), marked_.end(), uint8_t{0});
    for (const TopKEntry& e : top_k_buffer_) marked_[e.id] = 1;
    int32_t j = 0;
    for (int32_t i = 0; i < n_vocab_; ++i) {
      if (marked_[i]) order_[j++] = i;
    }
  }
  return k;
}

int32_t Sampler::select_top_p(std::span<const float> logits, int32_t n, double total) {
  // The nucleus is the shortest prefix, in Before order, whose mass reaches top_p * total. Instead
  // of sorting all candidates: sum the mass per weight bucket, walk buckets from the top to find
  // the one where the running mass crosses the target, keep every bucket above it, and sort only
  // that boundary bucket to find the last kept token. O(n) plus a sort of one bucket.
  const double target = static_cast<double>(params_.top_p) * total;
  std::fill(bucket_mass_.begin(), bucket_mass_.end(), 0.0);
  for (int32_t j = 0; j < n; ++j) {
    const float w = weights_[order_[j]];
    bucket_mass_[weight_bucket(w)] += w;
  }
  double above = 0.0;  // mass of the buckets above `boundary`
  int boundary = kWeightBuckets - 1;
  for (; boundary >= 0; --boundary) {
    if (above + bucket_mass_[boundary] >= target) break;
    above += bucket_mass_[boundary];
  }
  if (boundary < 0) return n;  // rounding left the whole mass just below target: keep everything

  boundary_.clear();
  for (int32_t j = 0; j < n; ++j) {
    const int32_t id = order_[j];
    if (weight_bucket(weights_[id]) == boundary) boundary_.push_back(id);
  }
  const Before before{logits};
  std::sort(boundary_.begin(), boundary_.end(), before);
  int32_t last = boundary_.back();  // the last kept token in Before order (all, if rounding never reaches target)
  double cum = above;
  for (int32_t id : boundary_) {
    cum += weights_[id];
    if (cum >= target) {
      last = id;
      break;
    }
  }
  // Compact in place (kept <= j), which keeps the increasing id order: every bucket above the
  // boundary, and the boundary bucket's tokens up to `last` in Before order.
  int32_t kept = 0;
  for (int32_t j = 0; j < n; ++j) {
    const int32_t id = order_[j];
    const int bucket = weight_bucket(weights_[id]);
    if (bucket > boundary || (bucket == boundary && !before(last, id))) order_[kept++] = id;
  }
  return kept;
}

int32_t Sampler::draw(std::span<const float> logits, float max_logit, double u) {
  // Candidates are order_[0, n), in increasing id from here on, so every sum below and the walk
  // run in id order whatever the truncation did.
  int32_t n = n_vocab_;
  const int top_k = params_.top_k;
  if (top_k > 0 && top_k < n_vocab_) {
    n = select_top_k(logits);
  } else {
    std::iota(order_.begin(), order_.end(), 0);
  }

  // Unnormalised probabilities; the max logit is always a candidate, so its weight is exp(0) = 1
  // and every weight is in [0, 1] (subtracting the max first keeps exp from overflowing at any T).
  const float inv_t = 1.0f / params_.temperature;
  double total = 0.0;
  for (int32_t j = 0; j < n; ++j) {
    const int32_t id = order_[j];
    const float w = sampling_weight(logits[id], max_logit, inv_t);
    weights_[id] = w;
    total += w;
  }

  const bool truncate_p = params_.top_p < 1.0f;
  if (truncate_p) n = select_top_p(logits, n, total);
  if (params_.min_p > 0.0f) {
    // prob / max prob = weight / 1, and renormalisation does not change the ratio, so min-p after
    // top-k/top-p is a threshold on the weights.
    int32_t kept = 0;
    for (int32_t j = 0; j < n; ++j) {
      const int32_t id = order_[j];
      if (weights_[id] >= params_.min_p) order_[kept++] = id;
    }
    n = kept;
  }
  SS_CHECK(n >= 1, "no candidate left after truncation");
  if (truncate_p || params_.min_p > 0.0f) {
    total = 0.0;
    for (int32_t j = 0; j < n; ++j) total += weights_[order_[j]];
  }

  // Inverse-CDF draw over the survivors in increasing id: the first whose cumulative weight exceeds
  // u * total (renormalising is implicit in scaling u by their total).
  double rest = u * total;
  int32_t last_positive = order_[0];
  for (int32_t j = 0; j < n; ++j) {
    const int32_t id = order_[j];
    const float w = weights_[id];
    if (w <= 0.0f) continue;
    last_positive = id;
    rest -= w;
    if (rest < 0.0) return id;
  }
  return last_positive;  // u * total landed on the total through rounding
}

void Sampler::fill_logprobs(std::span<const float> logits, float max_logit, int32_t token, TokenLogprobs* out) const {
  // log_z = max + log(sum exp(l - max)): the shift keeps exp in range; the sum is in double because
  // 128K terms in float would lose ~1e-3 relative.
  double sum = 0.0;
  for (float x : logits) sum += std::exp(x - max_logit);
  const double log_z = static_cast<double>(max_logit) + std::log(sum);
  out->token = token;
  out->logprob = static_cast<float>(static_cast<double>(logits[token]) - log_z);

  const Before before{logits};
  const size_t top_n = static_cast<size_t>(params_.logprobs.value_or(0));
  out->top.clear();
  if (top_n == 0) return;
  // Running top-N kept sorted; N <= 20, so insertion beats a heap and most tokens fail the first
  // comparison with the current N-th.
  std::vector<int32_t> best;
  best.reserve(top_n + 1);
  for (int32_t i = 0; i < n_vocab_; ++i) {
    if (best.size() == top_n && !before(i, best.back())) continue;
    best.insert(std::upper_bound(best.begin(), best.end(), i, before), i);
    if (best.size() > top_n) best.pop_back();
  }
  out->top.reserve(best.size());
  for (int32_t id : best) {
    out->top.push_back({id, static_cast<float>(static_cast<double>(logits[id]) - log_z)});
  }
}

double Sampler::draw_uniform() {
  // The top 53 bits fill a double's mantissa exactly: u = k * 2^-53, k uniform in [0, 2^53).
  return static_cast<double>(rng_() >> 11) * 0x1.0p-53;
}

}  // namespace starserve
