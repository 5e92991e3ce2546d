// The decoder-only MoE transformer of examples/tiny_lm (README.md there is
// the architecture), run on Switchyard's own kernels and communicators: per
// layer an AttentionBlock and an FFN block whose MoE layer spreads the experts
// over the expert group. Model runs the layers in order on whatever rows the
// caller gives this rank (the same rows on every rank: attention replicated;
// each rank its own sequences: data-parallel attention, model/engine.h).
//
// Inference only. Every product is row-wise batch-invariant
// (kernels/rowwise.h) and attention reduces each query row in key order, so
// a position's logits are bit-identical whether it is computed in a prefill,
// in a multi-token verification chunk or in a one-token decode step, alone
// or beside other sequences, on any number of ranks.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/tensor.h"
#include "model/blocks.h"
#include "model/kv_cache.h"
#include "model/layer_schedule.h"
#include "model/model_config.h"
#include "moe/moe_layer.h"

namespace switchyard {

// Wall seconds per phase, summed over calls.
struct ModelPhaseTimes {
  double embed = 0, attention = 0, moe = 0, head = 0;
};

struct ModelOptions {
  // Emulation (`group` an emulated communicator): every block charges its
  // modelled cost on this device to the calling thread's virtual time
  // (attention: model/blocks.h; experts: the MoE layer's charges; embedding
  // and head: their bytes and GEMMs), so a step's virtual time is a GPU's.
  std::shared_ptr<const DeviceModel> device;
  // Attention-FFN disaggregation: the experts spread over roles->ffn only
  // (E / F each; the first E mod F ranks one more), none on the attention
  // ranks; an FFN rank loads no attention, embedding, head or gate, an
  // attention rank no expert. Empty: every rank both.
  std::optional<RoleSplit> roles;
  // What the MoE layers' exchanges carry (MoEConfig::dispatch_payload,
  // combine_payload): f32 (exact) or bf16.
  DType dispatch_payload = DType::f32;
  DType combine_payload = DType::f32;
  // Expert grouping (moe/expert_grouping.h, AffinityTables::placements): the
  // placement of each MoE layer's experts on the expert group; empty: E / W
  // per rank in expert order. The gate routes logical experts, so outputs do
  // not change.
  std::vector<ExpertPlacement> placements;
};

class Model {
 public:
  // DIR/config.json and DIR/model.safetensors (bf16 or f32), or a training
  // checkpoint's DIR/manifest.json and shards (parallel/checkpoint.h, experts
  // keyed by logical id; model/lm_train.h writes them). Errors name the
  // file, the tensor and the expected shape. Collective over `group`: its
  // size divides the expert count (E / W experts per rank), or the expert
  // count divides it (expert data parallelism: W / E replicas of every
  // expert, one expert per rank, a token served inside its own expert group
  // of E consecutive ranks).
  Model(const std::string& dir, std::shared_ptr<Communicator> group, ModelOptions options = {});
  const std::shared_ptr<const DeviceModel>& device_model() const { return options_.device; }
  const ModelConfig& config() const { return config_; }
  KVCache new_cache(int capacity = 0) const { return KVCache(config_, capacity > 0 ? capacity : config_.max_seq); }
  KVCache new_cache(int capacity, const std::vector<int>& layers) const {
    return KVCache(config_, capacity > 0 ? capacity : config_.max_seq, layers);
  }

  // Rows are the chunks' tokens, sequence after sequence.
  Tensor embed(const std::vector<Chunk>& chunks);
  // x += attention(rmsnorm(x)) for layer `layer`; writes the chunks' keys and
  // values at each cache's length..length+n-1 (commit() makes them count).
  void attention(int layer, Tensor& x, const std::vector<Chunk>& chunks);
  // x += moe(rmsnorm(x)): collective over the expert group (every rank calls,
  // with its own rows, possibly none).
  void ffn(int layer, Tensor& x);
  // Throws on an FFN rank of a disaggregated model (it holds no attention).
  const AttentionBlock& attention_block(int layer) const;
  FfnBlock& ffn_block(int layer) { return *ffn_.at(static_cast<size_t>(layer)); }
  MoELayer& moe(int layer) { return ffn_.at(static_cast<size_t>(layer))->moe(); }
  const std::shared_ptr<Communicator>& expert_group() const { return group_; }
  const std::optional<RoleSplit>& roles() const { return options_.roles; }
  const ModelOptions& options() const { return options_; }
  // Whether this rank holds the attention side (embedding, attention, gates,
  // head): every rank unless disaggregated.
  bool holds_attention() const { return !options_.roles || options_.roles->is_attention(group_->rank()); }
  Tensor head(const Tensor& x);  // logits [rows, vocab]
  const Tensor& embedding() const { return embed_; }  // [vocab, d]; undefined on an FFN rank
  // Every layer the caches own takes the chunks' positions.
  void commit(const std::vector<Chunk>& chunks);
  // Every layer, then commit: logits [rows, vocab].
  Tensor forward(const std::vector<Chunk>& chunks);

  const ModelPhaseTimes& times() const { return times_; }
  // The same phases in virtual (emulated) seconds; zeros without emulation.
  const ModelPhaseTimes& virtual_times() const { return virtual_times_; }
  void reset_times() { times_ = virtual_times_ = {}; }
  // Redundant experts (EPLB, moe/eplb.h): every MoE layer re-places its
  // experts on E + redundant physical slots from the loads its ranks routed
  // since the last call, then migrates the weights. Collective over the
  // expert group; outputs do not change (a replica holds the same weights).
  struct Rebalance {
    double before = 1, after = 1;  // rank load max/mean on those loads, mean over layers (in-sample for `after`)
    std::string placement;         // the last layer's new placement
  };
  Rebalance rebalance_experts(int redundant);
  // What rebalance_experts(redundant) would refuse, thrown now (InvalidArgument).
  void check_redundant_experts(int redundant) const;
  // The routed choices per logical expert this rank's tokens made in layer
  // `layer` since the last reset (every batch of the layer, micro-batches included).
  const std::vector<double>& expert_load_since(int layer) const { return ffn_.at(static_cast<size_t>(layer))->load_since(); }
  // Forget the loads counted so far (e.g. a prefill's, before timing decode steps).
  void reset_expert_loads() {
    for (auto& block : ffn_) block->reset_load();
  }
  // Local activation (speculative MoE's LAR): per layer, the (row, choice)
  // pairs this rank's rows routed since the last reset, and those whose
  // expert has a replica on this rank (no all-to-all row).
  struct LocalActivationCount {
    std::vector<int64_t> pairs, local;
  };
  const LocalActivationCount& local_activation() const { return local_activation_; }
  void reset_local_activation();
  // Bytes of weights (all of them: attention, experts of every rank, embedding, head).
  double weight_bytes() const;
  double expert_bytes() const;  // one expert of one layer
  // Bytes of weights one rank holds when its attention keeps `attention_share`
  // of every layer's projections (1, or 1 / tp): its experts' slots, the
  // gates, norms, embedding and head (an FFN rank of a disaggregated model:
  // its experts alone).
  double rank_weight_bytes(double attention_share = 1.0) const;
  // Adds the wall and virtual seconds from its construction to its end to a
  // phase of the model's times (blocks a schedule walks itself time theirs).
  class PhaseTimer {
   public:
    PhaseTimer(Model& model, double ModelPhaseTimes::*phase);
    PhaseTimer(const PhaseTimer&) = delete;
    PhaseTimer& operator=(const PhaseTimer&) = delete;
    ~PhaseTimer();

   private:
    Model& model_;
    double ModelPhaseTimes::*phase_;
    std::chrono::steady_clock::time_point start_;
    double virtual_start_;
  };

 private:
  // Every expert on the FFN ranks of options_.roles (nullopt unless disaggregated).
  std::optional<ExpertPlacement> disaggregated_placement(const std::string& dir) const;
  void require_attention(const char* what) const;
  struct Source;  // the weights' file or checkpoint, opened once
  Model(Source source, const std::string& dir, std::shared_ptr<Communicator> group, ModelOptions options);
  ModelConfig config_;
  std::shared_ptr<Communicator> group_;
  ModelOptions options_;
  Tensor embed_, norm_, lm_head_;
  std::vector<std::unique_ptr<AttentionBlock>> attention_;
  std::vector<std::unique_ptr<MoEFfnBlock>> ffn_;
  ModelPhaseTimes times_, virtual_times_;
  LocalActivationCount local_activation_;
  std::vector<std::vector<char>> expert_here_;  // [layer][logical expert]: a replica on this rank
};

}  // namespace switchyard
