// SS_CUDA_CHECK: the one macro for CUDA runtime return codes in host code around the kernels
// (tests, benchmarks, backend). A failure is a broken invariant: it aborts with file:line.
// Launchers themselves never abort; they return the cudaError_t of the launch.
#pragma once

#include <cstdio>
#include <cstdlib>

#include <cuda_runtime.h>

#define SS_CUDA_CHECK(expr)                                                                        \
  do {                                                                                             \
    const cudaError_t ss_err_ = (expr);                                                            \
    if (ss_err_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "FATAL %s:%d: %s: %s\n", __FILE__, __LINE__, #expr,                    \
                   cudaGetErrorString(ss_err_));                                                   \
      std::fflush(stderr);                                                                         \
      std::abort();                                                                                \
    }                                                                                              \
  } while (0)
