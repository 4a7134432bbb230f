// Decode attention (flash-decoding): a few query rows against a long KV, bound by reading K and V
// once. Pass 1: grid (key splits, kv heads, row groups); each block reads its chunk of one kv head
// once for up to 8 query rows (all query heads of the GQA group x query tokens), each warp
// walking every 4th group of 8 keys (one coalesced row load per key per warp), and
// keeps per row the online state (m, l, u) of entropy.md in base 2. The 4 warps combine in shared
// memory and write the chunk's (O, LSE, H) to the workspace. Pass 2 merges the chunks per row with
// the exact shard merge of entropy.md, so splitting never changes the result beyond rounding.
//
// Paged keys: a warp's group of kUnroll keys starts at a multiple of kUnroll (chunks start at
// multiples of 64), so it lies in one page of >= 64 keys; the warp reads a page's pointer once
// when it enters the page and addresses its rows from there. Chunks need no page alignment.
#include <algorithm>

#include "kernels/attention.h"
#include "kernels/attention_common.cuh"

namespace starserve {
namespace {

using detail::kLn2;
using detail::kLog2e;
using detail::kNegInfF;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 8;   // query rows per block at most (registers: kRows x D/32 accumulators per lane)
constexpr int kUnroll = 8;    // keys in flight per warp: memory-level parallelism, and independent shuffles
static_assert(64 % kUnroll == 0, "a warp's key group must not straddle a page (chunks and pages are multiples of 64)");
constexpr int kMinChunk = 256;
constexpr int64_t kTargetBlocks = 2048;  // ~15 waves of 132 SMs x 1 block: enough to hide the tail

struct DecodePlan {
  int64_t n_rows = 0;       // n_q * n_heads
  int group = 1;            // query heads per kv head
  int rows_per_block = 1;   // 1, 4 or kMaxRows: the kernel instance (fewer registers -> more warps per SM)
  int row_groups = 1;       // ceil(n_q * group / rows_per_block)
  int64_t chunk = 0;        // keys per split
  int64_t n_splits = 1;
};

DecodePlan make_plan(const AttentionGpuParams& p) {
  DecodePlan plan;
  plan.group = p.n_heads / p.n_kv_heads;
  plan.n_rows = p.n_q * p.n_heads;
  const int64_t rows = p.n_q * plan.group;
  plan.rows_per_block = rows <= 1 ? 1 : rows <= 4 ? 4 : kMaxRows;
  plan.row_groups = static_cast<int>((rows + plan.rows_per_block - 1) / plan.rows_per_block);
  const int64_t per_split_blocks = static_cast<int64_t>(p.n_kv_heads) * plan.row_groups;
  int64_t splits = std::max<int64_t>(1, kTargetBlocks / per_split_blocks);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (p.n_kv + kMinChunk - 1) / kMinChunk));
  plan.chunk = std::max<int64_t>(1, (p.n_kv + splits - 1) / splits);
  plan.chunk = (plan.chunk + 63) / 64 * 64;
  plan.n_splits = std::max<int64_t>(1, (p.n_kv + plan.chunk - 1) / plan.chunk);  // <= kTargetBlocks
  return plan;
}

template <int D>
struct Vec;  // D / 32 bf16 per lane
template <>
struct Vec<64> {
  using T = __nv_bfloat162;
};
template <>
struct Vec<128> {
  using T = uint2;
};

template <int D>
__device__ __forceinline__ void to_float(const typename Vec<D>::T& v, float* f) {
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < D / 64; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// ws_o: (n_splits, n_rows, D) fp32, ws_lse / ws_ent: (n_splits, n_rows).
// kPaged: keys through p.k_pages / p.v_pages; a separate instance so the contiguous loop is untouched.
template <int D, int kRows, bool kPaged>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(AttentionGpuParams p, DecodePlan plan, float* ws_o,
                                                                float* ws_lse, float* ws_ent) {
  constexpr int E = D / 32;  // elements per lane
  using V = typename Vec<D>::T;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t split = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int row0 = blockIdx.z * kRows;  // over n_q * group: r -> (token r / group, head kv_head * group + r % group)
  const int rows_total = static_cast<int>(p.n_q) * plan.group;
  const int n_rows = min(kRows, rows_total - row0);
  const float scale2 = p.scale * kLog2e;

  float q[kRows][E];
  int64_t limit[kRows];  // keys j < limit are visible
  for (int r = 0; r < kRows; ++r) {
    const int rr = row0 + min(r, n_rows - 1);
    const int64_t tok = rr / plan.group;
    const int head = kv_head * plan.group + rr % plan.group;
    const V raw = *reinterpret_cast<const V*>(p.q + (tok * p.n_heads + head) * D + lane * E);
    to_float<D>(raw, q[r]);
    for (int e = 0; e < E; ++e) q[r][e] *= scale2;
    limit[r] = p.causal ? tok + p.causal_offset + 1 : p.n_kv;
  }

  const int64_t begin = split * plan.chunk;
  int64_t end = min(p.n_kv, begin + plan.chunk);
  int64_t max_limit = 0;
  for (int r = 0; r < n_rows; ++r) max_limit = max(max_limit, limit[r]);
  end = min(end, max_limit);

  float m[kRows], l[kRows], u[kRows], acc[kRows][E];
  for (int r = 0; r < kRows; ++r) {
    m[r] = kNegInfF;
    l[r] = 0.0f;
    u[r] = 0.0f;
    for (int e = 0; e < E; ++e) acc[r][e] = 0.0f;
  }

  const int64_t stride = static_cast<int64_t>(p.n_kv_heads) * D;
  const int64_t head_off = kv_head * D + lane * E;
  const __nv_bfloat16* kbase = kPaged ? nullptr : p.k + head_off;
  const __nv_bfloat16* vbase = kPaged ? nullptr : p.v + head_off;
  int64_t page_key0 = 0, page_end = 0;  // paged: keys [page_key0, page_end) of kbase / vbase's page (warp-uniform)
  for (int64_t j0 = begin + warp * kUnroll; j0 < end; j0 += kWarps * kUnroll) {
    float kf[kUnroll][E], vf[kUnroll][E];
    {
      if constexpr (kPaged) {
        if (j0 >= page_end) {  // j0 only grows, so this is entering a new page
          const int64_t page = j0 >> p.page_shift;
          page_key0 = page << p.page_shift;
          page_end = page_key0 + (int64_t{1} << p.page_shift);
          kbase = p.k_pages[page] + head_off;
          vbase = p.v_pages[page] + head_off;
        }
        __builtin_assume(__isGlobal(kbase) && __isGlobal(vbase));  // global loads, not generic ones
      }
      V kr[kUnroll], vr[kUnroll];
#pragma unroll
      for (int t = 0; t < kUnroll; ++t) {
        const int64_t j = min(j0 + t, end - 1);  // clamp: the duplicate is masked below (same group, same page)
        kr[t] = *reinterpret_cast<const V*>(kbase + (j - page_key0) * stride);
        vr[t] = *reinterpret_cast<const V*>(vbase + (j - page_key0) * stride);
      }
#pragma unroll
      for (int t = 0; t < kUnroll; ++t) {
        to_float<D>(kr[t], kf[t]);
        to_float<D>(vr[t], vf[t]);
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= n_rows) break;
      // Scores of kUnroll keys at once: their shuffle reductions are independent (ILP), and the
      // running max moves once per group of keys instead of once per key.
      float s[kUnroll];
#pragma unroll
      for (int t = 0; t < kUnroll; ++t) {
        s[t] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) s[t] += q[r][e] * kf[t][e];
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2)
#pragma unroll
        for (int t = 0; t < kUnroll; ++t) s[t] += __shfl_xor_sync(0xffffffffu, s[t], off);
      float smax = kNegInfF;
#pragma unroll
      for (int t = 0; t < kUnroll; ++t) {
        const int64_t j = j0 + t;
        s[t] = (j < end && j < limit[r]) ? s[t] : kNegInfF;  // masked: contributes nothing
        smax = fmaxf(smax, s[t]);
      }
      if (smax == kNegInfF) continue;  // warp-uniform
      const float m_new = fmaxf(m[r], smax);
      if (m[r] != kNegInfF && m_new > m[r]) {
        const float alpha = exp2f(m[r] - m_new);
        u[r] = alpha * (u[r] + (m[r] - m_new) * l[r]);
        l[r] *= alpha;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] *= alpha;
      }
      m[r] = m_new;
#pragma unroll
      for (int t = 0; t < kUnroll; ++t) {
        const float t2 = s[t] - m_new;
        const float w = s[t] == kNegInfF ? 0.0f : exp2f(t2);
        l[r] += w;
        u[r] += s[t] == kNegInfF ? 0.0f : w * t2;  // select, never 0 * -inf
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] += w * vf[t][e];
      }
    }
  }

  // Combine the warps: (m, l, u, acc) of each warp per row, then one warp per row writes.
  __shared__ float s_state[kWarps][kRows][3];
  __shared__ float s_acc[kWarps][kRows][D];
  for (int r = 0; r < kRows; ++r) {
    if (lane == 0) {
      s_state[warp][r][0] = m[r];
      s_state[warp][r][1] = l[r];
      s_state[warp][r][2] = u[r];
    }
    for (int e = 0; e < E; ++e) s_acc[warp][r][lane * E + e] = acc[r][e];
  }
  __syncthreads();
  for (int r = warp; r < n_rows; r += kWarps) {
    float mm = kNegInfF;
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, s_state[w][r][0]);
    const int rr = row0 + r;
    const int64_t tok = rr / plan.group;
    const int head = kv_head * plan.group + rr % plan.group;
    const int64_t out_row = split * plan.n_rows + tok * p.n_heads + head;
    float* o = ws_o + out_row * D;
    if (mm == kNegInfF) {
      for (int c = lane; c < D; c += 32) o[c] = 0.0f;
      if (lane == 0) {
        ws_lse[out_row] = kNegInfF;
        ws_ent[out_row] = 0.0f;
      }
      continue;
    }
    float ll = 0.0f, uu = 0.0f;
    float a[kWarps];
    for (int w = 0; w < kWarps; ++w) {
      const float mw = s_state[w][r][0];
      a[w] = mw == kNegInfF ? 0.0f : exp2f(mw - mm);
      if (a[w] == 0.0f) continue;
      ll += a[w] * s_state[w][r][1];
      uu += a[w] * (s_state[w][r][2] + (mw - mm) * s_state[w][r][1]);
    }
    const float inv = 1.0f / ll;
    for (int c = lane; c < D; c += 32) {
      float x = 0.0f;
      for (int w = 0; w < kWarps; ++w)
        if (a[w] != 0.0f) x += a[w] * s_acc[w][r][c];
      o[c] = x * inv;
    }
    if (lane == 0) {
      const float ln_l = logf(ll);
      ws_lse[out_row] = mm * kLn2 + ln_l;
      ws_ent[out_row] = fmaxf(0.0f, ln_l - uu * kLn2 * inv);
    }
  }
}

// Pass 2: one block of D threads per row. The split weights e_h = exp(LSE_h - M) are computed once
// into shared memory by all threads together, then each thread sums its output dim over the splits
// with independent, coalesced loads (a warp walking the splits serially is latency bound: with 256
// splits that alone took most of the decode time). Empty splits have e_h = 0 and O_h = 0.
constexpr int kMaxSplits = static_cast<int>(kTargetBlocks);

template <int D>
__device__ __forceinline__ float block_reduce(float x, float* s_red, bool is_max) {
  for (int off = 16; off > 0; off /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, off);
    x = is_max ? fmaxf(x, y) : x + y;
  }
  __syncthreads();  // s_red free from any previous use
  if (threadIdx.x % 32 == 0) s_red[threadIdx.x / 32] = x;
  __syncthreads();
  x = s_red[0];
  for (int w = 1; w < D / 32; ++w) x = is_max ? fmaxf(x, s_red[w]) : x + s_red[w];
  return x;
}

template <typename OutT, int D>
__global__ void __launch_bounds__(D) decode_merge_kernel(OutT* out, float* lse, float* entropy, const float* ws_o,
                                                         const float* ws_lse, const float* ws_ent, int n_splits,
                                                         int64_t n_rows) {
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_red[D / 32];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  float m = kNegInfF;
  for (int h = tid; h < n_splits; h += D) m = fmaxf(m, ws_lse[h * n_rows + r]);
  m = block_reduce<D>(m, s_red, true);
  if (m == kNegInfF) {  // every split empty: O = 0, LSE = -inf, H = 0
    detail::store_out(out + r * D + tid, 0.0f);
    if (tid == 0) {
      lse[r] = kNegInfF;
      if (entropy) entropy[r] = 0.0f;
    }
    return;
  }
  float den = 0.0f, h_mix = 0.0f, shift = 0.0f;
  for (int h = tid; h < n_splits; h += D) {
    const float lh = ws_lse[h * n_rows + r];
    const float e = lh == kNegInfF ? 0.0f : expf(lh - m);
    s_w[h] = e;
    den += e;
    if (e != 0.0f) {
      h_mix += e * ws_ent[h * n_rows + r];
      shift += e * (lh - m);
    }
  }
  den = block_reduce<D>(den, s_red, false);
  h_mix = block_reduce<D>(h_mix, s_red, false);
  shift = block_reduce<D>(shift, s_red, false);  // its barriers also publish s_w
  float acc = 0.0f;
#pragma unroll 8
  for (int h = 0; h < n_splits; ++h) acc += s_w[h] * ws_o[(h * n_rows + r) * D + tid];
  const float inv = 1.0f / den;
  detail::store_out(out + r * D + tid, acc * inv);
  if (tid == 0) {
    const float log_d = logf(den);
    lse[r] = m + log_d;  // entropy.md merge: H = sum w_h H_h - sum w_h (LSE_h - M) + ln D
    if (entropy) entropy[r] = fmaxf(0.0f, h_mix * inv - shift * inv + log_d);
  }
}

template <int D, int kRows>
cudaError_t launch_decode_typed(const AttentionGpuParams& p, const DecodePlan& plan, void* workspace,
                                cudaStream_t stream) {
  float* ws_o = static_cast<float*>(workspace);
  float* ws_lse = ws_o + plan.n_splits * plan.n_rows * D;
  float* ws_ent = ws_lse + plan.n_splits * plan.n_rows;
  const dim3 grid(static_cast<unsigned>(plan.n_splits), static_cast<unsigned>(p.n_kv_heads),
                  static_cast<unsigned>(plan.row_groups));
  if (p.k_pages)
    decode_split_kernel<D, kRows, true><<<grid, kThreads, 0, stream>>>(p, plan, ws_o, ws_lse, ws_ent);
  else
    decode_split_kernel<D, kRows, false><<<grid, kThreads, 0, stream>>>(p, plan, ws_o, ws_lse, ws_ent);
  const unsigned merge_blocks = static_cast<unsigned>(plan.n_rows);
  if (p.out_fp32)
    decode_merge_kernel<float, D><<<merge_blocks, D, 0, stream>>>(static_cast<float*>(p.out), p.lse, p.entropy, ws_o,
                                                                  ws_lse, ws_ent, static_cast<int>(plan.n_splits),
                                                                  plan.n_rows);
  else
    decode_merge_kernel<__nv_bfloat16, D><<<merge_blocks, D, 0, stream>>>(
        static_cast<__nv_bfloat16*>(p.out), p.lse, p.entropy, ws_o, ws_lse, ws_ent, static_cast<int>(plan.n_splits),
        plan.n_rows);
  return cudaGetLastError();
}

bool decode_shape_ok(const AttentionGpuParams& p) {
  return p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0 && p.n_q >= 0 &&
         p.n_q <= kDecodeMaxQ && p.n_kv >= 0 && (p.head_dim == 64 || p.head_dim == 128);
}

}  // namespace

size_t decode_attention_workspace_bytes(const AttentionGpuParams& p) {
  if (!decode_shape_ok(p)) return 0;
  const DecodePlan plan = make_plan(p);
  return sizeof(float) * static_cast<size_t>(plan.n_splits * plan.n_rows * (p.head_dim + 2));
}

cudaError_t launch_decode_attention(const AttentionGpuParams& p, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream) {
  if (!decode_shape_ok(p) || !p.out || !p.lse || !p.q || !detail::kv_source_ok(p))
    return cudaErrorInvalidValue;
  if (p.n_q == 0) return cudaSuccess;
  if (workspace_bytes < decode_attention_workspace_bytes(p) || !workspace) return cudaErrorInvalidValue;
  const DecodePlan plan = make_plan(p);
  if (p.head_dim == 64) {
    if (plan.rows_per_block == 1) return launch_decode_typed<64, 1>(p, plan, workspace, stream);
    if (plan.rows_per_block == 4) return launch_decode_typed<64, 4>(p, plan, workspace, stream);
    return launch_decode_typed<64, kMaxRows>(p, plan, workspace, stream);
  }
  if (plan.rows_per_block == 1) return launch_decode_typed<128, 1>(p, plan, workspace, stream);
  if (plan.rows_per_block == 4) return launch_decode_typed<128, 4>(p, plan, workspace, stream);
  return launch_decode_typed<128, kMaxRows>(p, plan, workspace, stream);
}

}  // namespace starserve
