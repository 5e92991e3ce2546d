// Reading files Switchyard did not write itself (headers, configs, manifests,
// traces): limits checked before anything is allocated or parsed, numbers
// range-checked before conversion, and error messages that quote at most a
// short excerpt of what was read. nlohmann's parser and dump() recurse once
// per nesting level (a header nested 65,000 deep overflowed the stack while
// the error message was being formatted), so the depth is bounded first.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace switchyard {

inline constexpr int kMaxJsonDepth = 64;
// Values a parsed document may hold: its DOM costs about 40x the text, so the
// count, not the bytes, bounds the memory (a checkpoint shard's header with
// thousands of tensors holds tens of thousands).
inline constexpr int64_t kMaxJsonValues = int64_t{1} << 20;
inline constexpr uint64_t kMaxTextFileBytes = 16u << 20;  // configs, manifests: far above any real one

// Parses `text` as JSON after checking its nesting depth (<= kMaxJsonDepth,
// strings and escapes respected) and its number of values (<= kMaxJsonValues). InvalidArgument naming `what` and the
// limit, or the parser's error, otherwise.
nlohmann::json parse_untrusted_json(std::string_view text, const std::string& what);

// The whole of a regular file, or what a pipe (`<(...)`, /dev/stdin) sends
// until it closes, of at most `max_bytes`: IoError naming it when it is
// missing, a directory or socket, larger, a pipe silent for 10 s, or empty.
std::string read_untrusted_file(const std::string& path, uint64_t max_bytes = kMaxTextFileBytes);

// At most ~80 characters of a JSON value, for error messages.
std::string json_excerpt(const nlohmann::json& j);

// The integer at j as T, in T's range: 4294967552 is not 256 and 1e20 is not
// undefined behaviour. `field` names it in the ConfigError.
template <typename T>
T json_integer(const nlohmann::json& j, const std::string& field) {
  static_assert(std::is_integral_v<T>);
  if (j.is_number_unsigned()) {
    const uint64_t v = j.get<uint64_t>();
    if (v <= static_cast<uint64_t>(std::numeric_limits<T>::max())) return static_cast<T>(v);
  } else if (j.is_number_integer()) {
    const int64_t v = j.get<int64_t>();
    if (v >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
        (v < 0 || static_cast<uint64_t>(v) <= static_cast<uint64_t>(std::numeric_limits<T>::max())))
      return static_cast<T>(v);
  } else if (j.is_number_float()) {
    // 256.0 is 256; 1e20 or 2.5 is not an integer of T.
    const double v = j.get<double>();
    if (std::abs(v) < 9.0e15 && v == static_cast<double>(static_cast<int64_t>(v)) &&
        v >= static_cast<double>(std::numeric_limits<T>::min()) && v <= static_cast<double>(std::numeric_limits<T>::max()))
      return static_cast<T>(v);
    SY_THROW(ConfigError, field, " is ", json_excerpt(j), ", expected an integer in ", +std::numeric_limits<T>::min(),
             "..", +std::numeric_limits<T>::max());
  } else {
    SY_THROW(ConfigError, field, " is ", json_excerpt(j), ", expected an integer");
  }
  SY_THROW(ConfigError, field, " = ", json_excerpt(j), " is out of range, expected ", +std::numeric_limits<T>::min(),
           "..", +std::numeric_limits<T>::max());
}

// A finite number at j.
double json_finite(const nlohmann::json& j, const std::string& field);

}  // namespace switchyard
