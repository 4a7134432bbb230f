// The CUDA runtime's part in the one checking family (common/check.h): host code around the
// kernels (tests, benchmarks, the CUDA backend) writes SS_CHECK_CALL(cudaMalloc(&p, n)); a failure
// there is a broken invariant and aborts with file:line, the call and cudaGetErrorString.
// Launchers themselves never abort or log; they return the cudaError_t of the launch.
#pragma once

#include <string>

#include <cuda_runtime.h>

#include "common/check.h"

namespace starserve {

inline bool call_ok(cudaError_t e) { return e == cudaSuccess; }
inline std::string call_message(cudaError_t e) { return cudaGetErrorString(e); }

}  // namespace starserve
