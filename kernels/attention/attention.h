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

// The keys of one call are either one contiguous run (k, v) or a page table (k_pages, v_pages).
// Query row i sees key j iff (!causal || j <= i + causal_offset) and j >= window_first_key(p, i)
// (AttentionMask in attention_ref.h).
struct AttentionGpuParams {
  void* out = nullptr;               // (n_q, n_heads, head_dim): bf16, or fp32 when out_fp32
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
  bool out_fp32 = false;             // (beside causal: the struct is a decode batch's kernel parameter, < 4 KB)
  bool causal = true;
  int64_t causal_offset = 0;
  // Paged keys (optional): when k_pages is non-null, logical key j lives in page j >> page_shift,
  // row j & ((1 << page_shift) - 1); pages are (page_size, n_kv_heads, head_dim) bf16.
  // page_shift >= 6 (pages of at least 64 keys, so a 64-key tile never straddles two pages).
  // k and v are then ignored; both tables hold ceil(n_kv / page_size) device pointers, and only
  // the rows of keys j < n_kv are read (the last page may be partly filled).
  const __nv_bfloat16* const* k_pages = nullptr;  // device array of page pointers
  const __nv_bfloat16* const* v_pages = nullptr;
  int page_shift = 0;                              // in [kMinPageShift, kMaxPageShift] when paged
  // Attention logit soft-capping: each scaled score s becomes softcap * tanh(s / softcap) before
  // the mask and the softmax, so O, LSE and H are those of the capped scores. 0 = off.
  float softcap = 0.0f;
  // Paged keys, optional: the pools that hold every page of the tables. k_pool .. k_pool +
  // pool_rows rows (a row is n_kv_heads * head_dim bf16) hold every page of k_pages, each page
  // starting on a whole row; the same for v_pool and v_pages. Given these (and pools under 4 GB),
  // the wgmma kernel reads the pages with the TMA through one tensor map per pool; without them it
  // copies with cp.async. The other kernels ignore them.
  const __nv_bfloat16* k_pool = nullptr;
  const __nv_bfloat16* v_pool = nullptr;
  int64_t pool_rows = 0;
  // Sliding window (AttentionMask in attention_ref.h, same fields and rule): window > 0 also hides
  // key j from query row i unless qpos(i) - kpos(j) < window, qpos(i) = i + window_offset,
  // kpos(j) = j + (j >= key_gap_from ? key_gap : 0). The visible keys of a row stay one range
  // [window_first_key(p, i), causal bound]; every kernel skips the key tiles wholly before it.
  int64_t window = 0;
  int64_t window_offset = 0;
  int64_t key_gap_from = 0;
  int64_t key_gap = 0;
  // Per-row key limit (AttentionMask::key_limit): device array (n_q) or null; row i also sees only
  // keys j < key_limit[i]. Only launch_attention_small_head takes it (any head_dim up to
  // kSmallHeadMaxDim); the other launchers refuse it (cudaErrorInvalidValue).
  const int32_t* key_limit = nullptr;
};

// The first key index query row i sees under the window (AttentionMask::first_visible); 0
// without one. Non-decreasing in i.
__host__ __device__ inline int64_t window_first_key(const AttentionGpuParams& p, int64_t i) {
  if (p.window <= 0) return 0;
  const int64_t lo = i + p.window_offset - p.window + 1;  // smallest visible key position
  if (lo <= 0) return 0;
  if (lo < p.key_gap_from) return lo;
  return lo - p.key_gap > p.key_gap_from ? lo - p.key_gap : p.key_gap_from;
}

constexpr int kMinPageShift = 6;
constexpr int kMaxPageShift = 30;

// Prefill / block-local attention (phase 1, and any n_q) on tensor cores. Returns
// cudaErrorInvalidValue for unsupported shapes (head_dim other than 64 or 128), and when paged with
// only one of k_pages / v_pages or page_shift outside [kMinPageShift, kMaxPageShift]. The kernels
// that ship, each chosen by --prefill-kernel (CudaBackendOptions::Prefill):
//   auto   launch_prefill_attention: the wgmma kernel on sm_90 devices with sm_90a code in the
//          build, the mma.sync kernel elsewhere.
//   wgmma  launch_prefill_attention_wgmma (FlashAttention-3 style, prefill_wgmma.cuh): Hopper's
//          warpgroup MMA, 128 query rows x 128-key tiles, a producer warpgroup (three stages,
//          mbarriers) and two consumer warpgroups (wgmma, operands from swizzled shared memory;
//          each consumer's softmax of tile j overlaps its own P V of tile j - 1). The producer
//          copies K and V with the TMA where it can (contiguous keys; paged keys with k_pool /
//          v_pool given), else with cp.async. Needs a build with sm_90a code and a compute
//          capability 9.0 device (prefill_wgmma_supported); otherwise cudaErrorNotSupported.
//   mma    launch_prefill_attention_mma (FlashAttention-2 style, prefill_mma.cuh): mma.sync on
//          sm_80 and later, 128 query rows per block, 32 per warp (each K / V fragment feeds two
//          m16 tiles), lean softmax: 350 / 340 TFLOP/s on the H200 (docs/perf.md).
// The kernels they superseded and their other configurations keep the same contract and are in
// kernels/baselines/ (prefill_baselines.h), for the benchmark and the parity tests only.
bool prefill_wgmma_supported();
cudaError_t launch_prefill_attention(const AttentionGpuParams& p, cudaStream_t stream);
cudaError_t launch_prefill_attention_wgmma(const AttentionGpuParams& p, cudaStream_t stream);
cudaError_t launch_prefill_attention_mma(const AttentionGpuParams& p, cudaStream_t stream);

// Decode attention (flash-decoding): few query rows (n_q <= kDecodeMaxQ) against long KV. Pass 1
// splits the keys into chunks, each giving (O, LSE, H) per row; pass 2 merges the chunks with the
// same exact merge as the shards. workspace: device memory of decode_attention_workspace_bytes(p),
// which depends on the shape only (paged or not). Same paging validation as prefill.
constexpr int64_t kDecodeMaxQ = 64;
size_t decode_attention_workspace_bytes(const AttentionGpuParams& p);
cudaError_t launch_decode_attention(const AttentionGpuParams& p, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream);

// Several sequences' decode attention in two launches (pass 1 and pass 2 over all of them) instead
// of two per sequence: a continuous-batching decode step attends every running sequence to its own
// keys, and one launch per sequence and layer would bound the step by launches. seqs[i] is one
// sequence's call as launch_decode_attention takes it (n_q >= 1, n_kv >= 1) and workspaces[i] its
// workspace of decode_attention_workspace_bytes(seqs[i]). Every call of one batch must have the
// same decode_attention_batch_key (head_dim, kernel, paging, output type, kv heads); -1 means the
// call cannot be batched. Each sequence's result equals launch_decode_attention's bit for bit (the
// same split plan and arithmetic). 1 <= n_seqs <= kDecodeBatchMax.
constexpr int kDecodeBatchMax = 16;
int decode_attention_batch_key(const AttentionGpuParams& p);
cudaError_t launch_decode_attention_batch(const AttentionGpuParams* seqs, void* const* workspaces, int n_seqs,
                                          cudaStream_t stream);

// The same for any number of sequences (a continuous batch of hundreds), with the batch's
// description in device memory instead of the kernels' parameters: two launches per layer however
// many sequences decode. build_decode_attention_table checks the calls as
// launch_decode_attention_batch does (1 <= n_seqs <= kDecodeTableMax) and writes the table into
// host_table (decode_attention_table_bytes(n_seqs) bytes of host memory) and the launch's shape;
// the caller copies the table to device memory in stream order (through pinned memory, so a CUDA
// graph can hold the copy) and launches it. Results equal launch_decode_attention_batch's.
constexpr int kDecodeTableMax = 65535;
struct DecodeTableShape {
  int n_seqs = 0;
  int64_t max_splits = 1;  // the largest split count of any sequence
  int64_t max_rows = 0;    // the largest n_q * n_heads
  int row_groups = 1;      // the largest row-group count
  int head_dim = 0, n_kv_heads = 0, rows_per_block = 1;
  bool paged = false, out_fp32 = false;
};
size_t decode_attention_table_bytes(int n_seqs);
cudaError_t build_decode_attention_table(const AttentionGpuParams* seqs, void* const* workspaces, int n_seqs,
                                         void* host_table, DecodeTableShape* shape);
cudaError_t launch_decode_attention_table(const void* device_table, const DecodeTableShape& shape,
                                          cudaStream_t stream);

// Any n_q and head_dim in [1, kSmallHeadMaxDim] (small_head.cu)// Any n_q and head_dim in [1, kSmallHeadMaxDim] (small_head.cu): one warp per (query row, head),
// keys one at a time, fp32 throughout, O not rounded before the output. For the head sizes the
// kernels above do not take (other than 64 and 128); slow at long contexts. Same contract, mask,
// soft-cap and paging as the others; cudaErrorInvalidValue for head_dim outside the range.
constexpr int kSmallHeadMaxDim = 256;
cudaError_t launch_attention_small_head(const AttentionGpuParams& p, cudaStream_t stream);

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

// The all-reduce form of the merge, around a world's collectives (merge_sum_terms_ref and
// merge_sum_finish_ref): terms (n_rows, head_dim + 3) from this shard's partials (out, lse, entropy;
// entropy may be null) and the world's max LSE; then O, LSE, H from the summed terms.
cudaError_t launch_merge_sum_terms(float* terms, const float* out, const float* lse, const float* entropy,
                                   const float* max_lse, int64_t n_rows, int head_dim, cudaStream_t stream);
cudaError_t launch_merge_sum_finish(float* out, float* lse, float* entropy, const float* terms,
                                    const float* max_lse, int64_t n_rows, int head_dim, cudaStream_t stream);

}  // namespace starserve
