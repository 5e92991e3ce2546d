// Logging by level and subsystem ("comm", "runtime", "bench", ...), through
// spdlog behind this header. Levels come from SWITCHYARD_LOG_LEVEL, e.g.
// "info" or "warn,comm=debug" (a default plus per-subsystem levels).
#pragma once

#include <string>
#include <string_view>

#include "core/error.h"

namespace switchyard {

enum class LogLevel { trace, debug, info, warn, error, off };

bool log_enabled(LogLevel level, std::string_view subsystem);
void log_write(LogLevel level, std::string_view subsystem, const std::string& message);
// Parses a SWITCHYARD_LOG_LEVEL-style spec and applies it; throws ConfigError on bad input.
void set_log_levels(std::string_view spec);
// Prefix every line with this rank (threads-as-ranks and MPI ranks alike); -1 for none.
void set_log_rank(int rank);

}  // namespace switchyard

#define SY_LOG(level, subsystem, ...)                                                            \
  do {                                                                                           \
    if (::switchyard::log_enabled(::switchyard::LogLevel::level, subsystem))                     \
      ::switchyard::log_write(::switchyard::LogLevel::level, subsystem,                          \
                              ::switchyard::detail::make_string(__VA_ARGS__));                   \
  } while (0)
#define SY_LOG_DEBUG(subsystem, ...) SY_LOG(debug, subsystem, __VA_ARGS__)
#define SY_LOG_INFO(subsystem, ...) SY_LOG(info, subsystem, __VA_ARGS__)
#define SY_LOG_WARN(subsystem, ...) SY_LOG(warn, subsystem, __VA_ARGS__)
#define SY_LOG_ERROR(subsystem, ...) SY_LOG(error, subsystem, __VA_ARGS__)
