// Errors and checks. Exceptions inside C++; a check prints both values
// ("a == b (3 vs 4)") and where it failed.
#pragma once

#include <exception>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace switchyard {

// Base of every Switchyard error.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// A caller passed something wrong: shape, dtype, size, option (a programming error).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};
// A backend lacks an operation or dtype ("backend X does not support Y").
class NotSupported : public Error {
 public:
  using Error::Error;
};
// Recoverable I/O failure: a peer went away, a message was malformed, a store failed.
class IoError : public Error {
 public:
  using Error::Error;
};
// An operation did not finish within its timeout.
class TimeoutError : public IoError {
 public:
  using IoError::IoError;
};
// A configuration file, override or environment variable is invalid.
class ConfigError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string make_string(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
std::string check_location(const char* file, int line);
}  // namespace detail

// The same error with `prefix` put before its message, its type kept (so callers
// can still catch TimeoutError or IoError); other exceptions become Error.
std::exception_ptr with_context(std::exception_ptr error, const std::string& prefix);

}  // namespace switchyard

#define SY_THROW(ExceptionType, ...) \
  throw ExceptionType(::switchyard::detail::make_string(__VA_ARGS__))

// SY_CHECK(cond, "message parts", ...): throws InvalidArgument with the condition and location.
#define SY_CHECK(cond, ...)                                                                  \
  do {                                                                                       \
    if (!(cond))                                                                             \
      throw ::switchyard::InvalidArgument(::switchyard::detail::make_string(                 \
          "check failed: " #cond " " __VA_OPT__(, ) __VA_ARGS__ __VA_OPT__(, ) " [",        \
          ::switchyard::detail::check_location(__FILE__, __LINE__), "]"));                   \
  } while (0)

#define SY_CHECK_OP_(a, b, op, ...)                                                          \
  do {                                                                                       \
    const auto& sy_a_ = (a);                                                                 \
    const auto& sy_b_ = (b);                                                                 \
    if (!(sy_a_ op sy_b_))                                                                   \
      throw ::switchyard::InvalidArgument(::switchyard::detail::make_string(                 \
          "check failed: " #a " " #op " " #b " (", sy_a_, " vs ", sy_b_, ") "                \
          __VA_OPT__(, ) __VA_ARGS__ __VA_OPT__(, ) " [",                                    \
          ::switchyard::detail::check_location(__FILE__, __LINE__), "]"));                   \
  } while (0)

#define SY_CHECK_EQ(a, b, ...) SY_CHECK_OP_(a, b, ==, __VA_ARGS__)
#define SY_CHECK_NE(a, b, ...) SY_CHECK_OP_(a, b, !=, __VA_ARGS__)
#define SY_CHECK_LT(a, b, ...) SY_CHECK_OP_(a, b, <, __VA_ARGS__)
#define SY_CHECK_LE(a, b, ...) SY_CHECK_OP_(a, b, <=, __VA_ARGS__)
#define SY_CHECK_GT(a, b, ...) SY_CHECK_OP_(a, b, >, __VA_ARGS__)
#define SY_CHECK_GE(a, b, ...) SY_CHECK_OP_(a, b, >=, __VA_ARGS__)
