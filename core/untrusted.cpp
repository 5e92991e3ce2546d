#include "core/untrusted.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>

namespace switchyard {

nlohmann::json parse_untrusted_json(std::string_view text, const std::string& what) {
  int depth = 0;
  int64_t items = 0;  // containers, commas and colons outside strings: at least one per value
  bool in_string = false, escaped = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '[' || c == '{') {
      if (++items > 2 * kMaxJsonValues)
        SY_THROW(InvalidArgument, what, ": JSON with more than ", kMaxJsonValues, " values (at byte ", i,
                 "); a parsed value costs about 40 times its text, so larger documents are refused");
      if (++depth > kMaxJsonDepth)
        SY_THROW(InvalidArgument, what, ": JSON nested deeper than ", kMaxJsonDepth, " levels (at byte ", i, ")");
    } else if (c == ']' || c == '}') {
      --depth;
    } else if ((c == ',' || c == ':') && ++items > 2 * kMaxJsonValues) {
      SY_THROW(InvalidArgument, what, ": JSON with more than ", kMaxJsonValues, " values (at byte ", i,
               "); a parsed value costs about 40 times its text, so larger documents are refused");
    }
  }
  try {
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    // The library's message quotes the offending token whole, which may be megabytes.
    std::string message = e.what();
    if (message.size() > 240) message = message.substr(0, 240) + "... (" + std::to_string(message.size()) + " characters)";
    SY_THROW(InvalidArgument, what, ": not valid JSON: ", message);
  }
}

std::string read_untrusted_file(const std::string& path, uint64_t max_bytes) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) SY_THROW(IoError, "'", path, "': cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    SY_THROW(IoError, "'", path, "': cannot stat: ", std::strerror(errno));
  }
  if (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode)) {
    // A pipe (`--config <(...)`, /dev/stdin): read to its end, bounded in size and in how long it
    // may stay silent; a FIFO nobody writes to ends at once with nothing, which is refused.
    std::string text;
    char buf[65536];
    for (;;) {
      const ssize_t n = ::read(fd, buf, sizeof buf);  // 0: the end (or a FIFO with no writer at all)
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) {  // a writer that has not written yet
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, 10000) == 0) {
          ::close(fd);
          SY_THROW(IoError, "'", path, "': a pipe that sent nothing for 10 s");
        }
        continue;
      }
      if (n <= 0) break;
      text.append(buf, static_cast<size_t>(n));
      if (text.size() > max_bytes) {
        ::close(fd);
        SY_THROW(IoError, "'", path, "': more than the ", max_bytes, " bytes expected of such a file");
      }
    }
    ::close(fd);
    if (text.empty()) SY_THROW(IoError, "'", path, "': a pipe with nothing in it (nobody writes to it?)");
    return text;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    SY_THROW(IoError, "'", path, "': not a regular file (", S_ISDIR(st.st_mode) ? "a directory" : "a socket or device",
             ")");
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    ::close(fd);
    SY_THROW(IoError, "'", path, "': ", st.st_size, " bytes, more than the ", max_bytes, " expected of such a file");
  }
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < text.size()) {
    const ssize_t n = ::read(fd, text.data() + got, text.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  text.resize(got);
  return text;
}

std::string json_excerpt(const nlohmann::json& j) {
  std::string s = j.dump();  // depth already bounded by parse_untrusted_json
  constexpr size_t kKeep = 80;
  if (s.size() > kKeep) s = s.substr(0, kKeep) + "... (" + std::to_string(s.size()) + " characters)";
  return s;
}

double json_finite(const nlohmann::json& j, const std::string& field) {
  if (!j.is_number()) SY_THROW(ConfigError, field, " is ", json_excerpt(j), ", expected a number");
  const double v = j.get<double>();
  if (!std::isfinite(v)) SY_THROW(ConfigError, field, " = ", json_excerpt(j), ", expected a finite number");
  return v;
}

}  // namespace switchyard
