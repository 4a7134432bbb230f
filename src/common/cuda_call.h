// The CUDA runtime's part in the checking family (common/check.h): call_ok / call_message on a
// cudaError_t, for SS_CHECK_CALL (host code around kernels, where a failure is a bug) and
// call_status / SS_RETURN_IF_CALL_FAILED (communicators, where it is an error to report). Header
// only, for code that is built with CUDA; the common library itself compiles no CUDA.
#pragma once

#include <string>

#include <cuda_runtime.h>

#include "common/check.h"

namespace starserve {

inline bool call_ok(cudaError_t e) { return e == cudaSuccess; }
inline std::string call_message(cudaError_t e) { return cudaGetErrorString(e); }

}  // namespace starserve
