#include "moe/checkpoint.h"

#include <filesystem>
#include <map>
#include <set>

#include "core/error.h"
#include "moe/param_layout.h"

namespace switchyard {

std::vector<SafetensorsFile> open_checkpoint_shards(const std::string& prefix) {
  namespace fs = std::filesystem;
  const fs::path base(prefix);
  const fs::path dir = base.has_parent_path() ? base.parent_path() : fs::path(".");
  const std::string stem = base.filename().string() + ".rank";
  std::vector<SafetensorsFile> shards;
  if (fs::is_directory(dir))
    for (const auto& entry : fs::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind(stem, 0) == 0 && name.size() > 12 && name.substr(name.size() - 12) == ".safetensors")
        shards.push_back(SafetensorsFile::open(entry.path().string()));
    }
  if (shards.empty()) SY_THROW(IoError, "moe checkpoint: no shards '", prefix, ".rank*-of-*.safetensors'");
  return shards;
}

ReshardReport reshard_checkpoint(const std::string& source_prefix, const std::string& target_prefix, int ranks) {
  if (ranks < 1) SY_THROW(InvalidArgument, "reshard: ranks = ", ranks, ", expected >= 1");
  const auto shards = open_checkpoint_shards(source_prefix);
  // Which file holds each tensor (a tensor in two files: stale shards of another save).
  std::map<std::string, const SafetensorsFile*> where;
  std::set<int> experts;
  for (const auto& f : shards)
    for (const auto& e : f.entries()) {
      auto [it, fresh] = where.emplace(e.name, &f);
      if (!fresh)
        SY_THROW(InvalidArgument, "reshard: tensor '", e.name, "' is in both '", it->second->path(), "' and '",
                 f.path(), "'; shards of several saves share the prefix '", source_prefix, "'");
      if (e.name.rfind("experts.", 0) == 0) experts.insert(std::stoi(e.name.substr(8)));
    }
  const int E = static_cast<int>(experts.size());
  if (E == 0 || *experts.rbegin() != E - 1)
    SY_THROW(InvalidArgument, "reshard: checkpoint '", source_prefix, "' holds experts ",
             E == 0 ? std::string("none") : std::to_string(*experts.begin()) + ".." + std::to_string(*experts.rbegin()),
             " (", E, " distinct); expected 0..E-1");
  if (!where.count("gate.weight")) SY_THROW(InvalidArgument, "reshard: checkpoint '", source_prefix, "' has no gate.weight");
  const ParamLayout layout(E, ranks);  // validates E against ranks
  std::vector<std::vector<std::string>> names(static_cast<size_t>(ranks));
  names[0].push_back("gate.weight");
  for (const auto& [name, file] : where)
    if (name.rfind("experts.", 0) == 0) names[static_cast<size_t>(layout.owner(std::stoi(name.substr(8))))].push_back(name);
  for (int r = 0; r < ranks; ++r) {
    std::vector<Tensor> keep;
    std::vector<std::pair<std::string, TensorView>> tensors;
    for (const auto& name : names[static_cast<size_t>(r)]) {
      keep.push_back(where.at(name)->load(name));
      tensors.emplace_back(name, keep.back().view());
    }
    save_safetensors(target_prefix + ".rank" + std::to_string(r) + "-of-" + std::to_string(ranks) + ".safetensors",
                     tensors, {{"format", "switchyard-moe-v1"}, {"experts", std::to_string(E)}});
  }
  return {E, static_cast<int>(shards.size()), ranks};
}

}  // namespace switchyard
