// Token sampling on the GPU with the host Sampler's semantics (src/engine/sampling.h), one row per
// request: the penalties from a list of (token, count) entries, then the argmax (temperature 0) or
// temperature, top-k, top-p, min-p and the inverse-CDF draw at u over the survivors in increasing
// token id. Given the same logits, entries, parameters and u, the token equals the host's
// (Sampler::choose after apply_penalty_entries) except where u * total or the top-p target lies
// within double rounding of a cumulative sum: both sides sum the same float weights, in different
// orders. The penalised logits are written back bit-identical to the host's.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace starserve {

// One row's request, in device memory. Fields as SamplingParams (validated there); values outside
// the ranges degrade to "off" (top_k <= 0 or >= n_vocab, top_p >= 1).
struct SampleRowParams {
  double u;                  // uniform draw in [0, 1) (Sampler::draw_uniform); unused when greedy
  float temperature;         // 0: greedy (argmax, ties to the lower id)
  float top_p;
  float min_p;
  float repetition_penalty;  // 1: off
  float frequency_penalty;   // 0: off
  float presence_penalty;    // 0: off
  int32_t top_k;             // 0: off
  int32_t n_vocab;           // columns [0, n_vocab) of the row are sampled; in [1, ld]
  int32_t penalty_begin;     // this row's entries: penalty_tokens / penalty_counts [begin, begin + count)
  int32_t penalty_count;
};

// out: (rows) int32, the chosen token; -1 for a row that holds a NaN or no finite logit after the
// penalties (the host Sampler aborts there) or whose n_vocab is not in [1, ld].
// logits: (rows, ld) fp32, row-major; columns [0, n_vocab) of each row receive the penalised
// logits in place (what the logprobs path reads); the rest is untouched.
// params: (rows) device. penalty_tokens, penalty_counts: device arrays of the entries built by
// Sampler::penalty_entries (distinct tokens per row; a token outside [0, n_vocab) is skipped);
// they may be null when every row has penalty_count 0.
// rows >= 0, ld in [1, 2^31 - 1]. Few rows are each split over several blocks, with a scratch
// taken from a stream-ordered pool on `stream` and released there (kernels/sampling.cu).
cudaError_t launch_sample_rows(int32_t* out, float* logits, const SampleRowParams* params,
                               const int32_t* penalty_tokens, const int32_t* penalty_counts, int64_t rows,
                               int64_t ld, cudaStream_t stream);

}  // namespace starserve
