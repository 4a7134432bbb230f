// Attamba's chunk-local state-space model on the GPU (docs/specs/attamba.md, "What starserve fixes";
// references causal_conv1d_silu_ref, ssd_scan_ref, gated_rms_norm_ref in kernels/ref/ssm_ref.h, same
// semantics and argument order). Row data (in, x, B, C, dt_raw, z and the outputs) is bf16 or fp32,
// each output in the input dtype; the carry (tail, state) and the small weights are fp32; all math
// in fp32 with one rounding at the output. All pointers are device pointers; seq and reset are the
// device copies of SsmRows' arrays: (n_rows) int32 and (n_rows) uint8.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace starserve {

enum class SsmDtype { kF32, kBf16 };

struct CausalConv1dParams {
  void* out = nullptr;           // (n_rows, conv_dim), row stride conv_dim; must not alias in
  const void* in = nullptr;      // (n_rows, conv_dim), row stride in_stride
  int64_t in_stride = 0;
  const float* weight = nullptr;  // (conv_dim, width), tap width-1 = current row
  const float* bias = nullptr;    // (conv_dim)
  float* tail = nullptr;          // (n_seqs, width-1, conv_dim) in/out, oldest first
  const int32_t* seq = nullptr;   // (n_rows)
  const uint8_t* reset = nullptr; // (n_rows)
  int64_t n_rows = 0, conv_dim = 0;
  int width = 0;
  SsmDtype dtype = SsmDtype::kBf16;
};

// Two launches on `stream`: the conv over every (row, channel), then the tail update (the threads of
// each sequence's last row), so no row reads a tail another row has rewritten.
cudaError_t launch_causal_conv1d_silu(const CausalConv1dParams& p, cudaStream_t stream);

struct SsdScanParams {
  void* y = nullptr;              // (n_rows, H*Pd), row stride H*Pd; must not alias the inputs
  const void* x = nullptr;        // (n_rows, H*Pd), row stride x_stride
  const void* B = nullptr;        // (n_rows, G*N), row stride bc_stride
  const void* C = nullptr;
  const void* dt_raw = nullptr;   // (n_rows, H), row stride dt_stride
  int64_t x_stride = 0, bc_stride = 0, dt_stride = 0;
  const float* A_log = nullptr;   // (H)
  const float* D = nullptr;       // (H)
  const float* dt_bias = nullptr; // (H)
  float* state = nullptr;         // (n_seqs, H, Pd, N) in/out
  const int32_t* seq = nullptr;   // (n_rows)
  const uint8_t* reset = nullptr; // (n_rows)
  int64_t n_rows = 0;
  int H = 0, Pd = 0, G = 0, N = 0;
  SsmDtype dtype = SsmDtype::kBf16;
};

// The rows split into segments: a segment starts at a reset or at a sequence's first row and runs to
// the next such row. Segments are independent, so one block scans one (segment, head) sequentially
// in time with the (Pd, N) state spread over its threads. Two launches: first the segments that read
// the entry state (a sequence's first segment when its first row does not reset), then those that
// start from zero; a sequence's last segment writes its state, so no block overwrites a state
// another block has still to read.
// N <= 256.
cudaError_t launch_ssd_scan(const SsdScanParams& p, cudaStream_t stream);

struct GatedRmsNormParams {
  void* out = nullptr;            // (n_rows, d); may alias y
  const void* y = nullptr;        // (n_rows, d), row stride d
  const void* z = nullptr;        // (n_rows, d), row stride z_stride
  int64_t z_stride = 0;
  const float* weight = nullptr;  // (d)
  int64_t n_rows = 0, d = 0;
  float eps = 0.0f;
  SsmDtype dtype = SsmDtype::kBf16;
};

// One block per row: out = RMSNorm(y * silu(z)) * weight, the sum of squares in fp32.
cudaError_t launch_gated_rms_norm(const GatedRmsNormParams& p, cudaStream_t stream);

}  // namespace starserve
