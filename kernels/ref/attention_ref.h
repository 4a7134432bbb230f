// CPU references for partial attention (O, LSE, entropy over a subset of keys) and for the exact
// merge of partial results across shards. These are the ground truth the CUDA kernels are checked
// against, and the CPU backend's attention. Algorithms: ../docs/design.md, shared spec entropy.md.
#pragma once

#include <cstdint>
#include <span>

namespace starserve {

// A run of keys/values laid out contiguously: k, v are (n_tokens, n_kv_heads, head_dim) row-major.
// A sequence's keys may be several segments (KV pages, anchor + block); the logical key index j
// runs over their concatenation in order.
struct KvSegment {
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t n_tokens = 0;
};

// Which keys a query row sees. Query row i sees logical key j iff !causal || j <= i + causal_offset.
// Examples (n_keys local keys, n_new of them appended by this very call, queries are those tokens):
//   ordinary prefill/decode, anchor+block (phase 1), query host (phase 2): causal, offset = n_keys - n_new;
//   context shard without the query's own KV (phase 2 on other ranks): not causal (every key visible).
// Never derive the offset from n_q when the queries' keys are not local: that hides the last
// context tokens from early query rows (the pitfall in star-attention.md).
//
// A sliding window (window > 0) also hides keys too far behind the query in *positions*: query
// row i at position qpos(i) = i + window_offset sees key j at position kpos(j) only when
// qpos(i) - kpos(j) < window. Key positions follow the logical index with one optional jump, for
// [anchor ; block] in Star phase 1 (anchor at 0.., block at its original positions):
// kpos(j) = j for j < key_gap_from, j + key_gap for j >= key_gap_from (key_gap >= 0). The window
// lower bound is monotone in i and j, so the visible keys of a row are one range
// [first_visible(i), i + causal_offset] (causal) or [first_visible(i), n_keys) (not causal).
//
// A per-row key limit (key_limit non-null, n_q entries) also hides key j from row i unless
// j < key_limit[i]: Attamba's compressed keys, where a row sees the stored boundary keys up to a
// position that moves in steps of P, not one key per row. The visible keys stay one range.
// Host memory; the CUDA backend uploads it, and only the small-head kernel takes it.
struct AttentionMask {
  bool causal = true;
  int64_t causal_offset = 0;
  int64_t window = 0;         // tokens; 0 = no window
  int64_t window_offset = 0;  // qpos(i) - i
  int64_t key_gap_from = 0;   // first logical key index whose position jumps by key_gap
  int64_t key_gap = 0;
  const int32_t* key_limit = nullptr;  // (n_q) or null: row i sees keys j < key_limit[i]
  int64_t key_position(int64_t j) const { return j >= key_gap_from ? j + key_gap : j; }
  // The first logical key index row i may see under the window (0 without one).
  int64_t first_visible(int64_t i) const {
    if (window <= 0) return 0;
    const int64_t lo = i + window_offset - window + 1;  // smallest visible key position
    if (lo <= 0) return 0;
    if (lo < key_gap_from) return lo;
    return lo - key_gap > key_gap_from ? lo - key_gap : key_gap_from;
  }
  bool visible(int64_t i, int64_t j) const {
    return (!causal || j <= i + causal_offset) && j >= first_visible(i) && (!key_limit || j < key_limit[i]);
  }
};

struct PartialAttentionParams {
  float* out = nullptr;       // (n_q, n_heads, head_dim): softmax-normalised within these keys; 0 if none visible
  float* lse = nullptr;       // (n_q, n_heads): natural-log sum of exp(scores) over visible keys; -inf if none
  float* entropy = nullptr;   // (n_q, n_heads): softmax entropy in nats over visible keys; 0 if none. May be null.
  const float* q = nullptr;   // (n_q, n_heads, head_dim)
  std::span<const KvSegment> kv;
  int64_t n_q = 0;
  int n_heads = 0;
  int n_kv_heads = 0;         // n_heads % n_kv_heads == 0; query head h reads kv head h / (n_heads / n_kv_heads)
  int head_dim = 0;
  float scale = 1.0f;         // usually 1/sqrt(head_dim)
  AttentionMask mask;
  // Attention logit soft-capping (Gemma 2): each score s = scale * q.k becomes softcap *
  // tanh(s / softcap) before the softmax, so O, LSE and the entropy are those of the capped
  // scores. 0 = off.
  float softcap = 0.0f;
};

// Straightforward reference: one query row at a time, online softmax over keys with the running
// entropy accumulator of entropy.md (m, l, u), fp32 throughout.
void partial_attention_ref(const PartialAttentionParams& p);

// One shard's partial results for a set of (token, head) rows, as partial_attention_ref writes them.
struct AttentionPartial {
  const float* out = nullptr;      // (n_rows, head_dim)
  const float* lse = nullptr;      // (n_rows)
  const float* entropy = nullptr;  // (n_rows); may be null if no shard carries entropy
};

// Exact merge of shards (star-attention.md, phase 2 step 3; entropy.md chain rule):
//   M = max_h LSE_h, e_h = exp(LSE_h - M), D = sum e_h
//   O = sum e_h O_h / D,  LSE = M + ln D,  H = sum (e_h/D) H_h - sum (e_h/D)(LSE_h - M) + ln D.
// Rows where every shard is empty (all LSE = -inf) give O = 0, LSE = -inf, H = 0 — never NaN.
// n_rows = n_tokens * n_heads.
void merge_partials_ref(float* out, float* lse, float* entropy, std::span<const AttentionPartial> parts,
                        int64_t n_rows, int head_dim);

// The same merge in its all-reduce form (star/merge.h kAllReduce), split around the two collectives
// a world of shards runs: M = all-reduce-max of LSE over shards, then an all-reduce sum of per-row
// terms. Each shard writes its terms, rows of merge_sum_width(head_dim) floats:
//   [e*O (head_dim) | e | e*H | e*(LSE - M)],  e = exp(LSE - M), all zero where LSE or M is -inf.
// After the sum, merge_sum_finish_ref gives O, LSE, H exactly as merge_partials_ref would.
// entropy may be null on both sides (H taken as 0, not written).
inline int64_t merge_sum_width(int head_dim) { return int64_t{head_dim} + 3; }
void merge_sum_terms_ref(float* terms, const float* out, const float* lse, const float* entropy,
                         const float* max_lse, int64_t n_rows, int head_dim);
void merge_sum_finish_ref(float* out, float* lse, float* entropy, const float* terms, const float* max_lse,
                          int64_t n_rows, int head_dim);

}  // namespace starserve
