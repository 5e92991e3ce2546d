#include "comm/store/store_util.h"

#include <charconv>

#include "core/error.h"

namespace switchyard::store_util {

// Caps the timeout so that now + timeout cannot overflow (callers pass Milliseconds::max()).
std::chrono::steady_clock::time_point deadline_after(Store::Milliseconds timeout) {
  constexpr auto kLongest = std::chrono::hours(24 * 365 * 100);
  if (timeout > kLongest) timeout = std::chrono::duration_cast<Store::Milliseconds>(kLongest);
  return std::chrono::steady_clock::now() + timeout;
}

// Keys and values may hold any byte; error messages show non-printable ones as \xNN.
std::string printable(const std::string& bytes, size_t max_shown) {
  std::string out;
  for (size_t i = 0; i < bytes.size() && i < max_shown; ++i) {
    const auto c = static_cast<unsigned char>(bytes[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
      out += static_cast<char>(c);
    } else {
      static const char* const kHex = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    }
  }
  if (bytes.size() > max_shown) out += detail::make_string("... (", bytes.size(), " bytes)");
  return out;
}

int64_t parse_counter(std::string_view store_name, const std::string& key, const Store::Bytes& value) {
  const std::string text = Store::to_string(value);
  int64_t parsed = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), parsed);
  if (text.empty() || error != std::errc() || end != text.data() + text.size())
    SY_THROW(InvalidArgument, store_name, "::add: key '", printable(key),
             "' holds non-integer content '", printable(text), "'");
  return parsed;
}

}  // namespace switchyard::store_util
