// Next-token scores of the tokens a forward runs (prompt log-probabilities): for token i of a
// sequence, the natural-log probability of the token that follows it under the model's own
// next-token distribution at i (the log-softmax of the logits: no penalties, no temperature), and
// the top_k most likely tokens there. The model computes them from the final hidden states in
// slices of rows (score_slice_rows), so a long prompt never holds (n_tokens, n_vocab) logits at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace starserve {

struct TopToken {
  int32_t token = 0;
  float logprob = 0.0f;  // natural log
};

struct ScoredToken {
  int64_t position = 0;       // the scored token's position (BatchSeq::positions), not its target's
  int32_t target = 0;         // the token that follows it
  float logprob = 0.0f;       // ln p(target | tokens up to and including this one)
  std::vector<TopToken> top;  // top_k by logprob, most likely first (ties: lower id first)
};

// What a sequence of a forward asks to be scored (BatchSeq::scores).
struct ScoreRequest {
  std::span<const int32_t> targets;          // one per token of the sequence; < 0: that token is not scored
  int top_k = 0;                             // alternatives per scored token, >= 0
  std::vector<ScoredToken>* out = nullptr;   // scored tokens are appended here, in token order
};

// Host memory of one slice of fp32 logits rows while scoring.
inline constexpr size_t kScoreSliceBytes = size_t{32} << 20;

// Rows per slice for a vocabulary of n_vocab: kScoreSliceBytes of fp32 rows, at least 1.
int64_t score_slice_rows(int n_vocab);

// out->logprob and out->top of one row of logits (n_vocab); position and target are the caller's.
// log Z in double (a float sum over 100K+ terms loses ~1e-3 relative), as the sampler's logprobs.
void score_logits_row(std::span<const float> logits, int32_t target, int top_k, ScoredToken* out);

}  // namespace starserve
