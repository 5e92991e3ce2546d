// The parallel inference engine: a Model run over the world by a
// LayerSchedule. Each rank passes the chunks of its own token group (dp:
// its own sequences; replicated: the group's, the same on every rank) and
// every rank takes part in every layer's MoE collectives, with no rows when
// it has nothing to compute this step, so no token is computed twice under
// dp and ranks without work never stall the others.
#pragma once

#include <memory>

#include "model/layer_schedule.h"
#include "model/model.h"

namespace switchyard {

class InferenceEngine {
 public:
  // The schedule's world must be the model's expert group.
  InferenceEngine(Model& model, LayerSchedule schedule);
  Model& model() { return model_; }
  const LayerSchedule& schedule() const { return schedule_; }
  Communicator& world() { return *model_.expert_group(); }
  int rank() const { return rank_; }
  int token_group() const { return schedule_.token_group_of(rank_); }
  bool speaks_for_group() const { return schedule_.group_leader(token_group()) == rank_; }
  // A sequence's cache over the layers this rank owns.
  KVCache new_cache(int capacity) const { return model_.new_cache(capacity, schedule_.owned_layers(rank_)); }
  // One step: logits [rows, vocab] of this rank's chunks (sequence after
  // sequence); the caches take the new positions. Collective over the world.
  Tensor step(const std::vector<Chunk>& chunks);
  // Debug: under replicated attention, all-reduce a hash of every step's
  // chunks and fail when the ranks' inputs differ (they would silently
  // diverge otherwise).
  void set_check_replicas(bool on) { check_replicas_ = on; }

 private:
  void verify_replicas(const std::vector<Chunk>& chunks);
  Model& model_;
  LayerSchedule schedule_;
  int rank_;
  bool check_replicas_ = false;
};

}  // namespace switchyard
