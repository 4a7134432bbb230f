// CUDA partial attention with LSE and entropy (bf16 inputs, fp32 accumulation), and the exact
// merge of partials. Same contract as kernels/ref/attention_ref.h: O normalised within the keys
// seen, LSE in natural log (-inf when no key is visible), entropy in nats (0 when none).
// Online softmax with the running entropy value u of shared spec entropy.md; the kernels work in
// base 2 (exp2) and convert at the end.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace starserve {

// One contiguous KV run per call (a KV page list is a later step).
// Query row i sees key j iff !causal || j <= i + causal_offset (AttentionMask in attention_ref.h).
struct AttentionGpuParams {
  void* out = nullptr;               // (n_q, n_heads, head_dim): bf16, or fp32 when out_fp32
  bool out_fp32 = false;
  float* lse = nullptr;              // (n_q, n_heads)
  float* entropy = nullptr;          // (n_q, n_heads); may be null (then not computed)
  const __nv_bfloat16* q = nullptr;  // (n_q, n_heads, head_dim)
  const __nv_bfloat16* k = nullptr;  // (n_kv, n_kv_heads, head_dim)
  const __nv_bfloat16* v = nullptr;  // (n_kv, n_kv_heads, head_dim)
  int64_t n_q = 0;
  int64_t n_kv = 0;
  int n_heads = 0;
  int n_kv_heads = 0;                // n_heads % n_kv_heads == 0; head h reads kv head h / (n_heads / n_kv_heads)
  int head_dim = 0;                  // 64 or 128
  float scale = 1.0f;                // usually 1/sqrt(head_dim)
  bool causal = true;
  int64_t causal_offset = 0;
};

// Prefill / block-local attention (phase 1, and any n_q): tensor-core tiles of 64 queries x 64 keys,
// grid (query tiles, heads). Returns cudaErrorInvalidValue for unsupported shapes.
cudaError_t launch_prefill_attention(const AttentionGpuParams& p, cudaStream_t stream);

// Decode attention (flash-decoding): few query rows (n_q <= kDecodeMaxQ) against long KV. Pass 1
// splits the keys into chunks, each giving (O, LSE, H) per row; pass 2 merges the chunks with the
// same exact merge as the shards. workspace: device memory of decode_attention_workspace_bytes(p).
constexpr int64_t kDecodeMaxQ = 64;
size_t decode_attention_workspace_bytes(const AttentionGpuParams& p);
cudaError_t launch_decode_attention(const AttentionGpuParams& p, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream);

// One shard's partial, on the device, as the kernels above write it with out_fp32.
struct AttentionPartialGpu {
  const float* out = nullptr;      // (n_rows, head_dim)
  const float* lse = nullptr;      // (n_rows)
  const float* entropy = nullptr;  // (n_rows); may be null when no shard carries entropy
};

// Exact merge of up to kMergeMaxParts shards (merge_partials_ref semantics; entropy.md chain rule).
// Rows where every shard is empty give O = 0, LSE = -inf, H = 0, never NaN. entropy may be null.
constexpr int kMergeMaxParts = 16;
cudaError_t launch_merge_partials(float* out, float* lse, float* entropy, const AttentionPartialGpu* parts,
                                  int n_parts, int64_t n_rows, int head_dim, cudaStream_t stream);

}  // namespace starserve
