// Logging: the one way any code logs (spdlog underneath; nothing else includes it). Set up once per
// process with the rank in every line. Cluster-wide messages come from rank 0 only; kernels never
// log; nothing logs per token at info level.
#pragma once

#include <string>
#include <utility>

#include <spdlog/spdlog.h>

#include "common/status.h"

namespace starserve {

// Pattern "[time] [level] [rank r/n] message" on stderr. level: trace|debug|info|warn|error.
Status setup_logging(const std::string& level, int rank, int world_size);

template <typename... Args>
void log_debug(fmt::format_string<Args...> f, Args&&... args) {
  spdlog::debug(f, std::forward<Args>(args)...);
}
template <typename... Args>
void log_info(fmt::format_string<Args...> f, Args&&... args) {
  spdlog::info(f, std::forward<Args>(args)...);
}
template <typename... Args>
void log_warn(fmt::format_string<Args...> f, Args&&... args) {
  spdlog::warn(f, std::forward<Args>(args)...);
}
template <typename... Args>
void log_error(fmt::format_string<Args...> f, Args&&... args) {
  spdlog::error(f, std::forward<Args>(args)...);
}

}  // namespace starserve
