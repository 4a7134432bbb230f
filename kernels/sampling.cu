// One block of 1024 threads per row; the row stays in global memory (L2-resident: 128K fp32 is
// 512 KB) and is read once per stage. Stages, each ending in a block-wide barrier:
//   1. penalties: one thread per entry (tokens are distinct), rounded exactly as the host's
//      (__fdiv_rn / __fmul_rn / __fsub_rn: no contraction into an FMA);
//   2. max, argmax (ties to the lower id) and a NaN check; greedy rows end here;
//   3. top-k: a radix select over the logits' order-preserving 32-bit keys (11 + 11 + 10 bits,
//      counting histograms in shared memory) gives the k-th key in Before order (higher logit
//      first, then lower id); if it is tied, a search in id order gives the last tied id kept;
//   4. top-p: the same select with mass histograms (double) over the top-k survivors (the first
//      level's sum is their total) finds the key where the Before-order cumulative mass reaches
//      top_p * total, then the tied ids in increasing order up to the crossing;
//   5. min-p is a per-token test (weight >= min_p), and the draw is an inverse CDF over the
//      survivors in increasing id: a hierarchical search (32 contiguous parts per level, one per
//      warp) for the first id whose cumulative weight exceeds u * total.
// Survivors after 3-4 are a prefix of Before order, so one (key, id) cut describes them.
// Weights are sampling_weight's: float argument, double exp, one rounding to float, so they are
// the host's floats; only the order of the double sums differs (rounding-level decisions).
// Mass histograms use shared-memory atomics, so their sums are not bitwise reproducible run to
// run; that too matters only within rounding of a boundary.
#include "kernels/sampling.h"

#include <cmath>
#include <cstdint>

namespace starserve {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxBins = 2048;        // radix digits: 11, 11 and 10 bits of the key
constexpr int kFinalSpan = 256;       // ids a single warp scans at the end of a crossing search
constexpr int kNoId = 0x7fffffff;

struct Cut {  // survivors: key > key, or key == key and id <= id
  uint32_t key;
  int id;
};

struct Shared {
  unsigned count[kMaxBins];  // radix level: survivors per digit
  double mass[kMaxBins];     // radix level (top-p): their weight per digit
  double part[kWarps];       // per-warp partial sums
  float best_value[kWarps];
  int best_index[kWarps];
  // Values one thread decides and every thread reads after a barrier.
  int sel_bin;
  unsigned sel_count;
  double sel_above, sel_target;
  int span_lo, span_hi;
  double span_base, span_target;
  int result;
};

// Non-NaN floats to unsigned integers in the same order; -0 and +0 (equal floats) share a key.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t b = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ bool keeps(Cut c, uint32_t key, int id) {
  return key > c.key || (key == c.key && id <= c.id);
}

// sampling_weight (src/engine/sampling.h): exp((x - max) * inv_t) with the product in float, the
// exp in double, rounded once to float.
__device__ __forceinline__ float weight_of(float x, float max_logit, float inv_t) {
  return __double2float_rn(exp(static_cast<double>(__fmul_rn(__fsub_rn(x, max_logit), inv_t))));
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// Inclusive prefix sum over the lanes in lane order.
__device__ __forceinline__ double warp_inclusive(double v, int lane) {
  for (int off = 1; off < 32; off *= 2) {
    const double y = __shfl_up_sync(kFull, v, off);
    if (lane >= off) v += y;
  }
  return v;
}

// Among ids [0, n) in increasing order, with v(i) >= 0: the first id with v > 0 whose inclusive
// prefix sum reaches target (>= target, or > target when kStrict). kRelative: target is a fraction
// of the sum of all v (the draw's u), resolved from the first level's sums. When rounding keeps
// every prefix below the target, the last id with v > 0; -1 if there is none. Every thread calls it
// and gets the result.
// Each level splits the current span into 32 contiguous parts, one per warp (lanes read adjacent
// ids), sums them, and keeps the part where the running sum crosses; one warp finishes the last
// <= kFinalSpan ids with prefix scans. Work: about one read of the span plus 1/32 of it per level.
template <bool kStrict, bool kRelative, class V>
__device__ int find_crossing(int n, double target, const V& v, Shared& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int lo = 0, hi = n;
  double base = 0.0;
  bool resolved = !kRelative;
  while (hi - lo > kFinalSpan) {
    const int part = ((hi - lo + kWarps - 1) / kWarps + 31) / 32 * 32;
    const int w_lo = lo + warp * part;
    const int w_hi = min(hi, w_lo + part);
    double s = 0.0;
    for (int i = w_lo + lane; i < w_hi; i += 32) s += v(i);
    s = warp_sum(s);
    if (lane == 0) sh.part[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      double t = target;
      if (!resolved) {
        double total = 0.0;
        for (int w = 0; w < kWarps; ++w) total += sh.part[w];
        t = target * total;
      }
      double cum = base, last_base = 0.0;
      int chosen = -1, last = -1;
      for (int w = 0; w < kWarps; ++w) {
        const double ps = sh.part[w];
        if (!(ps > 0.0)) continue;
        const double next = cum + ps;
        if (kStrict ? next > t : next >= t) {
          chosen = w;
          break;
        }
        last = w;
        last_base = cum;
        cum = next;
      }
      if (chosen < 0) {  // rounding (or nothing positive): the last positive part, the last positive id
        chosen = last;
        cum = last_base;
        t = INFINITY;
      }
      sh.span_lo = chosen < 0 ? lo : lo + chosen * part;
      sh.span_hi = chosen < 0 ? lo : min(hi, lo + (chosen + 1) * part);
      sh.span_base = cum;
      sh.span_target = t;
    }
    __syncthreads();
    lo = sh.span_lo;
    hi = sh.span_hi;
    base = sh.span_base;
    target = sh.span_target;
    resolved = true;
    __syncthreads();
  }
  if (warp == 0) {
    double t = target;
    if (!resolved) {
      double s = 0.0;
      for (int i = lo + lane; i < hi; i += 32) s += v(i);
      t = target * warp_sum(s);
    }
    double cum = base;
    int found = -1, last = -1;
    for (int i0 = lo; i0 < hi; i0 += 32) {
      const int i = i0 + lane;
      const double x = i < hi ? v(i) : 0.0;
      const double c = cum + warp_inclusive(x, lane);
      const unsigned positive = __ballot_sync(kFull, x > 0.0);
      const unsigned hit = __ballot_sync(kFull, x > 0.0 && (kStrict ? c > t : c >= t));
      if (hit) {
        found = i0 + __ffs(hit) - 1;
        break;
      }
      if (positive) last = i0 + 31 - __clz(positive);
      cum = __shfl_sync(kFull, c, 31);
    }
    if (lane == 0) sh.result = found >= 0 ? found : last;
  }
  __syncthreads();
  const int r = sh.result;
  __syncthreads();
  return r;
}

struct RowView {
  const float* row;  // penalised logits
  int n;
  float max_logit;
  float inv_t;
};

// The cut after keeping, among the survivors of `prior`, the shortest prefix in Before order
// whose count reaches target = k (kMass false) or whose weight reaches target * their total
// weight (kMass true, target = top_p; the total is the first level's histogram sum). With kMass,
// when rounding keeps the survivors' mass below that, `prior` unchanged.
template <bool kMass>
__device__ Cut select_cut(const RowView& r, Cut prior, double target, Shared& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint32_t prefix = 0, mask = 0;
  double above = 0.0;  // count or mass of survivors with a key above the current digit range
  for (int level = 0; level < 3; ++level) {
    const int shift = level == 0 ? 21 : level == 1 ? 10 : 0;
    const int n_bins = level == 2 ? 1024 : 2048;
    for (int b = threadIdx.x; b < n_bins; b += kThreads) {
      sh.count[b] = 0;
      if (kMass) sh.mass[b] = 0.0;
    }
    __syncthreads();
    // Warp-uniform loop (i0 steps the whole block) so the aggregation below has every lane.
    for (int i0 = 0; i0 < r.n; i0 += kThreads) {
      const int i = i0 + static_cast<int>(threadIdx.x);
      bool take = false;
      uint32_t bin = 0;
      float w = 0.0f;
      if (i < r.n) {
        const float x = r.row[i];
        const uint32_t key = order_key(x);
        take = (key & mask) == prefix && keeps(prior, key, i);
        if (take) {
          bin = (key >> shift) & static_cast<uint32_t>(n_bins - 1);
          if (kMass) {
            w = weight_of(x, r.max_logit, r.inv_t);
            take = w > 0.0f;  // zero weights never enter a nucleus
          }
        }
      }
      // Lanes with the same digit add their count once (masked vocabularies put most ids in one
      // bin); past the first level most warps have nothing to add.
      if (__any_sync(kFull, take)) {
        const unsigned peers = __match_any_sync(kFull, take ? bin : 0xffffffffu);
        if (take) {
          if (lane == __ffs(peers) - 1) atomicAdd(&sh.count[bin], static_cast<unsigned>(__popc(peers)));
          if (kMass) atomicAdd(&sh.mass[bin], static_cast<double>(w));
        }
      }
    }
    __syncthreads();
    // Warp 0 picks the digit, walking digits from the highest: lane L sums digits
    // [n_bins - (L + 1) per, n_bins - L per); the first lane whose running total reaches the
    // target walks its digits one by one.
    if (warp == 0) {
      const int per = n_bins / 32;
      const int top = n_bins - 1 - lane * per;
      double s = 0.0;
      bool nonempty = false;
      for (int j = 0; j < per; ++j) {
        const int b = top - j;
        s += kMass ? sh.mass[b] : static_cast<double>(sh.count[b]);
        nonempty |= sh.count[b] != 0;
      }
      if (kMass && level == 0) target *= warp_sum(s);  // top_p * the survivors' total weight
      const double incl = warp_inclusive(s, lane);
      double excl = __shfl_up_sync(kFull, incl, 1);
      if (lane == 0) excl = 0.0;
      const unsigned crossing = __ballot_sync(kFull, nonempty && above + incl >= target);
      const unsigned any = __ballot_sync(kFull, nonempty);
      int walker;
      double t = target;
      if (crossing) {
        walker = __ffs(crossing) - 1;
      } else {
        walker = any ? 31 - __clz(any) : -1;  // rounding: keep the whole range
        t = INFINITY;
      }
      if (lane == 0 && (walker < 0 || (level == 0 && !crossing))) sh.sel_bin = -1;  // nothing to cut
      if (lane == walker && !(level == 0 && !crossing)) {
        double cum = above + excl, last_above = 0.0;
        int chosen = -1, last = -1;
        for (int j = 0; j < per; ++j) {
          const int b = top - j;
          if (sh.count[b] == 0) continue;
          const double val = kMass ? sh.mass[b] : static_cast<double>(sh.count[b]);
          if (cum + val >= t) {
            chosen = b;
            break;
          }
          last = b;
          last_above = cum;
          cum += val;
        }
        if (chosen < 0) {
          chosen = last;
          cum = last_above;
          t = INFINITY;
        }
        sh.sel_bin = chosen;
        sh.sel_count = sh.count[chosen];
        sh.sel_above = cum;
        sh.sel_target = t;
      }
    }
    __syncthreads();
    const int bin = sh.sel_bin;
    if (bin < 0) {
      __syncthreads();
      return prior;
    }
    prefix |= static_cast<uint32_t>(bin) << shift;
    mask |= static_cast<uint32_t>(n_bins - 1) << shift;
    above = sh.sel_above;
    target = sh.sel_target;
    __syncthreads();
  }

  // prefix is now the cut key: `above` survivors (or mass) lie above it, `tied` at it.
  const uint32_t key = prefix;
  const unsigned tied = sh.sel_count;
  const int id_max = key == prior.key ? prior.id : kNoId;
  const double need = target - above;  // count, or mass, still needed from the tied ids
  if ((!kMass && static_cast<double>(tied) == need) || tied == 1) return Cut{key, id_max};
  const auto tied_value = [&](int i) -> double {
    const float x = r.row[i];
    if (order_key(x) != key || !keeps(prior, key, i)) return 0.0;
    return kMass ? static_cast<double>(weight_of(x, r.max_logit, r.inv_t)) : 1.0;
  };
  const int id = find_crossing<false, false>(r.n, need, tied_value, sh);
  return Cut{key, id < 0 ? id_max : id};
}

__global__ void __launch_bounds__(kThreads)
    sample_rows_kernel(int32_t* out, float* logits, const SampleRowParams* params, const int32_t* penalty_tokens,
                       const int32_t* penalty_counts, int ld) {
  __shared__ Shared sh;
  const SampleRowParams p = params[blockIdx.x];
  const int n = p.n_vocab;
  if (n < 1 || n > ld) {
    if (threadIdx.x == 0) out[blockIdx.x] = -1;
    return;
  }
  float* row = logits + static_cast<int64_t>(blockIdx.x) * ld;

  // 1. Penalties, as apply_penalty_entries.
  const bool rep = p.repetition_penalty != 1.0f;
  const bool freq = p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
  if (rep || freq) {
    for (int e = threadIdx.x; e < p.penalty_count; e += kThreads) {
      const int t = penalty_tokens[p.penalty_begin + e];
      const int c = penalty_counts[p.penalty_begin + e];
      if (t < 0 || t >= n) continue;
      float l = row[t];
      if (rep) l = l > 0.0f ? __fdiv_rn(l, p.repetition_penalty) : __fmul_rn(l, p.repetition_penalty);
      if (freq && c > 0) {
        l = __fsub_rn(l, __fadd_rn(__fmul_rn(p.frequency_penalty, __int2float_rn(c)), p.presence_penalty));
      }
      row[t] = l;
    }
  }
  __syncthreads();

  // 2. Max and argmax: each thread keeps its first strict maximum, the block keeps the larger value
  // and on ties the smaller index (the serial scan's answer). NaN never wins; it is flagged.
  float best = -INFINITY;
  int best_i = kNoId;
  bool nan = false;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const float x = row[i];
    nan |= isnan(x);
    if (x > best) {
      best = x;
      best_i = i;
    }
  }
  for (int off = 16; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(kFull, best, off);
    const int oi = __shfl_xor_sync(kFull, best_i, off);
    if (ov > best || (ov == best && oi < best_i)) {
      best = ov;
      best_i = oi;
    }
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    sh.best_value[warp] = best;
    sh.best_index[warp] = best_i;
  }
  const bool any_nan = __syncthreads_or(nan);
  best = sh.best_value[0];
  best_i = sh.best_index[0];
  for (int w = 1; w < kWarps; ++w) {
    const float ov = sh.best_value[w];
    const int oi = sh.best_index[w];
    if (ov > best || (ov == best && oi < best_i)) {
      best = ov;
      best_i = oi;
    }
  }
  if (any_nan || !isfinite(best)) {
    if (threadIdx.x == 0) out[blockIdx.x] = -1;
    return;
  }
  if (!(p.temperature > 0.0f)) {
    if (threadIdx.x == 0) out[blockIdx.x] = best_i;
    return;
  }

  const RowView r{row, n, best, __fdiv_rn(1.0f, p.temperature)};
  Cut cut{0u, kNoId};  // every non-NaN key is > 0
  // 3. Top-k. k = 1 is the argmax itself.
  if (p.top_k == 1 && n > 1) {
    cut = Cut{order_key(best), best_i};
  } else if (p.top_k > 1 && p.top_k < n) {
    cut = select_cut<false>(r, cut, static_cast<double>(p.top_k), sh);
  }
  // 4. Top-p over the top-k survivors' mass.
  if (p.top_p < 1.0f) cut = select_cut<true>(r, cut, static_cast<double>(p.top_p), sh);
  // 5. Min-p and the draw.
  const float min_p = p.min_p;
  const auto survivor_weight = [&](int i) -> double {
    const float x = row[i];
    if (!keeps(cut, order_key(x), i)) return 0.0;
    const float w = weight_of(x, r.max_logit, r.inv_t);
    return w >= min_p ? static_cast<double>(w) : 0.0;
  };
  const int token = find_crossing<true, true>(n, p.u, survivor_weight, sh);
  if (threadIdx.x == 0) out[blockIdx.x] = token;
}

}  // namespace

cudaError_t launch_sample_rows(int32_t* out, float* logits, const SampleRowParams* params,
                               const int32_t* penalty_tokens, const int32_t* penalty_counts, int64_t rows,
                               int64_t ld, cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || ld < 1 || ld > 0x7fffffff) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (!out || !logits || !params) return cudaErrorInvalidValue;
  sample_rows_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(out, logits, params, penalty_tokens,
                                                                           penalty_counts, static_cast<int>(ld));
  return cudaGetLastError();
}

}  // namespace starserve
