// CPU references for the element-wise and normalisation ops of a Llama-family block.
// Argument order follows the kernel launchers: outputs first, then inputs, then sizes.
#pragma once

#include <cstdint>

#include "model/hparams.h"

namespace starserve {

// out, in: (n_tokens, hidden); weight: (hidden). out = in / sqrt(mean(in^2) + eps) * weight. In-place allowed.
void rms_norm_ref(float* out, const float* in, const float* weight, int64_t n_tokens, int hidden, float eps);

// x: (n_tokens, n_heads, head_dim), rotated in place. positions: (n_tokens).
// inv_freq: (rope_dim / 2) angular frequency per pair, scaling already applied.
// Only the first rope_dim dimensions of each head rotate; pairing per RopeStyle.
void rope_ref(float* x, const int32_t* positions, const float* inv_freq, int64_t n_tokens, int n_heads,
              int head_dim, int rope_dim, RopeStyle style);

// out = silu(gate) * up, all (n) elements. out may alias gate.
void swiglu_ref(float* out, const float* gate, const float* up, int64_t n);

// out = a + b over n elements. out may alias a.
void add_ref(float* out, const float* a, const float* b, int64_t n);

// out: (n_tokens, hidden) = table[ids[t]]; table: (n_vocab, hidden). ids must be in range.
void embedding_ref(float* out, const float* table, const int32_t* ids, int64_t n_tokens, int hidden);

}  // namespace starserve
