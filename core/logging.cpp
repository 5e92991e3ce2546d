#include "core/logging.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <map>
#include <mutex>
#include <shared_mutex>

#include "core/env.h"

namespace switchyard {
namespace {

struct LogState {
  std::shared_mutex mutex;
  LogLevel default_level = LogLevel::warn;
  std::map<std::string, LogLevel, std::less<>> per_subsystem;
  std::shared_ptr<spdlog::logger> logger;

  LogState() {
    logger = spdlog::stderr_color_mt("switchyard");
    logger->set_level(spdlog::level::trace);
    logger->set_pattern("[%H:%M:%S.%e] %v");
  }
};

thread_local int t_rank = -1;

LogLevel parse_level(std::string_view s, std::string_view spec) {
  static constexpr std::pair<std::string_view, LogLevel> names[] = {
      {"trace", LogLevel::trace}, {"debug", LogLevel::debug}, {"info", LogLevel::info},
      {"warn", LogLevel::warn},   {"warning", LogLevel::warn}, {"error", LogLevel::error},
      {"off", LogLevel::off}};
  for (auto& [name, level] : names)
    if (name == s) return level;
  SY_THROW(ConfigError, "SWITCHYARD_LOG_LEVEL='", spec, "': unknown level '", s,
           "', expected trace, debug, info, warn, error or off (optionally subsystem=level,...)");
}

std::pair<LogLevel, std::map<std::string, LogLevel, std::less<>>> parse_spec(std::string_view spec) {
  LogLevel def = LogLevel::warn;
  std::map<std::string, LogLevel, std::less<>> per;
  size_t pos = 0;
  while (pos <= spec.size()) {
    size_t comma = spec.find(',', pos);
    std::string_view item = spec.substr(pos, comma == std::string_view::npos ? std::string_view::npos : comma - pos);
    if (!item.empty()) {
      size_t eq = item.find('=');
      if (eq == std::string_view::npos)
        def = parse_level(item, spec);
      else
        per[std::string(item.substr(0, eq))] = parse_level(item.substr(eq + 1), spec);
    }
    if (comma == std::string_view::npos) break;
    pos = comma + 1;
  }
  return {def, std::move(per)};
}

spdlog::level::level_enum to_spdlog(LogLevel l) {
  switch (l) {
    case LogLevel::trace: return spdlog::level::trace;
    case LogLevel::debug: return spdlog::level::debug;
    case LogLevel::info: return spdlog::level::info;
    case LogLevel::warn: return spdlog::level::warn;
    case LogLevel::error: return spdlog::level::err;
    case LogLevel::off: return spdlog::level::off;
  }
  return spdlog::level::info;
}

// Constructed once and never destroyed: logging may run during static teardown.
// Starts from SWITCHYARD_LOG_LEVEL; set_log_levels() overrides it later.
LogState& state() {
  static LogState* s = [] {
    auto* st = new LogState();
    auto [def, per] = parse_spec(env().log_level);
    st->default_level = def;
    st->per_subsystem = std::move(per);
    return st;
  }();
  return *s;
}

}  // namespace

void set_log_levels(std::string_view spec) {
  auto [def, per] = parse_spec(spec);
  LogState& target = state();
  std::unique_lock lock(target.mutex);
  target.default_level = def;
  target.per_subsystem = std::move(per);
}

bool log_enabled(LogLevel level, std::string_view subsystem) {
  LogState& st = state();
  std::shared_lock lock(st.mutex);
  auto it = st.per_subsystem.find(subsystem);
  LogLevel threshold = it != st.per_subsystem.end() ? it->second : st.default_level;
  return level >= threshold && level != LogLevel::off;
}

void log_write(LogLevel level, std::string_view subsystem, const std::string& message) {
  LogState& st = state();
  if (t_rank >= 0)
    st.logger->log(to_spdlog(level), "[{}] [{}] [rank {}] {}", spdlog::level::to_short_c_str(to_spdlog(level)),
                   subsystem, t_rank, message);
  else
    st.logger->log(to_spdlog(level), "[{}] [{}] {}", spdlog::level::to_short_c_str(to_spdlog(level)), subsystem,
                   message);
}

void set_log_rank(int rank) { t_rank = rank; }

}  // namespace switchyard
