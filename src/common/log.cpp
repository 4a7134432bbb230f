#include "common/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

namespace starserve {

Status setup_logging(const std::string& level, int rank, int world_size) {
  const spdlog::level::level_enum lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off") {
    return invalid_argument("log level '{}' is not one of trace, debug, info, warn, error, off", level);
  }
  auto logger = spdlog::stderr_color_mt("starserve");
  logger->set_pattern(fmt::format("[%H:%M:%S.%e] [%^%l%$] [rank {}/{}] %v", rank, world_size));
  logger->set_level(lvl);
  spdlog::set_default_logger(logger);
  return Status();
}

}  // namespace starserve
