// Tiled partial attention for the CPU backend: the same contract as partial_attention_ref
// (kernels/ref/attention_ref.h) with the score and value products done as small GEMMs through
// OpenBLAS, flash-attention style (online softmax per query tile over key tiles), so long contexts
// run at BLAS speed instead of scalar loops. Checked against the reference in test_cpu_attention.cpp.
#pragma once

#include "kernels/ref/attention_ref.h"

namespace starserve {

void partial_attention_cpu(const PartialAttentionParams& p);

}  // namespace starserve
