#include "core/failpoint.h"

#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "core/env.h"

namespace switchyard {

std::string failpoint_names() {
  std::string out;
  for (const char* name : kFailpoints) out += (out.empty() ? "" : ", ") + std::string(name);
  return out;
}

bool failpoints_armed() { return !env().failpoint.empty(); }

void failpoint(const char* name) {
  const std::string& spec = env().failpoint;
  if (spec.empty()) return;
  const auto hash = spec.find('#');
  if (spec.compare(0, hash, name) != 0 || (hash == std::string::npos ? spec.size() : hash) != std::char_traits<char>::length(name))
    return;
  static std::atomic<long long> passes{0};
  const long long n = hash == std::string::npos ? 1 : std::atoll(spec.c_str() + hash + 1);
  if (passes.fetch_add(1) + 1 == n) ::raise(SIGKILL);
}

}  // namespace switchyard
