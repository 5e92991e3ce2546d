#include "parallel/exec_plan.h"

#include "core/error.h"

namespace switchyard {

std::string ExecPlan::describe() const {
  return detail::make_string("r = ", r, ", o = ", d, ", a2a = ", to_string(a2a), ", x = ", to_string(exchange),
                             shuffle ? ", shuffled" : "");
}

uint64_t ExecPlan::hash() const {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields
  for (uint64_t v : {static_cast<uint64_t>(r), static_cast<uint64_t>(d), static_cast<uint64_t>(a2a),
                     static_cast<uint64_t>(exchange)}) {
    h ^= v;
    h *= 1099511628211ull;
  }
  if (shuffle) h = (h ^ 1) * 1099511628211ull;  // unshuffled plans keep the hashes they always had
  return h;
}

std::vector<int> valid_sharding_degrees(int shards) {
  std::vector<int> out{0};
  for (int r = 1; r <= shards; ++r)
    if (shards % r == 0) out.push_back(r);
  return out;
}

const char* to_string(ExchangeMode mode) { return mode == ExchangeMode::padded ? "padded" : "dropless"; }
const char* to_string(A2AAlgorithm algorithm) { return algorithm == A2AAlgorithm::flat ? "flat" : "2dh"; }

ExchangeMode parse_exchange_mode(const std::string& text, const std::string& field) {
  if (text == "padded") return ExchangeMode::padded;
  if (text == "dropless") return ExchangeMode::dropless;
  SY_THROW(InvalidArgument, field, " = '", text, "', expected padded or dropless");
}

A2AAlgorithm parse_a2a_algorithm(const std::string& text, const std::string& field) {
  if (text == "flat") return A2AAlgorithm::flat;
  if (text == "2dh" || text == "hierarchical") return A2AAlgorithm::hierarchical;
  SY_THROW(InvalidArgument, field, " = '", text, "', expected flat or 2dh");
}

}  // namespace switchyard
