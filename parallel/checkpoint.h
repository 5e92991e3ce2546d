// Sharded checkpoints in generations: the one format for layer, model and
// training state.
//
// DIR holds one complete generation at a time:
//   DIR/manifest.json                       the generation, world size, shards
//                                           with their bytes and CRC-32, and
//                                           the writer's metadata
//   DIR/g<G>.rank<r>-of-<W>.safetensors      rank r's tensors of generation G
// Every rank writes its shard to a temporary file, fsyncs it and renames it
// into place; rank 0 writes the manifest the same way, last, after every shard
// is on disk, then removes the files of older generations. A reader follows
// the manifest only, so it takes exactly one complete generation: a save
// killed part-way leaves the previous manifest and its shards untouched, and
// a missing or torn shard is named, never silently mixed with another.
//
// Tensors are keyed by logical name (a training run keys experts by logical
// expert id), so a checkpoint loads at another world size: a reader finds
// each name in whichever shard holds it.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "core/safetensors.h"

namespace switchyard {

inline constexpr const char* kCheckpointFormat = "switchyard-checkpoint-v1";

struct CheckpointShard {
  std::string file;  // relative to the directory
  uint64_t bytes = 0;
  uint32_t crc32 = 0;
};

// Writes this rank's tensors as its shard of a new generation in `dir`
// (created if missing). Collective over `world`: every rank passes its own
// tensors (names unique over all ranks); `metadata` is taken from rank 0.
// Returns the generation written.
// `side_files` (name -> text, e.g. config.json) are written by rank 0 beside
// the manifest once the generation is published, still under the lock.
uint64_t save_checkpoint(Communicator& world, const std::string& dir,
                         const std::vector<std::pair<std::string, TensorView>>& tensors,
                         const std::map<std::string, std::string>& metadata = {},
                         const std::map<std::string, std::string>& side_files = {});

// Every rank learns whether every rank succeeded at `step` (one
// max-all-reduce of a flag per rank): all throw IoError, the failing ranks
// with their `error`, the others naming who failed. Collective; error empty
// on success.
void agree_on_success(Communicator& world, const std::string& dir, const std::string& error, const std::string& step);

// What a manifest says, checked: the format, the generation, the world size,
// shard file names inside the directory, one shard per rank. InvalidArgument
// naming `dir` otherwise. (Checkpoint::open reads it from DIR/manifest.json.)
struct CheckpointManifest {
  uint64_t generation = 0;
  int world_size = 0;
  std::vector<CheckpointShard> shards;
  std::map<std::string, std::string> metadata;
};
CheckpointManifest parse_checkpoint_manifest(const std::string& text, const std::string& dir);

// The complete generation a directory's manifest names.
class Checkpoint {
 public:
  // Reads DIR/manifest.json and opens every shard it lists, checking each
  // one's size and CRC-32. IoError naming the directory when there is no
  // manifest; InvalidArgument naming the shard when one is missing or torn.
  static Checkpoint open(const std::string& dir);
  // Whether DIR has a manifest (a checkpoint to resume from).
  static bool exists(const std::string& dir);

  const std::string& dir() const { return dir_; }
  uint64_t generation() const { return generation_; }
  int world_size() const { return world_size_; }
  const std::vector<CheckpointShard>& shards() const { return shards_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The writer's metadata value; InvalidArgument naming the key when absent.
  const std::string& meta(const std::string& key) const;

  bool contains(const std::string& tensor) const { return where_.count(tensor) != 0; }
  // Every tensor name, in order.
  std::vector<std::string> names() const;
  // A fresh copy of the tensor; InvalidArgument naming the checkpoint and the
  // tensor when absent, or when its shape differs from `expected_shape`
  // (checked when non-empty). bf16 tensors are widened to f32 exactly.
  Tensor load_f32(const std::string& tensor, const Shape& expected_shape = {}) const;
  // The tensor as stored (its own dtype).
  Tensor load(const std::string& tensor) const;

 private:
  std::string dir_;
  uint64_t generation_ = 0;
  int world_size_ = 0;
  std::vector<CheckpointShard> shards_;
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> where_;  // tensor -> file
};

// The logical expert a tensor belongs to ("experts.5.w1", "layers.2.ffn.experts.5.b2",
// "adamw.m.layers.2.ffn.experts.5.w1": 5), or -1.
int checkpoint_expert_of(const std::string& tensor);

struct ReshardReport {
  int experts = 0;        // distinct logical experts found
  int source_ranks = 0;   // the world that saved the source
  int ranks = 0;
};
// Rewrites a checkpoint directory as `ranks` shards of a new generation in
// `target_dir`, laid out as a layer of that many ranks stores its experts
// (identity placement; an expert sliced over several ranks: its first
// slice's rank), everything else on rank 0. Not collective. Loading needs no
// reshard (a reader finds every tensor wherever it is); this makes each
// rank's shard hold what it loads, for loaders that read only their own.
ReshardReport reshard_checkpoint(const std::string& source_dir, const std::string& target_dir, int ranks);

}  // namespace switchyard
