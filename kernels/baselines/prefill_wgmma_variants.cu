// The wgmma prefill kernel (kernels/attention/prefill_wgmma.cuh) in the configurations that do not
// ship. On the H200 (attention_bench, D = 128, TFLOP/s, docs/data/h200_attention_bench_tma_2026-11-29b.jsonl),
// against WsDefault's 595-607: the ping-pong 592-607 (within 2%: once a consumer's softmax overlaps
// its own P V, taking turns gains nothing), three consumers 557-602, cp.async copies always 494-514.
#include "kernels/attention/prefill_wgmma.cuh"
#include "kernels/baselines/prefill_baselines.h"

namespace starserve {
namespace {

// WsDefault with the ping-pong: the consumers take turns issuing (named barriers in a ring).
using WsPingpong = WsConfig<2, 128, 3, true, true, 40, true>;
// Three consumers (192 query rows per K / V load: two thirds of the L2-to-SM traffic per FLOP),
// 96-key tiles, three stages, one product at a time; producer 24, consumers 160 registers.
using WsThreeConsumers = WsConfig<3, 96, 3, false, false, 24>;

}  // namespace

cudaError_t launch_prefill_attention_wgmma_pingpong(const AttentionGpuParams& p, cudaStream_t stream) {
  return launch_ws_config<WsPingpong, /*kAllowTma=*/true>(p, stream);
}

cudaError_t launch_prefill_attention_wgmma_three_consumers(const AttentionGpuParams& p, cudaStream_t stream) {
  return launch_ws_config<WsThreeConsumers, /*kAllowTma=*/true>(p, stream);
}

cudaError_t launch_prefill_attention_wgmma_cp_async(const AttentionGpuParams& p, cudaStream_t stream) {
  return launch_ws_config<WsDefault, /*kAllowTma=*/false>(p, stream);
}

}  // namespace starserve
