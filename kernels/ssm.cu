// The chunk-local SSM kernels (kernels/ssm.h). Rows of one sequence are contiguous in the batch, so
// "row r belongs to the same sequence as row t" is seq[r] == seq[t], and walking back from t stops at
// the first row that resets (inputs before a chunk start are zero) or at the sequence's first row in
// the batch, where the carried tail / state take over.
#include "kernels/ssm.h"

#include <cuda_bf16.h>

namespace starserve {
namespace {

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }
__device__ __forceinline__ float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

// One thread per (row t, channel c), c fastest (coalesced rows).
template <typename T>
__global__ void causal_conv1d_silu_kernel(CausalConv1dParams p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.n_rows * p.conv_dim) return;
  const int64_t c = idx % p.conv_dim, t = idx / p.conv_dim;
  const T* in = static_cast<const T*>(p.in);
  const int hist = p.width - 1;
  const float* w = p.weight + c * p.width;
  const int32_t s = p.seq[t];
  float acc = p.bias[c] + w[hist] * load(in, t * p.in_stride + c);
  bool stop = p.reset[t] != 0;  // the window holds nothing before this row
  int miss = 0;                 // steps back at which the batch ran out of this sequence's rows (0: not yet)
  for (int j = 1; j <= hist && !stop; ++j) {
    const int64_t r = t - j;
    if (miss == 0 && r >= 0 && p.seq[r] == s) {
      acc += w[hist - j] * load(in, r * p.in_stride + c);
      stop = p.reset[r] != 0;
    } else {
      if (miss == 0) miss = j;
      // Step j back is step j - miss + 1 before the sequence's first batch row: tail slot hist - that.
      const int slot = hist - (j - miss + 1);
      acc += w[hist - j] * p.tail[(static_cast<int64_t>(s) * hist + slot) * p.conv_dim + c];
    }
  }
  store(static_cast<T*>(p.out), t * p.conv_dim + c, silu(acc));
}

// At each sequence's last row l: tail slot k = the input hist-1-k steps back from l, zero when that
// step falls before the current chunk's start, the old tail's slot when it falls before the batch.
// One thread owns one (sequence, channel), reading the old slots before writing any.
template <typename T>
__global__ void conv_tail_kernel(CausalConv1dParams p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.n_rows * p.conv_dim) return;
  const int64_t c = idx % p.conv_dim, l = idx / p.conv_dim;
  const int32_t s = p.seq[l];
  if (l + 1 < p.n_rows && p.seq[l + 1] == s) return;
  const T* in = static_cast<const T*>(p.in);
  const int hist = p.width - 1;
  constexpr int kMaxHist = 15;
  float v[kMaxHist];
  float* tail = p.tail + static_cast<int64_t>(s) * hist * p.conv_dim + c;
  bool stop = false;
  int miss = 0;
  for (int j = 0; j < hist; ++j) {  // j steps back from l
    float val = 0.0f;
    if (!stop) {
      const int64_t r = l - j;
      if (miss == 0 && r >= 0 && p.seq[r] == s) {
        val = load(in, r * p.in_stride + c);
        stop = p.reset[r] != 0;
      } else {
        if (miss == 0) miss = j;
        val = tail[static_cast<int64_t>(hist - 1 - (j - miss)) * p.conv_dim];
      }
    }
    v[j] = val;
  }
  for (int j = 0; j < hist; ++j) tail[static_cast<int64_t>(hist - 1 - j) * p.conv_dim] = v[j];
}

__device__ __forceinline__ bool segment_start(const SsdScanParams& p, int64_t t) {
  return t == 0 || p.reset[t] != 0 || p.seq[t] != p.seq[t - 1];
}

// Block (tile of `tile` rows starting at row blockIdx.x * tile, head blockIdx.y) scans, one after the
// other, the segments that start in its tile and belong to this pass (a segment may run past the
// tile's end). Warp w owns the state rows p = w, w + nw, ...; lane l the columns n = l + 32 i; each
// (p, n) lives in shared memory owned by one thread for the whole segment, so the recurrence needs
// no barrier. A lane loads its B and C columns once per row (registers, shared by its state rows);
// y[p] = sum_n S[p, n] C[n] is a warp sum. carry_in_pass: the pass of segments that read the entry
// state (first row does not reset).
constexpr int kMaxColsPerLane = 8;  // N <= 256

template <typename T>
__global__ void ssd_scan_kernel(SsdScanParams p, int tile, bool carry_in_pass) {
  extern __shared__ float S[];  // (Pd, N)
  const int h = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  const T* x = static_cast<const T*>(p.x);
  const T* B = static_cast<const T*>(p.B);
  const T* C = static_cast<const T*>(p.C);
  const T* dt_raw = static_cast<const T*>(p.dt_raw);
  const float A = -expf(p.A_log[h]), Dh = p.D[h], dt_bias = p.dt_bias[h];
  const int g = h / (p.H / p.G);
  const int64_t y_stride = static_cast<int64_t>(p.H) * p.Pd;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * tile;
  const int64_t tile_end = min(tile_begin + tile, p.n_rows);
  for (int64_t t0 = tile_begin; t0 < tile_end; ++t0) {
    if (!segment_start(p, t0)) continue;
    const bool carry_in = p.reset[t0] == 0;
    if (carry_in != carry_in_pass) continue;
    const int32_t s = p.seq[t0];
    const int64_t state_off = (static_cast<int64_t>(s) * p.H + h) * p.Pd * p.N;
    for (int pp = warp; pp < p.Pd; pp += n_warps)
      for (int n = lane; n < p.N; n += 32) S[pp * p.N + n] = carry_in ? p.state[state_off + pp * p.N + n] : 0.0f;
    int64_t t = t0;
    for (; t < p.n_rows && (t == t0 || !segment_start(p, t)); ++t) {
      const float dt = softplus(load(dt_raw, t * p.dt_stride + h) + dt_bias);
      const float decay = expf(dt * A);
      const int64_t bc = t * p.bc_stride + static_cast<int64_t>(g) * p.N;
      float b[kMaxColsPerLane], c[kMaxColsPerLane];
#pragma unroll
      for (int i = 0; i < kMaxColsPerLane; ++i) {
        const int n = lane + 32 * i;
        b[i] = n < p.N ? load(B, bc + n) : 0.0f;
        c[i] = n < p.N ? load(C, bc + n) : 0.0f;
      }
      for (int pp = warp; pp < p.Pd; pp += n_warps) {
        const float xv = load(x, t * p.x_stride + static_cast<int64_t>(h) * p.Pd + pp);
        const float dtx = dt * xv;
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < kMaxColsPerLane; ++i) {
          const int n = lane + 32 * i;
          if (n < p.N) {
            const float sv = decay * S[pp * p.N + n] + dtx * b[i];
            S[pp * p.N + n] = sv;
            acc += sv * c[i];
          }
        }
        for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) store(static_cast<T*>(p.y), t * y_stride + static_cast<int64_t>(h) * p.Pd + pp, acc + Dh * xv);
      }
    }
    // The sequence's last segment leaves its state for the next batch.
    if (t == p.n_rows || p.seq[t] != s)
      for (int pp = warp; pp < p.Pd; pp += n_warps)
        for (int n = lane; n < p.N; n += 32) p.state[state_off + pp * p.N + n] = S[pp * p.N + n];
  }
}

constexpr int kNormThreads = 256;

template <typename T>
__global__ void gated_rms_norm_kernel(GatedRmsNormParams p) {
  const int64_t t = blockIdx.x;
  const T* y = static_cast<const T*>(p.y) + t * p.d;
  const T* z = static_cast<const T*>(p.z) + t * p.z_stride;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < p.d; i += blockDim.x) {
    const float gv = load(y, i) * silu(load(z, i));
    ss += gv * gv;
  }
  __shared__ float part[kNormThreads / 32];
  for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.0f;
  for (int i = 0; i < kNormThreads / 32; ++i) total += part[i];
  const float inv = rsqrtf(total / static_cast<float>(p.d) + p.eps);
  // Each thread rewrites only the elements it reads, so out may alias y.
  T* out = static_cast<T*>(p.out) + t * p.d;
  for (int64_t i = threadIdx.x; i < p.d; i += blockDim.x)
    store(out, i, load(y, i) * silu(load(z, i)) * inv * p.weight[i]);
}

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename T>
cudaError_t conv_impl(const CausalConv1dParams& p, cudaStream_t stream) {
  const int64_t total = p.n_rows * p.conv_dim;
  causal_conv1d_silu_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(p);
  if (p.width > 1) conv_tail_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t scan_impl(const SsdScanParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(float) * static_cast<size_t>(p.Pd) * p.N;
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(ssd_scan_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  // 4 warps: enough lanes for N = 64..128 (2..4 columns per lane) and Pd rows per warp to hide the
  // per-row latency of the loads. Tiles of rows: one row per block while that leaves fewer than
  // ~8K (tile, head) blocks (decode: every row its own segment, all in parallel), else up to 16 rows,
  // so a prefill grid does not spend its time on blocks whose rows start no segment.
  int tile = 1;
  while (tile < 16 && (p.n_rows / (2 * tile)) * p.H >= 8192) tile *= 2;
  const dim3 grid(static_cast<unsigned>((p.n_rows + tile - 1) / tile), static_cast<unsigned>(p.H));
  ssd_scan_kernel<T><<<grid, 128, smem, stream>>>(p, tile, true);
  ssd_scan_kernel<T><<<grid, 128, smem, stream>>>(p, tile, false);
  return cudaGetLastError();
}

template <typename T>
cudaError_t norm_impl(const GatedRmsNormParams& p, cudaStream_t stream) {
  gated_rms_norm_kernel<T><<<static_cast<unsigned>(p.n_rows), kNormThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_causal_conv1d_silu(const CausalConv1dParams& p, cudaStream_t stream) {
  if (p.width < 1 || p.width > 16 || p.conv_dim <= 0 || p.n_rows < 0 || p.in_stride < p.conv_dim)
    return cudaErrorInvalidValue;
  if (p.n_rows == 0) return cudaSuccess;
  return p.dtype == SsmDtype::kBf16 ? conv_impl<__nv_bfloat16>(p, stream) : conv_impl<float>(p, stream);
}

cudaError_t launch_ssd_scan(const SsdScanParams& p, cudaStream_t stream) {
  if (p.H <= 0 || p.Pd <= 0 || p.N <= 0 || p.G <= 0 || p.H % p.G != 0 || p.N > 32 * kMaxColsPerLane || p.n_rows < 0 || p.n_rows > 0x7fffffff ||
      p.H > 65535 || sizeof(float) * static_cast<size_t>(p.Pd) * p.N > 227 * 1024)
    return cudaErrorInvalidValue;
  if (p.n_rows == 0) return cudaSuccess;
  return p.dtype == SsmDtype::kBf16 ? scan_impl<__nv_bfloat16>(p, stream) : scan_impl<float>(p, stream);
}

cudaError_t launch_gated_rms_norm(const GatedRmsNormParams& p, cudaStream_t stream) {
  if (p.d <= 0 || p.n_rows < 0 || p.n_rows > 0x7fffffff || p.z_stride < p.d) return cudaErrorInvalidValue;
  if (p.n_rows == 0) return cudaSuccess;
  return p.dtype == SsmDtype::kBf16 ? norm_impl<__nv_bfloat16>(p, stream) : norm_impl<float>(p, stream);
}

}  // namespace starserve
