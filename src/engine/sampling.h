// Token sampling for one request: penalties, greedy or temperature sampling with top-k / top-p /
// min-p truncation, and log-probabilities. Semantics follow the OpenAI API and vLLM so requests
// written for those servers behave the same here.
//
// Pipeline of Sampler::sample (the order vLLM and HF transformers use):
//   1. repetition penalty (CTRL "penalized sampling", Keskar et al. 2019; HF form) over prompt + generated
//   2. frequency / presence penalties (OpenAI) over generated tokens only
//   -- logprobs are taken here: log-softmax of the penalised logits, before temperature/truncation --
//   3. temperature == 0: argmax (ties -> lowest token id), done
//   4. temperature scaling
//   5. top-k  6. top-p (nucleus sampling, Holtzman et al. 2020)  7. min-p (Nguyen et al. 2024)
//   8. renormalise over the survivors and draw one token: inverse CDF at u, the step's one uniform
//      draw from the sampler's own RNG, walking the survivors in increasing token id
// Ties anywhere (argmax, the top-k edge, the top-p edge) go to the lower token id.
//
// Steps 3-8 make the token a function of (penalised logits, params, u) alone (Sampler::choose),
// whatever order the truncation steps leave their candidates in; the GPU (kernels/sampling.cu)
// repeats exactly these steps and is checked against this code. The penalties are expressed as a
// list of (token, count) entries (Sampler::penalty_entries, apply_penalty_entries) that a device
// receives as is.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace starserve {

// Limits enforced by SamplingParams::validate. Where OpenAI documents a range we use it; elsewhere
// the bound only keeps a request from asking for something meaningless or unbounded.
inline constexpr float kMaxTemperature = 100.0f;         // vLLM has no bound; >~10 is already near uniform
inline constexpr float kMaxRepetitionPenalty = 10.0f;    // HF/vLLM only need > 0; 1.0-1.3 is the useful range
inline constexpr float kMaxAbsTokenPenalty = 2.0f;       // OpenAI: frequency/presence in [-2, 2]
inline constexpr int kMaxLogprobs = 20;                  // OpenAI: top_logprobs in [0, 20]
inline constexpr int kMaxMaxTokens = 1 << 20;            // tokens; the context limit is checked elsewhere
inline constexpr int kMaxStopStrings = 16;               // OpenAI allows 4; vLLM is unbounded
inline constexpr int kMaxStopStringBytes = 256;          // bytes per stop string
inline constexpr int kMaxStopTokenIds = 256;

struct SamplingParams {
  float temperature = 1.0f;          // 0 = greedy (argmax); else logits are divided by it
  int top_k = 0;                     // keep the k most likely tokens; 0 = off
  float top_p = 1.0f;                // keep the smallest set of most likely tokens with mass >= top_p; 1 = off
  float min_p = 0.0f;                // drop tokens with prob < min_p * max prob; 0 = off
  float repetition_penalty = 1.0f;   // over prompt + generated: logit > 0 divided, < 0 multiplied; 1 = off
  float frequency_penalty = 0.0f;    // logit -= frequency_penalty * count in generated; 0 = off
  float presence_penalty = 0.0f;     // logit -= presence_penalty if the token was generated; 0 = off
  std::optional<uint64_t> seed;      // unset: a random seed (Sampler::seed() reports it)
  int max_tokens = 16;               // tokens to generate at most
  std::vector<std::string> stop;     // stop strings; excluded from the output (OpenAI)
  std::vector<int32_t> stop_token_ids;  // tokens that end generation (in addition to EOS)
  bool ignore_eos = false;           // keep generating after the model's end-of-sequence tokens
  std::optional<int> logprobs;       // report the chosen token's logprob and the top-N, N in [0, 20]

  // kInvalidArgument naming the field, its value and the allowed range, e.g.
  // "top_p = 1.5 must be in (0, 1]". n_vocab bounds top_k and stop_token_ids.
  Status validate(int n_vocab) const;
};

// The unnormalised probability of a candidate, exp((logit - max_logit) / T), as the sampler and
// the GPU kernel compute it: the argument in float, (logit - max_logit) * inv_t with
// inv_t = 1.0f / T, then the double exp rounded once to float. Why double: float expf differs by an
// ulp or two between libms and CUDA, which would move the draw's CDF boundaries; glibc's and CUDA's
// double exp are both within 1 ulp, so the rounded floats agree except with probability ~2^-28 per
// element (the exact value within an ulp of double of a float rounding point).
inline float sampling_weight(float logit, float max_logit, float inv_t) {
  return static_cast<float>(std::exp(static_cast<double>((logit - max_logit) * inv_t)));
}

// Applies steps 1-2 of the pipeline from entries built by Sampler::penalty_entries: for each i,
// logits[tokens[i]] is divided (> 0) or multiplied (<= 0) by repetition_penalty when that is not 1,
// then, when counts[i] > 0 and a frequency/presence penalty is set, decreased by
// frequency_penalty * counts[i] + presence_penalty (the product rounded before the sum). tokens are
// distinct and in [0, logits.size()) (checked).
void apply_penalty_entries(const SamplingParams& params, std::span<float> logits, std::span<const int32_t> tokens,
                           std::span<const int32_t> counts);

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;  // natural log
};

// Log-probabilities: the log-softmax of the logits AFTER penalties and BEFORE temperature and
// truncation. Chosen so the numbers describe the distribution the request's penalties produced,
// independent of how temperature/top-k/top-p/min-p narrowed the draw: a greedy or top-k=1 request
// still reports the model's confidence instead of logprob 0, and the full-vocab probabilities sum to 1.
struct TokenLogprobs {
  int32_t token = 0;           // the chosen token
  float logprob = 0.0f;        // its logprob
  std::vector<TokenLogprob> top;  // top-N by logprob, descending (ties: lower id first)
};

// One per request; owns scratch buffers sized by n_vocab, so it is reused across steps and is not
// thread-safe. Reproducibility: with the same seed, the same n_vocab and the same sequence of
// logits (and token histories), sample() returns the same tokens. Across machines this holds up to
// the libm's double exp (see sampling_weight): the RNG is std::mt19937_64, whose output the
// standard fixes, and the uniform draw is built from its bits here rather than by a std::
// distribution, whose algorithm differs between standard libraries.
// Each non-greedy call consumes exactly one 64-bit draw; greedy calls consume none.
// A device path reproduces sample() as: penalty_entries + (temperature > 0 ? draw_uniform() : 0),
// both on the host, then the device applies the entries and picks what choose() would.
class Sampler {
 public:
  // params must have passed validate(n_vocab) (checked: a broken invariant aborts).
  Sampler(const SamplingParams& params, int n_vocab);

  // logits: (n_vocab) raw scores of the next token; on return they hold the penalised logits
  // (before temperature). prompt_tokens / generated_tokens: the history the penalties look at.
  // logprobs_out: filled when non-null, with top-N = params.logprobs (0 when unset).
  int32_t sample(std::span<float> logits, std::span<const int32_t> prompt_tokens,
                 std::span<const int32_t> generated_tokens, TokenLogprobs* logprobs_out);

  // Steps 3-8 alone: the token picked from already penalised logits (n_vocab) with the uniform
  // draw u in [0, 1) (ignored when temperature == 0). Consumes no random draw; the result depends
  // on (logits, params, u) only.
  int32_t choose(std::span<const float> penalised_logits, double u);

  // The next uniform draw in [0, 1) (53 random bits) from the sampler's RNG: the u that sample()
  // takes in a non-greedy step.
  double draw_uniform();

  // The entries apply_penalty_entries needs for this history, each token once: with a repetition
  // penalty every distinct token of prompt + generated, otherwise the distinct generated tokens;
  // counts = occurrences in generated_tokens (0: prompt only). Both empty when no penalty is set.
  // O(history): the scratch is stamped, not cleared.
  void penalty_entries(std::span<const int32_t> prompt_tokens, std::span<const int32_t> generated_tokens,
                       std::vector<int32_t>* tokens, std::vector<int32_t>* counts);

  uint64_t seed() const { return seed_; }
  const SamplingParams& params() const { return params_; }

 private:
  // Max / argmax / NaN scan, then greedy or draw(); *max_logit receives the max.
  int32_t pick(std::span<const float> logits, double u, float* max_logit);
  void fill_logprobs(std::span<const float> logits, float max_logit, int32_t token, TokenLogprobs* out) const;
  int32_t draw(std::span<const float> logits, float max_logit, double u);
  // Fill order_[0, k) with the top-k candidates in increasing id and return k.
  int32_t select_top_k(std::span<const float> logits);
  // Keep the nucleus of order_[0, n) (weights_ set, total = their sum), in increasing id; returns
  // the new n.
  int32_t select_top_p(std::span<const float> logits, int32_t n, double total);

  SamplingParams params_;
  int n_vocab_ = 0;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  // Scratch, allocated only when the params need them.
  std::vector<uint32_t> seen_stamp_;  // (n_vocab) repetition penalty: seen_stamp_[t] == stamp_ -> already penalised
  uint32_t stamp_ = 0;
  std::vector<int32_t> counts_;       // (n_vocab) occurrences in generated; all zero between calls
  std::vector<int32_t> penalty_tokens_, penalty_counts_;  // sample(): this step's penalty entries
  std::vector<int32_t> order_;        // (n_vocab) candidate token ids, increasing: order_[0, n) survive truncation
  std::vector<uint8_t> marked_;       // (n_vocab) top-k with large k: candidate flags, to list them by id
  std::vector<float> weights_;        // (n_vocab) exp((logit - max) / T) by token id, valid for candidates
  struct TopKEntry {
    float logit;
    int32_t id;
  };
  std::vector<TopKEntry> top_k_buffer_;  // (<= 2 top_k) top-k: candidates above the running threshold
  std::vector<double> bucket_mass_;   // (kWeightBuckets) top-p: candidate mass per weight bucket
  std::vector<int32_t> boundary_;     // top-p: candidates in the bucket where the nucleus ends
};

}  // namespace starserve
