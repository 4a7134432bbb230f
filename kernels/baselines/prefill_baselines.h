// Prefill attention kernels that do not ship: the earlier kernels the shipped ones replaced and the
// configurations of the shipped kernels that measured slower (docs/perf.md). The benchmark
// (bench/gpu/attention_bench.cu) times them next to what ships, and the GPU parity tests keep them
// correct (a baseline that is wrong measures nothing); the backend never links them
// (starserve_kernel_baselines). Every launcher has the contract of launch_prefill_attention
// (kernels/attention/attention.h): same parameters, same results up to rounding, same validation,
// except that none applies a sliding window or soft-capping: such calls get cudaErrorNotSupported.
#pragma once

#include <cuda_runtime.h>

#include "kernels/attention/attention.h"

namespace starserve {

// The first kernel (prefill_wmma.cu): WMMA m16n16k16, 64 query rows per block, O in shared memory.
cudaError_t launch_prefill_attention_wmma(const AttentionGpuParams& p, cudaStream_t stream);

// The mma.sync kernel (kernels/attention/prefill_mma.cuh) in its other configurations
// (prefill_mma_variants.cu; 245 / 252 and 283 / 281 TFLOP/s against the shipped 350 / 340 on the H200):
//   m64:       64 query rows per block, 16 per warp, the exact-max softmax (the kernel's first form);
//   m64_lean:  m64's tiling with the shipped kernel's lean softmax (separates the two effects).
cudaError_t launch_prefill_attention_mma_m64(const AttentionGpuParams& p, cudaStream_t stream);
cudaError_t launch_prefill_attention_mma_m64_lean(const AttentionGpuParams& p, cudaStream_t stream);

// The wgmma kernel (kernels/attention/prefill_wgmma.cuh) in its other configurations
// (prefill_wgmma_variants.cu). Like launch_prefill_attention_wgmma they need sm_90a code and a
// compute capability 9.0 device (else cudaErrorNotSupported).
//   pingpong:         the shipped configuration with the consumers taking turns issuing their
//                     products (named barriers in a ring); bit-identical to the shipped kernel;
//   three_consumers:  three consumers (192 rows per block) on 96-key tiles, one product at a time;
//   cp_async:         the shipped kernel with cp.async copies always (no TMA); bit-identical to it.
cudaError_t launch_prefill_attention_wgmma_pingpong(const AttentionGpuParams& p, cudaStream_t stream);
cudaError_t launch_prefill_attention_wgmma_three_consumers(const AttentionGpuParams& p, cudaStream_t stream);
cudaError_t launch_prefill_attention_wgmma_cp_async(const AttentionGpuParams& p, cudaStream_t stream);

}  // namespace starserve
