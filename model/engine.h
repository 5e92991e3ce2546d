// The parallel inference engine: a Model run over the world by a
// LayerSchedule. Each rank passes the chunks of its own token group (dp:
// its own sequences; replicated: the group's, the same on every rank) and
// every rank takes part in every layer's MoE collectives, with no rows when
// it has nothing to compute this step, so no token is computed twice under
// dp and ranks without work never stall the others.
#pragma once

#include <map>
#include <memory>

#include "model/layer_schedule.h"
#include "model/model.h"
#include "moe/affinity.h"
#include "moe/planner.h"

namespace switchyard {

// Device memory one rank of a decode needs: its weights and each sequence's
// KV. Under emulation the preset's HBM capacity bounds it, as on a real GPU.
struct DecodeMemory {
  double weights = 0;          // bytes of this rank's weights
  double kv_per_position = 0;  // bytes of KV one sequence position takes on this rank
  double capacity = 0;         // bytes of device memory per rank; 0: unbounded
  // Sequences of `positions` positions each that fit beside the weights
  // (0 when not even the weights fit); -1: unbounded.
  int64_t max_sequences(int positions) const;
};

class InferenceEngine {
 public:
  // The schedule spans `group` (default: the model's expert group). A group
  // larger than the expert group runs a model whose experts are local to each
  // rank (a small draft replicated on every rank: its MoE layers need no
  // all-to-all); its step() then takes only replicated or layer-parallel
  // schedules. Collective over the group (tp: splits it into the
  // tensor-parallel groups).
  InferenceEngine(Model& model, LayerSchedule schedule, std::shared_ptr<Communicator> group = nullptr);
  Model& model() { return model_; }
  const Model& model() const { return model_; }
  const LayerSchedule& schedule() const { return schedule_; }
  Communicator& world() { return *group_; }
  int rank() const { return rank_; }
  int token_group() const { return schedule_.token_group_of(rank_); }
  bool speaks_for_group() const { return token_group() >= 0 && schedule_.group_leader(token_group()) == rank_; }
  // A sequence's cache over the layers this rank owns (tp: its heads' share).
  KVCache new_cache(int capacity) const;
  // Floats of KV one position of one sequence takes on this rank, over its layers.
  int64_t kv_floats_per_position() const;
  // This rank's weights, KV per position and device capacity (the model's
  // device model; 0: unbounded).
  DecodeMemory memory() const;
  // The ranks of this rank's tensor-parallel group (tp; else nullptr).
  const std::shared_ptr<Communicator>& tp_group() const { return tp_group_; }
  // One step: logits [rows, vocab] of this rank's chunks (sequence after
  // sequence); the caches take the new positions. Collective over the world.
  Tensor step(const std::vector<Chunk>& chunks);
  // The same step with every layer exact, in order, on every rank: under a
  // layer-parallel schedule the fuzzy groups are computed sequentially (every
  // rank every layer, so every rank's KV of every layer is exact again);
  // other schedules: step().
  Tensor step_exact(const std::vector<Chunk>& chunks);
  // Debug: under replicated attention (tp: inside each tensor-parallel
  // group), all-reduce a hash of every step's chunks and fail when the
  // ranks' inputs differ (they would silently diverge otherwise).
  void set_check_replicas(bool on) { check_replicas_ = on; }

  // Attention-FFN disaggregation's ping-pong depth: each step's sequences
  // go through the layers in m micro-batches (contiguous, balanced by rows),
  // so the FFN ranks compute micro-batch i of a layer while the attention
  // ranks run micro-batch i + 1. Every rank may set its own; a step uses the
  // largest the attention ranks set (agreed at its start), so it may change
  // from step to step. Without roles it does nothing.
  // m = 0: automatic, each step MegaScale-Infer's bound m >= 2 (1 + Tc / Tf)
  // from the previous step's measured Ta (an attention rank's attention of
  // one micro-batch and layer), Te (an FFN rank's experts) and Tc (an FFN
  // rank's wait for the rows after the count exchange), Tf = max(Ta, Te);
  // 2 when Tc >= Tf; at most 8 and the most sequences an attention rank
  // holds (auto_microbatches in model/afd_plan.h). A fixed m set on any attention
  // rank wins.
  void set_microbatches(int m);
  int microbatches() const { return microbatches_; }
  int last_microbatches() const { return last_microbatches_; }  // what the last step used

  // Where this rank's step time went, summed over steps: waiting = inside the
  // MoE layers' exchanges (count exchange, dispatch and return waits) and the
  // step's agreement, the rest is busy. On a disaggregated schedule the
  // waiting share is the side's pipeline bubble; colocated, the exposed
  // all-to-all. Wall seconds, and virtual ones when emulated.
  struct StepTimes {
    int64_t steps = 0;
    double seconds = 0, waiting = 0;
    double virtual_seconds = 0, virtual_waiting = 0;
    double bubble() const { return seconds > 0 ? waiting / seconds : 0; }
    double virtual_bubble() const { return virtual_seconds > 0 ? virtual_waiting / virtual_seconds : 0; }
  };
  const StepTimes& step_times() const { return step_times_; }
  void reset_step_times() { step_times_ = {}; }

  // A disaggregated step's timeline, recorded while on: what this rank was
  // busy with and when (attention ranks: a micro-batch's attention; FFN
  // ranks: its experts), in virtual seconds when the model is
  // emulated, else wall seconds, from the step's start. Each step replaces it.
  struct BusySpan {
    int layer = 0, microbatch = 0;
    bool attention = true;
    double start = 0, end = 0;
  };
  void record_timeline(bool on) { record_timeline_ = on; }
  const std::vector<BusySpan>& timeline() const { return timeline_; }

  // Speculative token shuffling (Sem-MoE's s-TS, moe/affinity.h) under
  // tensor-parallel attention: before each layer's MoE, the group's rows go
  // to the ranks the tables predict for them (equal chunks, overflow to each
  // row's next-best rank) inside the reduce-scatter that ends the attention
  // (its row blocks permuted), and come back to their places in the
  // all-gather after the MoE (which also carries each row's expert ranks, the
  // look-back key of the next layers, and how many of its choices were
  // local), so no collective is added and every logit keeps its bits. The
  // tables must be for the world's ranks and the model must hold the tables'
  // placement (ModelOptions::placements = tables.placements()). nullptr turns
  // it off. Every rank must set the same (collective: it measures the
  // shuffle's host cost, and automatic calibrates the links).
  struct TokenShufflingOptions {
    AffinityPredictor predictor = AffinityPredictor::joint;
    // false: every batch shuffles at every layer. true: per batch and layer a
    // planner (parallel/planner.h; ExecPlan::shuffle) prices the MoE
    // all-to-all with the rows in place and shuffled, each at the local share
    // of choices that layout has reached (learned from the rows' own counts
    // in the all-gather, seeded by the tables' confidence), against the
    // shuffle's host cost, and shuffles when that pays; its decisions are
    // logged (subsystem "planner") when they change. It does not look at each
    // row's own prediction first: that is the cost it decides whether to pay.
    bool automatic = false;
    // automatic: ranks per node of the expert group, for the link calibration
    // (MoEPlanner::calibrate); 0: all on one node.
    int ranks_per_node = 0;
    // The shuffle's host cost, seconds_per_batch + seconds_per_row x the
    // group's rows; negative: measured here (thread CPU time of the
    // prediction and assignment on a synthetic batch, the slowest rank's).
    // Emulated, the virtual clock is charged what of it outlasts the layer's
    // heads (the host predicts while the device computes them); the planner
    // prices all of it.
    double seconds_per_batch = -1, seconds_per_row = -1;
  };
  void set_token_shuffling(std::shared_ptr<const AffinityTables> tables, const TokenShufflingOptions& options);
  void set_token_shuffling(std::shared_ptr<const AffinityTables> tables) { set_token_shuffling(std::move(tables), {}); }
  bool token_shuffling() const { return shuffle_tables_ != nullptr; }
  bool token_shuffling_automatic() const { return shuffle_planner_ != nullptr; }
  // Rows shuffled so far at layers >= 1 and those whose rank came from a
  // look-back table; layer-batches decided (a layer of a step with rows) and
  // shuffled. Each member of a group counts the group's.
  struct ShuffleCounts {
    int64_t rows = 0, predicted = 0;
    int64_t decided = 0, shuffled = 0;
  };
  const ShuffleCounts& shuffle_counts() const { return shuffle_counts_; }
  // The shuffle's host cost in use (measured or given), seconds.
  const ShuffleCost& shuffle_cost() const { return shuffle_cost_; }
  // automatic: the local share of choices layer `layer` expects with its rows
  // in place and shuffled (what the planner prices), and why it decided as it
  // did last; else {0, 0} and "".
  std::pair<double, double> shuffle_local_shares(int layer) const;
  std::string shuffle_explanation(int layer) const;

 private:
  void verify_replicas(const std::vector<Chunk>& chunks);
  Tensor step_tensor_parallel(const std::vector<Chunk>& chunks);
  void shuffle_rows(int layer, const std::vector<int32_t>& token_of_row, const std::vector<uint32_t>& mask1,
                    const std::vector<uint32_t>& mask2, int64_t per, std::vector<int64_t>& at, std::vector<int64_t>& held);

  Tensor step_layer_parallel(const std::vector<Chunk>& chunks);
  Tensor step_disaggregated(const std::vector<Chunk>& chunks);
  Tensor step_any(const std::vector<Chunk>& chunks);
  // Wall and virtual seconds the MoE layers spent waiting on their exchanges so far.
  std::pair<double, double> exchange_waits() const;
  Model& model_;
  LayerSchedule schedule_;
  std::shared_ptr<Communicator> group_;
  int rank_;
  std::shared_ptr<Communicator> tp_group_;
  // EasySpec: per layer-group size g, this rank's block of g ranks for the deltas' all-gather.
  std::map<int, std::shared_ptr<Communicator>> layer_parallel_groups_;
  std::vector<std::unique_ptr<AttentionBlock>> tp_attention_;  // this rank's heads of every layer
  bool check_replicas_ = false;
  int microbatches_ = 1;
  int last_microbatches_ = 1;
  // The last step's measured per-(layer, micro-batch) means on this rank (0: not measured here).
  double measured_ta_ = 0, measured_te_ = 0, measured_tc_ = 0;
  StepTimes step_times_;
  std::shared_ptr<const AffinityTables> shuffle_tables_;
  TokenShufflingOptions shuffle_options_;
  ShuffleCounts shuffle_counts_;
  ShuffleCost shuffle_cost_;
  std::unique_ptr<ShufflePlanner> shuffle_planner_;  // automatic
  bool record_timeline_ = false;
  std::vector<BusySpan> timeline_;
};

}  // namespace switchyard
