// Exact merge of attention partials across shards (phase 2 of Star Attention), one warp per row.
#include "kernels/attention.h"
#include "kernels/attention_common.cuh"

#include <algorithm>

namespace starserve {
namespace {

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

}  // namespace

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
