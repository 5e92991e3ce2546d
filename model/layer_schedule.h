// Which ranks run which layer of a decoder, in which group.
//
// A schedule is a list of per-layer assignments over a world of W ranks:
// where the layer's attention runs (and so where its KV lives) and which
// ranks compute its FFN (the expert group). The attention modes:
//   replicated  every rank runs every sequence's attention (one token group);
//               the sequential decoder spread over ranks only by its experts
//   dp          DeepSeek/SGLang "DP attention": each rank holds its own
//               sequences and their KV (W token groups); the MoE layers take
//               every rank's tokens through one all-to-all
//   tp          Megatron tensor-parallel attention: W / tp groups of tp
//               consecutive ranks; a group shares its sequences, each of its
//               ranks runs heads [t h / tp, (t + 1) h / tp) and keeps their KV;
//               the output projection's partial sums are reduce-scattered
//               over the token rows, each rank runs the MoE layer on its row
//               slice, and an all-gather gives the group its rows back
// EasySpec's parallel layer groups (layer_parallel) and attention-FFN
// disaggregation's role split (disaggregated) are further instances of the
// same table.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace switchyard {

enum class AttentionMode { replicated, dp, tp };
const char* attention_mode_name(AttentionMode mode);

struct LayerAssignment {
  int layer = 0;
  AttentionMode attention = AttentionMode::replicated;
  std::vector<int> attention_ranks;  // ranks that run this layer's attention and keep its KV
  std::vector<int> ffn_ranks;        // the layer's expert group
};

// Attention-FFN disaggregation (Step-3, MegaScale-Infer): the attention
// ranks run DP attention (each its own sequences and KV), the router and the
// combine, and hold no experts; the FFN ranks hold every expert (spread over
// them: EP inside the FFN group) and no attention. Together they are the world.
struct RoleSplit {
  std::vector<int> attention, ffn;  // ascending, disjoint
  // "A:F": the first A ranks attention, the next F ranks FFN; or rank lists
  // "[0,2]:[1,3]" (brackets optional where a side has a comma). ConfigError
  // naming `field`, the value and what was expected (A, F >= 1, every rank
  // of the world once).
  static RoleSplit parse(const std::string& spec, int world, const std::string& field = "--afd");
  // Explicit rank lists; the same checks.
  static RoleSplit of(std::vector<int> attention, std::vector<int> ffn, int world, const std::string& field = "--afd");
  bool is_attention(int rank) const;
  bool is_ffn(int rank) const;
  // This rank's index among the attention ranks (-1: an FFN rank).
  int attention_index(int rank) const;
  std::string name() const;  // Step-3's notation: "2A2F"
  bool operator==(const RoleSplit&) const = default;
};

// What a user chooses (YAML model.attention / model.tp, or the CLI's
// --attention / --tp / --afd); field names go into the errors.
struct ScheduleOptions {
  std::string attention = "replicated";
  int tp = 1;
  std::string attention_field = "model.attention";
  std::string tp_field = "model.tp";
  std::string afd;  // "A:F" (RoleSplit::parse); empty: colocated
  std::string afd_field = "model.afd";
};

class LayerSchedule {
 public:
  // ConfigError naming the field, the value and what was expected.
  static LayerSchedule make(const ScheduleOptions& options, int layers, int world);
  static LayerSchedule replicated(int layers, int world);
  static LayerSchedule data_parallel(int layers, int world);
  static LayerSchedule tensor_parallel(int layers, int world, int tp);
  // EasySpec's layer-parallel draft: every rank the same sequences (one
  // token group); the first and last layers run alone, the middle ones in
  // groups of up to `n` consecutive layers whose attention runs at once, layer
  // i of a group of g on the ranks r with r mod g = i in each whole block of
  // g consecutive ranks (the block gathers its own; ranks past the last
  // whole block compute none and join block 0's), from the group's shared input
  // (fuzzy); then every rank adds the group's deltas and runs its FFNs in
  // order. Every rank keeps
  // every layer's KV, so an exact pass (InferenceEngine::step_exact) can
  // recompute all of it. `field` names the option in errors (--lp).
  static LayerSchedule layer_parallel(int layers, int world, int n, const std::string& field = "--lp");
  // Attention-FFN disaggregation: every layer's attention data-parallel over
  // roles.attention (one token group each), its FFN on roles.ffn. FFN ranks
  // belong to no token group and own no KV.
  static LayerSchedule disaggregated(int layers, const RoleSplit& roles);

  AttentionMode attention() const { return mode_; }
  int world() const { return world_; }
  int tp() const { return tp_; }  // ranks per token group sharing its heads (1 unless tp)
  int tp_rank(int rank) const { return mode_ == AttentionMode::tp ? rank % tp_ : 0; }
  int layer_count() const { return static_cast<int>(layers_.size()); }
  const LayerAssignment& layer(int l) const { return layers_.at(static_cast<size_t>(l)); }
  // Token groups: sets of ranks that hold the same sequences (replicated: one
  // of every rank; dp: one per rank; tp: one per tensor-parallel group).
  // Requests are assigned to groups.
  int token_groups() const { return groups_; }
  int token_group_of(int rank) const;  // -1: an FFN rank of a disaggregated schedule (no sequences)
  int group_leader(int group) const;  // the lowest rank of a token group: it speaks for the group
  // Layers whose attention (and KV) `rank` runs.
  std::vector<int> owned_layers(int rank) const;
  // Layer-parallel groups in order (every layer in one; empty unless layer_parallel).
  const std::vector<std::vector<int>>& layer_groups() const { return layer_groups_; }
  // The role split of a disaggregated schedule (else empty).
  const std::optional<RoleSplit>& roles() const { return roles_; }
  std::string describe() const;

 private:
  AttentionMode mode_ = AttentionMode::replicated;
  int world_ = 1, groups_ = 1, tp_ = 1;
  std::vector<LayerAssignment> layers_;
  std::vector<std::vector<int>> layer_groups_;
  std::optional<RoleSplit> roles_;
};

}  // namespace switchyard
