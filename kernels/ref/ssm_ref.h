// CPU references for Attamba's chunk-local state-space model (docs/specs/attamba.md, "What starserve
// fixes"): the depthwise causal conv1d + SiLU over xBC, the Mamba-2 SSD recurrence, and the gated RMS
// norm. Both the conv window and the SSD state restart from zero at every chunk start, so a batch
// carries, per sequence, only the conv tail and the state of its current chunk (the decode "carry").
// Argument order follows the kernel launchers of kernels/ssm.h: outputs first, then inputs, then sizes.
#pragma once

#include <cstdint>
#include <span>

namespace starserve {

// A batch of rows: the new tokens of n_seqs sequences in batch order (each sequence's rows
// contiguous, in position order).
struct SsmRows {
  std::span<const int32_t> seq;    // (T) the batch sequence index of each row, 0..n_seqs-1
  std::span<const uint8_t> reset;  // (T) 1 = this row starts a chunk: the conv window and the SSM state restart from zero here
};

// out (T, conv_dim), row stride conv_dim = silu(bias + sum_k weight[c, k] * in[t - (W-1) + k][c]),
// inputs before the chunk start = 0;
// in: row stride in_stride; weight (conv_dim, W) fp32, tap W-1 = current row; bias (conv_dim);
// tail (n_seqs, W-1, conv_dim) in/out: on entry the last W-1 inputs of each sequence's current chunk
// before this batch (oldest first; zeros for positions before the chunk start), on exit the same
// after the batch. out must not alias in.
void causal_conv1d_silu_ref(float* out, const float* in, int64_t in_stride, const float* weight, const float* bias,
                            float* tail, int64_t n_rows, int64_t conv_dim, int width, SsmRows rows);

// Mamba-2 SSD recurrence, per head h: S = exp(dt*A) S + dt * x ⊗ B, y = S·C + D x,
// dt = softplus(dt_raw + dt_bias), A = -exp(A_log); softplus(v) = log(1 + e^v), taken as v above 20
// (as torch.nn.functional.softplus, where the two agree in fp32);
// x (T, H*Pd) row stride x_stride; B, C (T, G*N) row stride bc_stride; dt_raw (T, H) row stride dt_stride;
// A_log, D, dt_bias (H) fp32; y (T, H*Pd) row stride H*Pd;
// state (n_seqs, H, Pd, N) fp32 in/out (zeroed where a row resets before its update).
// Head h reads group h / (H/G) of B and C. y must not alias the inputs.
void ssd_scan_ref(float* y, const float* x, int64_t x_stride, const float* B, const float* C, int64_t bc_stride,
                  const float* dt_raw, int64_t dt_stride, const float* A_log, const float* D, const float* dt_bias,
                  float* state, int64_t n_rows, int H, int Pd, int G, int N, SsmRows rows);

// out (T, d) = RMSNorm(y * silu(z)) * weight, per row over d: g / sqrt(mean(g^2) + eps) * weight
// with g = y * silu(z); y (T, d) row stride d; z row stride z_stride; weight (d). out may alias y.
void gated_rms_norm_ref(float* out, const float* y, const float* z, int64_t z_stride, const float* weight,
                        int64_t n_rows, int64_t d, float eps);

}  // namespace starserve
