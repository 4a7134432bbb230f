// The CUDA runtime's part in the one checking family (common/check.h), for host code around the
// kernels (tests, benchmarks, the CUDA backend): SS_CHECK_CALL(cudaMalloc(&p, n)) aborts with
// file:line, the call and cudaGetErrorString; a failure there is a broken invariant. Launchers
// themselves never abort or log; they return the cudaError_t of the launch.
// The overloads (call_ok, call_message on cudaError_t) have one definition, in common/cuda_call.h,
// which the communicators use too: defined here as well, a file that includes both would not compile.
#pragma once

#include "common/cuda_call.h"
