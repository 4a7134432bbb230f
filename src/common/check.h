// The one checking family of the code base.
//   SS_CHECK(cond, fmt, ...)   a broken invariant: aborts with file:line. Never used for errors a
//                              user can cause (those return Status).
// Return codes of the libraries we call (CUDA runtime, cuBLAS, NCCL, MPI) go through two macros
// over the same per-library description:
//   SS_CHECK_CALL(expr)        aborts with file:line, the call and the library's message unless the
//                              call succeeded (host code around kernels, where a failure is a bug);
//   SS_RETURN_IF_CALL_FAILED(expr)
//                              returns kInternal naming the call and the message (communicators,
//                              where a failure is an expected error: a peer is gone);
//   SS_CALL_STATUS(expr, what) the same as a Status, for code that handles the failure itself.
// A library takes part by declaring, next to the one place that includes its header, two
// overloads in namespace starserve on its return-code type: `bool call_ok(Code)` and `std::string call_message(Code)`
// (common/cuda_call.h for CUDA, backend/cuda/cublas_check.h for cuBLAS, src/comm for NCCL and MPI).
// Launchers never abort or log; they return the cudaError_t of the launch.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#include <fmt/format.h>

#include "common/status.h"

namespace starserve::detail {
[[noreturn]] inline void check_failed(const char* file, int line, const char* expr, const std::string& msg) {
  std::fprintf(stderr, "FATAL %s:%d: check failed: %s %s\n", file, line, expr, msg.c_str());
  std::fflush(stderr);
  std::abort();
}
}  // namespace starserve::detail

// SS_CHECK(n > 0, "n = {}", n);
#define SS_CHECK(cond, ...)                                                                      \
  do {                                                                                           \
    if (!(cond)) ::starserve::detail::check_failed(__FILE__, __LINE__, #cond,                    \
                                                   ::fmt::format("" __VA_ARGS__));               \
  } while (0)

// SS_CHECK_CALL(cudaMalloc(&p, n));
#define SS_CHECK_CALL(expr)                                                                      \
  do {                                                                                           \
    const auto ss_rc_ = (expr);                                                                  \
    if (!::starserve::call_ok(ss_rc_)) ::starserve::detail::check_failed(__FILE__, __LINE__, #expr,           \
                                                            "failed: " + ::starserve::call_message(ss_rc_));  \
  } while (0)

// SS_CALL_STATUS(expr, "what"): the Status form of a library call's return code, for code that
// handles the failure itself: OK, or kInternal "<what> failed: <the library's message>". A macro
// (not a template) so that the overloads are looked up where it is used.
#define SS_CALL_STATUS(expr, what)                                                               \
  ([&]() -> ::starserve::Status {                                                                \
    const auto ss_rc_ = (expr);                                                                  \
    if (::starserve::call_ok(ss_rc_)) return ::starserve::Status();                              \
    return ::starserve::internal_error("{} failed: {}", (what), ::starserve::call_message(ss_rc_)); \
  }())

// SS_RETURN_IF_CALL_FAILED(ncclAllReduce(...));
#define SS_RETURN_IF_CALL_FAILED(expr) SS_RETURN_IF_ERROR(SS_CALL_STATUS((expr), #expr))
