// SS_CHECK: the one macro for broken invariants. It aborts with file:line; it is never used for
// errors a user can cause (those return Status).
#pragma once

#include <cstdio>
#include <cstdlib>

#include <fmt/format.h>

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
