// Logging: spdlog, set up once per process with the rank in every line.
#pragma once

#include <string>

#include <spdlog/spdlog.h>

#include "common/status.h"

namespace starserve {

// Pattern "[time] [level] [rank r/n] message" on stderr. level: trace|debug|info|warn|error.
Status setup_logging(const std::string& level, int rank, int world_size);

}  // namespace starserve
