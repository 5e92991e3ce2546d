#include "launch/placement_file.h"

#include <yaml-cpp/yaml.h>

#include "core/error.h"

namespace switchyard {
namespace {
std::string at(const std::string& path, const YAML::Node& node) {
  const YAML::Mark m = node.Mark();
  return m.is_null() ? path : path + ":" + std::to_string(m.line + 1);
}

int integer(const std::string& path, const YAML::Node& node, const std::string& field) {
  try {
    if (node.IsScalar()) return node.as<int>();
  } catch (const YAML::Exception&) {
  }
  SY_THROW(ConfigError, at(path, node), ": ", field, ": got ", node.IsScalar() ? "'" + node.Scalar() + "'" : "a non-scalar",
           ", expected an integer");
}
}  // namespace

ExpertPlacement load_placement_file(const std::string& path, int experts, int ranks) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    SY_THROW(IoError, "placement file '", path, "' cannot be read");
  } catch (const YAML::Exception& e) {
    SY_THROW(ConfigError, path, ":", e.mark.line + 1, ": ", e.msg);
  }
  if (!root.IsMap()) SY_THROW(ConfigError, path, ": expected a map with slots_per_rank and experts");
  for (const auto& kv : root) {
    const std::string key = kv.first.Scalar();
    if (key != "slots_per_rank" && key != "experts")
      SY_THROW(ConfigError, at(path, kv.first), ": unknown key '", key, "', expected slots_per_rank or experts");
  }
  if (!root["slots_per_rank"]) SY_THROW(ConfigError, path, ": slots_per_rank is missing");
  const int slots = integer(path, root["slots_per_rank"], "slots_per_rank");
  if (slots < 0) SY_THROW(ConfigError, at(path, root["slots_per_rank"]), ": slots_per_rank = ", slots, ", expected >= 0");
  const YAML::Node list = root["experts"];
  if (!list || !list.IsMap())
    SY_THROW(ConfigError, at(path, list ? list : root), ": experts: expected a map {logical id: [physical slots]}");
  std::vector<std::vector<int>> slots_of(static_cast<size_t>(experts));
  std::vector<bool> seen(static_cast<size_t>(experts), false);
  std::vector<int> owner_of_slot(static_cast<size_t>(std::max<int64_t>(0, static_cast<int64_t>(ranks) * slots)), -1);
  for (const auto& kv : list) {
    const int e = integer(path, kv.first, "experts key");
    if (e < 0 || e >= experts)
      SY_THROW(ConfigError, at(path, kv.first), ": expert ", e, " is not a logical expert; expected 0..", experts - 1);
    if (seen[static_cast<size_t>(e)]) SY_THROW(ConfigError, at(path, kv.first), ": expert ", e, " is listed twice");
    seen[static_cast<size_t>(e)] = true;
    if (!kv.second.IsSequence() || kv.second.size() == 0)
      SY_THROW(ConfigError, at(path, kv.second), ": expert ", e, ": expected a non-empty list of physical slots");
    for (const auto& p : kv.second) {
      const int slot = integer(path, p, "physical slot");
      if (slot < 0 || static_cast<int64_t>(slot) >= static_cast<int64_t>(ranks) * slots)
        SY_THROW(ConfigError, at(path, p), ": expert ", e, " at physical slot ", slot, ", expected 0..",
                 static_cast<int64_t>(ranks) * slots - 1, " (", ranks, " ranks x ", slots, " slots_per_rank)");
      if (owner_of_slot[static_cast<size_t>(slot)] >= 0)
        SY_THROW(ConfigError, at(path, p), ": physical slot ", slot, " given to experts ",
                 owner_of_slot[static_cast<size_t>(slot)], " and ", e, "; expected one expert per slot");
      owner_of_slot[static_cast<size_t>(slot)] = e;
      slots_of[static_cast<size_t>(e)].push_back(slot);
    }
  }
  for (int e = 0; e < experts; ++e)
    if (!seen[static_cast<size_t>(e)])
      SY_THROW(ConfigError, path, ": expert ", e, " has no slot; expected every logical expert 0..", experts - 1);
  try {
    return ExpertPlacement::from_replicas(experts, ranks, slots, slots_of);
  } catch (const InvalidArgument& e) {
    SY_THROW(ConfigError, path, ": ", e.what());
  }
}

}  // namespace switchyard
