// Blocks of 1024 threads; a row is either one block's or split over a team of n_blocks blocks
// (few rows: one block per row would leave most SMs idle while it walks 128K ids alone). The row
// stays in global memory (L2-resident: 128K fp32 is 512 KB) and each block reads its own
// contiguous slice of ids once per stage. Stages, each ending in a barrier (block-wide, or across
// the row's team: see row_barrier):
//   1. penalties: one thread per entry (tokens are distinct), rounded exactly as the host's
//      (__fdiv_rn / __fmul_rn / __fsub_rn: no contraction into an FMA); each block applies the
//      entries that fall in its slice;
//   2. max, argmax (ties to the lower id) and a NaN check; greedy rows end here;
//   3. top-k: a radix select over the logits' order-preserving 32-bit keys (11 + 11 + 10 bits,
//      counting histograms) gives the k-th key in Before order (higher logit first, then lower
//      id); if it is tied, a search in id order gives the last tied id kept;
//   4. top-p: the same select with mass histograms (double) over the top-k survivors (the first
//      level's sum is their total) finds the key where the Before-order cumulative mass reaches
//      top_p * total, then the tied ids in increasing order up to the crossing;
//   5. min-p is a per-token test (weight >= min_p), and the draw is an inverse CDF over the
//      survivors in increasing id: a search for the first id whose cumulative weight exceeds
//      u * total (per block of the team, then inside the block that holds the crossing: 32
//      contiguous parts per level, one per warp).
// Survivors after 3-4 are a prefix of Before order, so one (key, id) cut describes them.
// A team sums its histograms in a per-row device scratch (global atomics) and every block then
// reads the same sums and takes the same decision, so the team needs no leader and no broadcast
// beyond the tie searches' result.
// Weights are sampling_weight's: float argument, double exp, one rounding to float, so they are
// the host's floats; only the order of the double sums differs (rounding-level decisions).
// Mass histograms use atomics, so their sums are not bitwise reproducible run to run; that too
// matters only within rounding of a boundary.
#include "kernels/sampling.h"

#include <cooperative_groups.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>

namespace starserve {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxBins = 2048;        // radix digits: 11, 11 and 10 bits of the key
constexpr int kLevels = 3;
constexpr int kFinalSpan = 256;       // ids a single warp scans at the end of a crossing search
constexpr int kNoId = 0x7fffffff;
// A team is at most this many blocks: every stage ends in a team barrier and every block reads the
// row's whole histogram per level (24 KB), costs that grow with the team. Measured on the H200 at
// vocab 128256, one row, µs for greedy / temperature / top-k 50 / top-p 0.9 (sampling_bench
// --quick, 2026-11-29): team 1: 12.6 / 64 / 229 / 358; 4: 11.2 / 41 / 103 / 153; 8: 13.7 / 33 /
// 77 / 105; 16: 20.7 / 36 / 72 / 88; 64: 87 / 97 / 138 / 151. 8 keeps greedy at its floor.
constexpr int kMaxTeam = 8;
constexpr int kMinSlice = 2 * kThreads;  // ids per block below which a team is not worth its barriers

struct Cut {  // survivors: key > key, or key == key and id <= id
  uint32_t key;
  int id;
};

// A team's shared state for one row, in device memory (RowScratch per row, carved per launch).
// The barrier counter and the histograms a row uses are zeroed by the team before the grid-wide
// sync that starts stage 2; everything else is written before it is read.
struct RowScratch {
  unsigned arrivals;            // row_barrier: blocks arrived, monotonic within a launch
  int result;                   // a tie search's answer, broadcast to the team
  float best_value[kMaxTeam];   // stage 2 per block
  int best_index[kMaxTeam];
  int has_nan[kMaxTeam];
  double part[kMaxTeam];        // crossing searches: each block's sum over its slice
  unsigned count[2][kLevels][kMaxBins];  // [top-k, top-p][level][digit]
  double mass[kLevels][kMaxBins];        // top-p only
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

struct Args {
  int32_t* out;
  float* logits;
  const SampleRowParams* params;
  const int32_t* penalty_tokens;
  const int32_t* penalty_counts;
  int ld;
  int n_blocks;       // blocks per row (1: no team)
  int slice;          // ids per block of a team, a multiple of 32
  RowScratch* scratch;  // (rows) for teams; null when n_blocks is 1
};

// The blocks that share a row, seen from one block.
struct Team {
  RowScratch* ws;  // null: the row is this block's alone
  int n_blocks, block;
  int slice;
  int lo, hi;        // this block's ids
  unsigned target;   // row_barrier: arrivals to wait for next (thread 0's count)
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

// Sum of v over each group of lanes that share `peers` (the __match_any_sync mask); the group's
// lowest lane holds it. A tree over each group's ranks: at round j the lanes whose rank is a
// multiple of 2^(j+1) add their next remaining peer's partial, which covers the next 2^j ranks;
// at most 5 rounds. It replaces one shared-memory double atomicAdd per lane, which sm_90 runs as
// a compare-and-swap loop that serialises on the few hot digits of a histogram's first level.
__device__ __forceinline__ double sum_over_peers(double v, unsigned peers, int lane) {
  unsigned rest = peers & ~((2u << lane) - 1u);  // peers above this lane, still holding partials
  unsigned rank = __popc(peers & ((1u << lane) - 1u));
  while (__any_sync(kFull, rest != 0)) {
    const int next = rest ? __ffs(rest) - 1 : lane;
    const double y = __shfl_sync(kFull, v, next);
    if (rest) v += y;
    rest &= ~__ballot_sync(kFull, rank & 1u);  // odd ranks were absorbed by their lower peer
    rank >>= 1;
  }
  return v;
}

// Waits until every block of the team has arrived; what a block wrote before it is visible to
// the team after it (read with __ldcg: L1 is not coherent across SMs). Needs the team resident at
// once, which the cooperative launch guarantees.
__device__ void row_barrier(Team& tm) {
  __syncthreads();
  if (threadIdx.x == 0) {
    tm.target += static_cast<unsigned>(tm.n_blocks);
    __threadfence();
    atomicAdd(&tm.ws->arrivals, 1u);
    while (*static_cast<volatile unsigned*>(&tm.ws->arrivals) < tm.target) {
    }
    __threadfence();
  }
  __syncthreads();
}

// Among ids [lo, hi) in increasing order, with v(i) >= 0 and `base` the sum of v before lo: the
// first id with v > 0 whose inclusive prefix sum reaches target (>= target, or > target when
// kStrict). kRelative: target is a fraction of the sum of all v in [lo, hi) (the draw's u),
// resolved from the first level's sums. When rounding keeps every prefix below the target, the
// last id with v > 0; -1 if there is none. Every thread of the block calls it and gets the result.
// Each level splits the current span into 32 contiguous parts, one per warp (lanes read adjacent
// ids), sums them, and keeps the part where the running sum crosses; one warp finishes the last
// <= kFinalSpan ids with prefix scans. Work: about one read of the span plus 1/32 of it per level.
template <bool kStrict, bool kRelative, class V>
__device__ int find_crossing(int lo, int hi, double base, double target, const V& v, Shared& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
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

// find_crossing over a whole row [0, n). A team first finds the block whose slice holds the
// crossing from the blocks' sums (the same rule, one "part" per block, every block deciding alike),
// then that block searches its slice. broadcast: every block gets the answer (one more barrier);
// otherwise one block gets it (the one that searched, or block 0 for -1) and the others get -2.
template <bool kStrict, bool kRelative, class V>
__device__ int row_crossing(Team& tm, int n, double target, const V& v, Shared& sh, bool broadcast) {
  if (!tm.ws) return find_crossing<kStrict, kRelative>(0, n, 0.0, target, v, sh);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double s = 0.0;
  for (int i = tm.lo + static_cast<int>(threadIdx.x); i < tm.hi; i += kThreads) s += v(i);
  s = warp_sum(s);
  if (lane == 0) sh.part[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += sh.part[w];
    tm.ws->part[tm.block] = total;
  }
  row_barrier(tm);
  if (threadIdx.x == 0) {
    double t = target;
    if (kRelative) {
      double total = 0.0;
      for (int b = 0; b < tm.n_blocks; ++b) total += __ldcg(&tm.ws->part[b]);
      t = target * total;
    }
    double cum = 0.0, last_base = 0.0;
    int chosen = -1, last = -1;
    for (int b = 0; b < tm.n_blocks; ++b) {
      const double ps = __ldcg(&tm.ws->part[b]);
      if (!(ps > 0.0)) continue;
      const double next = cum + ps;
      if (kStrict ? next > t : next >= t) {
        chosen = b;
        break;
      }
      last = b;
      last_base = cum;
      cum = next;
    }
    if (chosen < 0) {
      chosen = last;
      cum = last_base;
      t = INFINITY;
    }
    sh.span_lo = chosen;
    sh.span_base = cum;
    sh.span_target = t;
  }
  __syncthreads();
  const int chosen = sh.span_lo;
  const double base = sh.span_base, t = sh.span_target;
  __syncthreads();
  if (chosen < 0) return broadcast || tm.block == 0 ? -1 : -2;  // every block sees the same sums
  int r = -2;
  if (chosen == tm.block) {
    r = find_crossing<kStrict, false>(tm.lo, tm.hi, base, t, v, sh);  // its own slice
  }
  if (!broadcast) return r;
  if (chosen == tm.block && threadIdx.x == 0) tm.ws->result = r;
  row_barrier(tm);
  return __ldcg(&tm.ws->result);
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
__device__ Cut select_cut(const RowView& r, Team& tm, Cut prior, double target, Shared& sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint32_t prefix = 0, mask = 0;
  double above = 0.0;  // count or mass of survivors with a key above the current digit range
  for (int level = 0; level < kLevels; ++level) {
    const int shift = level == 0 ? 21 : level == 1 ? 10 : 0;
    const int n_bins = level == 2 ? 1024 : 2048;
    for (int b = threadIdx.x; b < n_bins; b += kThreads) {
      sh.count[b] = 0;
      if (kMass) sh.mass[b] = 0.0;
    }
    __syncthreads();
    // Warp-uniform loop (i0 steps the whole block) so the aggregation below has every lane.
    for (int i0 = tm.lo; i0 < tm.hi; i0 += kThreads) {
      const int i = i0 + static_cast<int>(threadIdx.x);
      bool take = false;
      uint32_t bin = 0;
      float w = 0.0f;
      if (i < tm.hi) {
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
      // Lanes with the same digit add their count and mass once (masked vocabularies put most ids
      // in one bin); past the first level most warps have nothing to add.
      if (__any_sync(kFull, take)) {
        const unsigned peers = __match_any_sync(kFull, take ? bin : 0xffffffffu);
        double m = 0.0;
        if (kMass) m = sum_over_peers(static_cast<double>(w), peers, lane);
        if (take && lane == __ffs(peers) - 1) {
          atomicAdd(&sh.count[bin], static_cast<unsigned>(__popc(peers)));
          if (kMass) atomicAdd(&sh.mass[bin], m);
        }
      }
    }
    __syncthreads();
    if (tm.ws) {  // the team's histogram: add this block's digits, then read the sums
      unsigned* count = tm.ws->count[kMass ? 1 : 0][level];
      double* mass = tm.ws->mass[level];
      for (int b = threadIdx.x; b < n_bins; b += kThreads) {
        if (sh.count[b] != 0) {
          atomicAdd(&count[b], sh.count[b]);
          if (kMass) atomicAdd(&mass[b], sh.mass[b]);
        }
      }
      row_barrier(tm);
      for (int b = threadIdx.x; b < n_bins; b += kThreads) {
        sh.count[b] = __ldcg(&count[b]);
        if (kMass) sh.mass[b] = __ldcg(&mass[b]);
      }
      __syncthreads();
    }
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
  const int id = row_crossing<false, false>(tm, r.n, need, tied_value, sh, true);
  return Cut{key, id < 0 ? id_max : id};
}

// One row per blockIdx.x (kTeam false), or a team of a.n_blocks blocks per row: grid
// (n_blocks, rows), launched cooperatively.
template <bool kTeam>
__global__ void __launch_bounds__(kThreads) sample_rows_kernel(Args a) {
  __shared__ Shared sh;
  const int row_index = kTeam ? blockIdx.y : blockIdx.x;
  const SampleRowParams p = a.params[row_index];
  const int n = p.n_vocab;
  const bool valid = n >= 1 && n <= a.ld;
  float* row = a.logits + static_cast<int64_t>(row_index) * a.ld;
  Team tm{nullptr, 1, 0, n, 0, n, 0u};
  if (kTeam) {
    tm.ws = a.scratch + row_index;
    tm.n_blocks = a.n_blocks;
    tm.block = blockIdx.x;
    tm.slice = a.slice;
    tm.lo = min(n, tm.block * a.slice);  // block * slice < ld: no overflow
    tm.hi = static_cast<int>(min(static_cast<int64_t>(n), static_cast<int64_t>(tm.lo) + a.slice));
  }
  if (!kTeam && !valid) {
    if (threadIdx.x == 0) a.out[row_index] = -1;
    return;
  }
  const bool sampled = p.temperature > 0.0f;
  const bool do_top_k = sampled && p.top_k > 1 && p.top_k < n;
  const bool do_top_p = sampled && p.top_p < 1.0f;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float best = -INFINITY;
  int best_i = kNoId;
  bool nan = false;
  if (valid) {
    if (kTeam) {  // zero what the team's barriers and histograms start from (seen after grid.sync)
      RowScratch* ws = tm.ws;
      if (tm.block == 0 && threadIdx.x == 0) ws->arrivals = 0;
      const int stride = tm.n_blocks * kThreads;
      const int first = tm.block * kThreads + static_cast<int>(threadIdx.x);
      if (do_top_k) {
        for (int j = first; j < kLevels * kMaxBins; j += stride) (&ws->count[0][0][0])[j] = 0;
      }
      if (do_top_p) {
        for (int j = first; j < kLevels * kMaxBins; j += stride) {
          (&ws->count[1][0][0])[j] = 0;
          (&ws->mass[0][0])[j] = 0.0;
        }
      }
    }

    // 1. Penalties, as apply_penalty_entries, on this block's ids.
    const bool rep = p.repetition_penalty != 1.0f;
    const bool freq = p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
    if (rep || freq) {
      for (int e = threadIdx.x; e < p.penalty_count; e += kThreads) {
        const int t = a.penalty_tokens[p.penalty_begin + e];
        const int c = a.penalty_counts[p.penalty_begin + e];
        if (t < tm.lo || t >= tm.hi) continue;
        float l = row[t];
        if (rep) l = l > 0.0f ? __fdiv_rn(l, p.repetition_penalty) : __fmul_rn(l, p.repetition_penalty);
        if (freq && c > 0) {
          l = __fsub_rn(l, __fadd_rn(__fmul_rn(p.frequency_penalty, __int2float_rn(c)), p.presence_penalty));
        }
        row[t] = l;
      }
    }
    __syncthreads();

    // 2. Max and argmax: each thread keeps its first strict maximum, the block keeps the larger
    // value and on ties the smaller index (the serial scan's answer). NaN never wins; it is flagged.
    for (int i = tm.lo + static_cast<int>(threadIdx.x); i < tm.hi; i += kThreads) {
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
    if (lane == 0) {
      sh.best_value[warp] = best;
      sh.best_index[warp] = best_i;
    }
    nan = __syncthreads_or(nan);
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
    if (kTeam && threadIdx.x == 0) {
      tm.ws->best_value[tm.block] = best;
      tm.ws->best_index[tm.block] = best_i;
      tm.ws->has_nan[tm.block] = nan;
    }
  }
  if constexpr (kTeam) {
    // The one barrier every block of the grid reaches (invalid rows included): it publishes the
    // zeroed counters and histograms along with the per-block maxima.
    cooperative_groups::this_grid().sync();
    if (!valid) {
      if (tm.block == 0 && threadIdx.x == 0) a.out[row_index] = -1;
      return;
    }
    best = -INFINITY;
    best_i = kNoId;
    nan = false;
    for (int b = 0; b < tm.n_blocks; ++b) {
      const float ov = __ldcg(&tm.ws->best_value[b]);
      const int oi = __ldcg(&tm.ws->best_index[b]);
      nan |= __ldcg(&tm.ws->has_nan[b]) != 0;
      if (ov > best || (ov == best && oi < best_i)) {
        best = ov;
        best_i = oi;
      }
    }
  }
  const bool writer = threadIdx.x == 0 && tm.block == 0;
  if (nan || !isfinite(best)) {
    if (writer) a.out[row_index] = -1;
    return;
  }
  if (!sampled) {
    if (writer) a.out[row_index] = best_i;
    return;
  }

  const RowView r{row, n, best, __fdiv_rn(1.0f, p.temperature)};
  Cut cut{0u, kNoId};  // every non-NaN key is > 0
  // 3. Top-k. k = 1 is the argmax itself.
  if (p.top_k == 1 && n > 1) {
    cut = Cut{order_key(best), best_i};
  } else if (do_top_k) {
    cut = select_cut<false>(r, tm, cut, static_cast<double>(p.top_k), sh);
  }
  // 4. Top-p over the top-k survivors' mass.
  if (do_top_p) cut = select_cut<true>(r, tm, cut, static_cast<double>(p.top_p), sh);
  // 5. Min-p and the draw.
  const float min_p = p.min_p;
  const auto survivor_weight = [&](int i) -> double {
    const float x = row[i];
    if (!keeps(cut, order_key(x), i)) return 0.0;
    const float w = weight_of(x, r.max_logit, r.inv_t);
    return w >= min_p ? static_cast<double>(w) : 0.0;
  };
  const int token = row_crossing<true, true>(tm, n, p.u, survivor_weight, sh, false);
  if (threadIdx.x == 0 && token != -2) a.out[row_index] = token;
}

// Per device: how many team blocks fit at once, and a stream-ordered pool for the scratch.
struct DeviceTeams {
  int resident_blocks = 0;  // 0: no teams on this device (no cooperative launch, or no pool)
  cudaMemPool_t pool = nullptr;
};

constexpr int kMaxDevices = 64;

// The scratch comes from a pool of our own, allocated and freed on the launch's stream: each
// launch gets its own (launches on several streams at once never share a barrier counter) with
// no synchronisation on the host. A pool of our own, with no release threshold, keeps its memory
// across stream synchronisations (the device's default pool returns it to the driver at each one,
// and re-mapping costs more than the kernel) without changing what other code gets from the
// default pool. It lives as long as the process.
const DeviceTeams& device_teams(int device) {
  static std::once_flag once[kMaxDevices];
  static DeviceTeams teams[kMaxDevices];
  std::call_once(once[device], [device] {
    DeviceTeams& t = teams[device];
    int cooperative = 0, sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sample_rows_kernel<true>, kThreads, 0) !=
            cudaSuccess ||
        !cooperative) {
      cudaGetLastError();
      return;
    }
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    if (cudaMemPoolCreate(&pool, &props) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    uint64_t keep = UINT64_MAX;
    cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
    t.pool = pool;
    t.resident_blocks = sms * per_sm;
  });
  return teams[device];
}

}  // namespace

cudaError_t launch_sample_rows(int32_t* out, float* logits, const SampleRowParams* params,
                               const int32_t* penalty_tokens, const int32_t* penalty_counts, int64_t rows,
                               int64_t ld, cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || ld < 1 || ld > 0x7fffffff) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (!out || !logits || !params) return cudaErrorInvalidValue;
  Args a{out, logits, params, penalty_tokens, penalty_counts, static_cast<int>(ld), 1, 0, nullptr};

  // A team per row when the rows leave SMs idle: as many blocks as fit beside the other rows'
  // teams (all must be resident: the blocks wait for each other), at least kMinSlice ids each.
  int device = 0;
  if (cudaGetDevice(&device) == cudaSuccess && device < kMaxDevices) {
    const DeviceTeams& t = device_teams(device);
    int64_t n_blocks = std::min<int64_t>({kMaxTeam, t.resident_blocks / rows, (ld + kMinSlice - 1) / kMinSlice});
    if (n_blocks >= 2) {
      const int64_t slice = ((ld + n_blocks - 1) / n_blocks + 31) / 32 * 32;
      n_blocks = (ld + slice - 1) / slice;
      RowScratch* scratch = nullptr;
      if (cudaMallocFromPoolAsync(&scratch, static_cast<size_t>(rows) * sizeof(RowScratch), t.pool, stream) ==
          cudaSuccess) {
        a.n_blocks = static_cast<int>(n_blocks);
        a.slice = static_cast<int>(slice);
        a.scratch = scratch;
        void* args[] = {&a};
        const cudaError_t launched =
            cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(sample_rows_kernel<true>),
                                        dim3(static_cast<unsigned>(n_blocks), static_cast<unsigned>(rows)),
                                        dim3(kThreads), args, 0, stream);
        const cudaError_t freed = cudaFreeAsync(scratch, stream);
        if (launched == cudaSuccess) return freed;
        // Too large for what this context may hold at once (e.g. an MPS share): one block per row.
        if (launched != cudaErrorCooperativeLaunchTooLarge) return launched;
        cudaGetLastError();
        a = Args{out, logits, params, penalty_tokens, penalty_counts, static_cast<int>(ld), 1, 0, nullptr};
      } else {
        cudaGetLastError();
      }
    }
  } else {
    cudaGetLastError();
  }
  sample_rows_kernel<false><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace starserve
