// Exact merge of attention partials across shards (phase 2 of Star Attention): the all-gather form
// (one warp per row over every shard's partials) and the all-reduce form's two element-wise halves.
#include "kernels/attention/attention.h"
#include "kernels/attention/common.cuh"

#include <algorithm>

namespace starserve {
namespace {

using detail::kNegInfF;

struct PartTable {
  AttentionPartialGpu parts[kMergeMaxParts];
};

// out, lse, entropy: (n_rows, head_dim), (n_rows), (n_rows). Grid-stride over rows, 8 warps per block.
__global__ void merge_partials_kernel(float* out, float* lse, float* entropy, PartTable table, int n_parts,
                                      int64_t n_rows, int head_dim) {
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  bool all_entropy = true;
  for (int h = 0; h < n_parts; ++h) all_entropy = all_entropy && table.parts[h].entropy != nullptr;
  for (int64_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < n_rows; r += warps_per_grid) {
    detail::merge_row_warp(
        out + r * head_dim, lse + r, entropy ? entropy + r : nullptr, n_parts, head_dim,
        [&](int h, int c) { return table.parts[h].out[r * head_dim + c]; },
        [&](int h) { return table.parts[h].lse[r]; },
        [&](int h) { return all_entropy ? table.parts[h].entropy[r] : 0.0f; });
  }
}

// One thread per term: row r = i / width, column c = i % width; e recomputed per thread (cheap
// next to the memory traffic). Zeros where this shard or every shard is empty.
__global__ void merge_sum_terms_kernel(float* terms, const float* out, const float* lse, const float* entropy,
                                       const float* max_lse, int64_t n_rows, int head_dim) {
  const int64_t width = int64_t{head_dim} + 3, total = n_rows * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / width;
    const int c = static_cast<int>(i - r * width);
    const float m = max_lse[r], l = lse[r];
    float v = 0.0f;
    if (m != kNegInfF && l != kNegInfF) {
      const float e = expf(l - m);
      if (c < head_dim) v = e * out[r * head_dim + c];
      else if (c == head_dim) v = e;
      else if (c == head_dim + 1) v = entropy ? e * entropy[r] : 0.0f;
      else v = e * (l - m);
    }
    terms[i] = v;
  }
}

// One thread per output element; column 0's thread also writes LSE and H.
__global__ void merge_sum_finish_kernel(float* out, float* lse, float* entropy, const float* terms,
                                        const float* max_lse, int64_t n_rows, int head_dim) {
  const int64_t width = int64_t{head_dim} + 3, total = n_rows * head_dim;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / head_dim;
    const int c = static_cast<int>(i - r * head_dim);
    const float* row = terms + r * width;
    const float den = row[head_dim];
    if (den == 0.0f) {
      out[i] = 0.0f;
      if (c == 0) {
        lse[r] = kNegInfF;
        if (entropy) entropy[r] = 0.0f;
      }
      continue;
    }
    const float inv = 1.0f / den;  // den >= 1: the shard holding the max has e = 1
    out[i] = row[c] * inv;
    if (c == 0) {
      const float log_den = logf(den);
      lse[r] = max_lse[r] + log_den;
      if (entropy) entropy[r] = fmaxf(0.0f, row[head_dim + 1] * inv - row[head_dim + 2] * inv + log_den);
    }
  }
}

unsigned elementwise_blocks(int64_t n, int threads) {
  return static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 4096));
}

}  // namespace

cudaError_t launch_merge_sum_terms(float* terms, const float* out, const float* lse, const float* entropy,
                                   const float* max_lse, int64_t n_rows, int head_dim, cudaStream_t stream) {
  if (head_dim <= 0 || n_rows < 0) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  merge_sum_terms_kernel<<<elementwise_blocks(n_rows * (head_dim + 3), kThreads), kThreads, 0, stream>>>(
      terms, out, lse, entropy, max_lse, n_rows, head_dim);
  return cudaGetLastError();
}

cudaError_t launch_merge_sum_finish(float* out, float* lse, float* entropy, const float* terms,
                                    const float* max_lse, int64_t n_rows, int head_dim, cudaStream_t stream) {
  if (head_dim <= 0 || n_rows < 0) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  merge_sum_finish_kernel<<<elementwise_blocks(n_rows * head_dim, kThreads), kThreads, 0, stream>>>(
      out, lse, entropy, terms, max_lse, n_rows, head_dim);
  return cudaGetLastError();
}

cudaError_t launch_merge_partials(float* out, float* lse, float* entropy, const AttentionPartialGpu* parts,
                                  int n_parts, int64_t n_rows, int head_dim, cudaStream_t stream) {
  if (n_parts < 1 || n_parts > kMergeMaxParts || head_dim <= 0 || n_rows < 0) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  PartTable table{};
  for (int h = 0; h < n_parts; ++h) table.parts[h] = parts[h];
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n_rows + 7) / 8, 65535);
  merge_partials_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(out, lse, entropy, table, n_parts,
                                                                                 n_rows, head_dim);
  return cudaGetLastError();
}

}  // namespace starserve
