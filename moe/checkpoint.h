// MoE checkpoints: safetensors shards `prefix.rank<r>-of-<W>.safetensors`, each
// holding whole logical experts ("experts.<e>.w1" ...) and rank 0 the gate, so
// any world size, E/W split, placement or plan can load them (MoELayer::load).
#pragma once

#include <string>
#include <vector>

#include "core/safetensors.h"

namespace switchyard {

// Every shard of a checkpoint prefix, whatever world size wrote it; IoError
// naming the pattern when there is none.
std::vector<SafetensorsFile> open_checkpoint_shards(const std::string& prefix);

struct ReshardReport {
  int experts = 0;
  int source_shards = 0;
  int ranks = 0;
};
// Rewrites a checkpoint as `ranks` shards laid out as a layer of that many
// ranks would save it (identity placement): rank r holds the experts it
// stores, or the first slice's rank holds an expert shared by several ranks.
ReshardReport reshard_checkpoint(const std::string& source_prefix, const std::string& target_prefix, int ranks);

}  // namespace switchyard
