#include "model/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "core/dtype.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "parallel/checkpoint.h"
#include "comm/virtual_time.h"

namespace switchyard {
namespace {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// f32 copy of a checkpoint tensor of the expected shape (bf16 widened exactly).
Tensor load_f32(const SafetensorsFile& f, const std::string& name, const Shape& shape) {
  const SafetensorsEntry& e = f.entry(name);  // names the file and the tensor when missing
  if (e.shape != shape)
    SY_THROW(InvalidArgument, "model file '", f.path(), "': tensor '", name, "' has shape ", shape_string(e.shape),
             ", expected ", shape_string(shape), " (from config.json)");
  Tensor t = f.load(name);
  if (t.dtype() == DType::f32) return t;
  if (t.dtype() != DType::bf16)
    SY_THROW(InvalidArgument, "model file '", f.path(), "': tensor '", name, "' is ", dtype_name(t.dtype()),
             ", expected bf16 or f32");
  Tensor out = Tensor::empty(shape, DType::f32);
  convert(t.data(), DType::bf16, out.data(), DType::f32, static_cast<size_t>(t.numel()));  // exact widening
  return out;
}

}  // namespace

// Where a model's weights come from, opened once: a released model
// (config.json, model.safetensors with experts stacked per layer) or a
// checkpoint (parallel/checkpoint.h: experts keyed by logical id, the
// architecture in its manifest; config.json beside it is a copy for people).
struct Model::Source {
  ModelConfig config;
  std::optional<Checkpoint> checkpoint;
  std::optional<SafetensorsFile> file;
  static Source open(const std::string& dir) {
    Source s;
    if (Checkpoint::exists(dir)) {
      s.checkpoint = Checkpoint::open(dir);
      if (s.checkpoint->metadata().count("model_config")) {
        s.config = ModelConfig::parse(s.checkpoint->meta("model_config"), dir + "/manifest.json (model_config)");
        return s;
      }
    } else {
      s.file = SafetensorsFile::open(dir + "/model.safetensors");
    }
    s.config = ModelConfig::load(dir + "/config.json");
    return s;
  }
};

Model::Model(const std::string& dir, std::shared_ptr<Communicator> group, ModelOptions options)
    : Model(Source::open(dir), dir, std::move(group), std::move(options)) {}

Model::Model(Source source, const std::string& dir, std::shared_ptr<Communicator> group, ModelOptions options)
    : config_(std::move(source.config)), group_(std::move(group)), options_(std::move(options)) {
  const ModelConfig& c = config_;
  const int W = group_->size(), me = group_->rank();
  const std::optional<ExpertPlacement> ffn_only = disaggregated_placement(dir);
  const bool attention_here = holds_attention();
  if (!options_.placements.empty()) {
    if (static_cast<int>(options_.placements.size()) != c.layers)
      SY_THROW(InvalidArgument, "model '", dir, "': ", options_.placements.size(), " expert placements for ", c.layers,
               " MoE layers");
    if (ffn_only)
      SY_THROW(InvalidArgument, "model '", dir, "': an expert grouping placement with attention-FFN disaggregation is "
               "not built (the experts live on the FFN ranks)");
    for (size_t i = 0; i < options_.placements.size(); ++i)
      if (options_.placements[i].ranks() != W || options_.placements[i].experts() != c.experts)
        SY_THROW(InvalidArgument, "model '", dir, "': layer ", i, "'s placement is for ", options_.placements[i].experts(),
                 " experts on ", options_.placements[i].ranks(), " ranks; the model has ", c.experts, " experts on ", W,
                 " ranks");
  }
  if (!ffn_only && c.experts % W != 0 && W % c.experts != 0)
    SY_THROW(InvalidArgument, "model '", dir, "': ", c.experts, " experts cannot be spread evenly over ", W,
             " ranks (expected a rank count dividing ffn.experts, or a multiple of it)");
  const std::optional<Checkpoint>& checkpoint = source.checkpoint;
  const std::optional<SafetensorsFile>& file = source.file;
  auto tensor = [&](const std::string& name, const Shape& shape) {
    return checkpoint ? checkpoint->load_f32(name, shape) : load_f32(*file, name, shape);
  };
  const int64_t d = c.d_model, V = c.vocab_size, E = c.experts, H = c.hidden;
  const auto act = *kernels::parse_activation(c.activation);
  const int64_t H1 = act == kernels::Activation::swiglu ? 2 * H : H;
  const auto rope = std::make_shared<const RotaryTable>(c);
  if (attention_here) {
    embed_ = tensor("embed.weight", {V, d});
    norm_ = tensor("norm.weight", {d});
    lm_head_ = tensor("lm_head.weight", {d, V});
  }
  for (int i = 0; i < c.layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    if (attention_here) {
      AttentionWeights aw;
      aw.norm = tensor(p + "attn_norm.weight", {d});
      aw.wq = tensor(p + "attn.wq", {d, d});
      aw.wk = tensor(p + "attn.wk", {d, d});
      aw.wv = tensor(p + "attn.wv", {d, d});
      aw.wo = tensor(p + "attn.wo", {d, d});
      attention_.push_back(std::make_unique<AttentionBlock>(c, i, std::move(aw), rope));
      attention_.back()->set_device_model(options_.device);
    } else {
      attention_.push_back(nullptr);  // an FFN rank
    }
    // The FFN's norm runs where the rows are (the attention side sends normed rows).
    Tensor ffn_norm = attention_here ? tensor(p + "ffn_norm.weight", {d}) : Tensor::zeros({d}, DType::f32);
    MoEConfig mc;
    mc.model_dim = d;
    mc.hidden_dim = H;
    mc.activation = act;
    mc.router.experts = c.experts;
    mc.router.k = c.k;
    mc.router.gate = c.gate == "softmax" ? GateKind::softmax : GateKind::sigmoid_bias;
    mc.router.renormalize = c.renormalize;
    mc.router.capacity_factor = 0.0;  // dropless, as trained
    mc.plan.exchange = ExchangeMode::dropless;
    mc.batch_invariant = true;
    mc.device_model = options_.device;
    mc.dispatch_payload = options_.dispatch_payload;
    mc.combine_payload = options_.combine_payload;
    if (ffn_only) {
      mc.placement = ffn_only;
    } else if (!options_.placements.empty()) {
      mc.placement = options_.placements[static_cast<size_t>(i)];
    } else if (W > c.experts) {  // expert data parallelism: W / E expert groups, each holding every expert once
      mc.placement = ExpertPlacement::expert_data_parallel(c.experts, W, c.experts);
      mc.replica_domain = c.experts;
    }
    auto moe = std::make_unique<MoELayer>(mc, group_);
    if (attention_here) {  // the router runs beside the attention
      const Tensor gate = tensor(p + "ffn.gate.weight", {d, E});
      std::memcpy(moe->gate_weight().data(), gate.data(), gate.nbytes());
    }
    const bool experts_here = moe->layout().slots(me) > 0;
    Tensor w1, b1, w2, b2;  // stacked [E, ...] from a released model
    if (!checkpoint && experts_here) {
      w1 = tensor(p + "ffn.experts.w1", {E, d, H1}), b1 = tensor(p + "ffn.experts.b1", {E, H1});
      w2 = tensor(p + "ffn.experts.w2", {E, H, d}), b2 = tensor(p + "ffn.experts.b2", {E, d});
    }
    ExpertParams& ep = moe->params();
    for (int s = 0; s < moe->layout().slots(me); ++s) {
      const int e = moe->layout().expert_at(me, s);
      if (e < 0) continue;  // an unused slot
      auto copy_slot = [&](const Tensor& stacked, const char* field, const Shape& shape, Tensor& to) {
        const int64_t per = shape_numel(shape);
        const Tensor one = checkpoint ? tensor(p + "ffn.experts." + std::to_string(e) + "." + field, shape) : Tensor();
        const float* from = checkpoint ? one.data_as<float>() : stacked.data_as<float>() + e * per;
        std::memcpy(to.data_as<float>() + s * per, from, static_cast<size_t>(per) * sizeof(float));
      };
      copy_slot(w1, "w1", {d, H1}, ep.w1);
      copy_slot(b1, "b1", {H1}, ep.b1);
      copy_slot(w2, "w2", {H, d}, ep.w2);
      copy_slot(b2, "b2", {d}, ep.b2);
    }
    ffn_.push_back(std::make_unique<MoEFfnBlock>(std::move(ffn_norm), c.norm_eps, std::move(moe)));
  }
  expert_here_.resize(static_cast<size_t>(c.layers));
  reset_local_activation();
}

std::optional<ExpertPlacement> Model::disaggregated_placement(const std::string& dir) const {
  if (!options_.roles) return std::nullopt;
  const RoleSplit& roles = *options_.roles;
  const int W = group_->size(), E = config_.experts, F = static_cast<int>(roles.ffn.size());
  RoleSplit::of(roles.attention, roles.ffn, W, "model roles");  // names a split that does not fit this group
  if (F > E)
    SY_THROW(ConfigError, "model '", dir, "': ", F, " FFN ranks for ", E, " experts; expected at most ", E,
             " (each FFN rank holds whole experts: expert parallelism inside the FFN group)");
  std::vector<int> slots(static_cast<size_t>(W), 0), phy2log;
  for (int j = 0; j < F; ++j) slots[static_cast<size_t>(roles.ffn[static_cast<size_t>(j)])] = E / F + (j < E % F);
  // Physical slots are numbered rank by rank; expert e goes to the e-th slot in that order.
  for (int w = 0, e = 0; w < W; ++w)
    for (int s = 0; s < slots[static_cast<size_t>(w)]; ++s) phy2log.push_back(e++);
  return ExpertPlacement(E, std::move(slots), std::move(phy2log));
}

const AttentionBlock& Model::attention_block(int layer) const {
  const auto& block = attention_.at(static_cast<size_t>(layer));
  if (!block)
    SY_THROW(InvalidArgument, "model: rank ", group_->rank(), " is an FFN rank of ", options_.roles->name(),
             " and holds no attention (layer ", layer, ")");
  return *block;
}

Model::PhaseTimer::PhaseTimer(Model& model, double ModelPhaseTimes::*phase)
    : model_(model), phase_(phase), start_(Clock::now()), virtual_start_(virtual_time::now()) {}

Model::PhaseTimer::~PhaseTimer() {
  model_.times_.*phase_ += seconds_since(start_);
  model_.virtual_times_.*phase_ += virtual_time::now() - virtual_start_;
}

void Model::require_attention(const char* what) const {
  if (!holds_attention())
    SY_THROW(InvalidArgument, "model: ", what, " on rank ", group_->rank(), ", an FFN rank of ", options_.roles->name(),
             " (it holds experts only)");
}

Tensor Model::embed(const std::vector<Chunk>& chunks) {
  const PhaseTimer timer(*this, &ModelPhaseTimes::embed);
  require_attention("embed");
  const int64_t d = config_.d_model;
  int64_t rows = 0;
  for (const Chunk& c : chunks) rows += static_cast<int64_t>(c.tokens.size());
  Tensor x = Tensor::empty({rows, d}, DType::f32);
  int64_t r = 0;
  for (const Chunk& c : chunks)
    for (int t : c.tokens) {
      if (t < 0 || t >= config_.vocab_size)
        SY_THROW(InvalidArgument, "model: token ", t, ", expected 0..", config_.vocab_size - 1);
      std::memcpy(x.data_as<float>() + r++ * d, embed_.data_as<float>() + t * d, static_cast<size_t>(d) * sizeof(float));
    }
  if (options_.device) virtual_time::charge(options_.device->memory_seconds(2.0 * static_cast<double>(x.nbytes())));
  return x;
}

void Model::attention(int layer, Tensor& x, const std::vector<Chunk>& chunks) {
  const PhaseTimer timer(*this, &ModelPhaseTimes::attention);
  attention_block(layer).apply(x, chunks);
}

void Model::ffn(int layer, Tensor& x) {
  const PhaseTimer timer(*this, &ModelPhaseTimes::moe);
  MoEFfnBlock& block = *ffn_.at(static_cast<size_t>(layer));
  block.apply(x);
  if (x.shape()[0] == 0) return;
  // Which experts this rank holds: asked of the placement each time (a rebalance may have moved them).
  const ExpertPlacement& placement = block.moe().layout().placement();
  std::vector<char>& here = expert_here_[static_cast<size_t>(layer)];
  here.assign(static_cast<size_t>(config_.experts), 0);
  if (block.moe().layout().shards() == 1)
    for (int e = 0; e < config_.experts; ++e)
      for (int slot : placement.replicas_of(e)) here[static_cast<size_t>(e)] |= placement.rank_of_slot(slot) == group_->rank();
  const Tensor& experts = block.moe().last_routing().experts;
  const int32_t* chosen = experts.data_as<int32_t>();
  int64_t local = 0;
  for (int64_t i = 0; i < experts.numel(); ++i) local += here[static_cast<size_t>(chosen[i])];
  local_activation_.pairs[static_cast<size_t>(layer)] += experts.numel();
  local_activation_.local[static_cast<size_t>(layer)] += local;
}

void Model::reset_local_activation() {
  local_activation_.pairs.assign(static_cast<size_t>(config_.layers), 0);
  local_activation_.local.assign(static_cast<size_t>(config_.layers), 0);
}

Tensor Model::head(const Tensor& x) {
  const PhaseTimer timer(*this, &ModelPhaseTimes::head);
  require_attention("head");
  if (options_.device) {
    const double rows = static_cast<double>(x.shape()[0]), d = config_.d_model;
    virtual_time::charge(options_.device->memory_seconds(2 * rows * d * sizeof(float)) +
                         options_.device->gemm_seconds(rows, config_.vocab_size, d, false));
  }
  Tensor logits = matmul_rowwise(rmsnorm(x, norm_, config_.norm_eps), lm_head_);
  return logits;
}

void Model::commit(const std::vector<Chunk>& chunks) {
  for (const Chunk& c : chunks) c.cache->advance(static_cast<int>(c.tokens.size()));
}

Tensor Model::forward(const std::vector<Chunk>& chunks) {
  Tensor x = embed(chunks);
  for (int l = 0; l < config_.layers; ++l) {
    attention(l, x, chunks);
    ffn(l, x);
  }
  Tensor logits = head(x);
  commit(chunks);
  return logits;
}

double Model::expert_bytes() const {
  const int64_t d = config_.d_model, H = config_.hidden;
  const int64_t H1 = config_.activation == "swiglu" ? 2 * H : H;
  return static_cast<double>(d * H1 + H1 + H * d + d) * sizeof(float);
}

double Model::weight_bytes() const {
  const double d = config_.d_model, V = config_.vocab_size;
  const double per_layer = 4 * d * d + 2 * d + d * config_.experts + config_.experts * expert_bytes() / sizeof(float);
  return (2 * V * d + d + config_.layers * per_layer) * sizeof(float);
}

double Model::rank_weight_bytes(double attention_share) const {
  const double d = config_.d_model, V = config_.vocab_size, E = config_.experts;
  const int slots = ffn_.empty() ? 0 : ffn_.front()->moe().layout().slots(group_->rank());
  if (!holds_attention()) return config_.layers * slots * expert_bytes();
  const double per_layer = (4 * d * d * attention_share + 2 * d + d * E) * sizeof(float) + slots * expert_bytes();
  return (2 * V * d + d) * sizeof(float) + config_.layers * per_layer;
}

void Model::check_redundant_experts(int redundant) const {
  const int W = group_->size(), E = config_.experts;
  if (options_.roles)
    SY_THROW(InvalidArgument, "model: rebalancing redundant experts is not built for disaggregated models (",
             options_.roles->name(), "): EPLB would place experts on the attention ranks");
  if (redundant < 0 || (E + redundant) % W != 0)
    SY_THROW(InvalidArgument, "model: ", redundant, " redundant experts: ", E, " + ", redundant,
             " physical experts do not divide over ", W, " ranks");
}

Model::Rebalance Model::rebalance_experts(int redundant) {
  check_redundant_experts(redundant);
  const int W = group_->size(), physical = config_.experts + redundant;
  // A placement's busiest rank over the mean, for a load per logical expert.
  auto ratio = [&](const ExpertPlacement& p, const std::vector<double>& load) {
    std::vector<double> rank(static_cast<size_t>(W), 0.0);
    double total = 0;
    for (int slot = 0; slot < p.physical_slots(); ++slot) {
      const int e = p.phy2log()[static_cast<size_t>(slot)];
      if (e < 0) continue;
      rank[static_cast<size_t>(p.rank_of_slot(slot))] += load[static_cast<size_t>(e)] / p.replicas(e);
    }
    for (double r : rank) total += r;
    return total > 0 ? *std::max_element(rank.begin(), rank.end()) / (total / W) : 1.0;
  };
  Rebalance out{0, 0, ""};
  for (auto& block : ffn_) {
    const ExpertPlacement before = block->moe().layout().placement();
    const MoELayer::Rebalanced r = block->moe().rebalance(block->load_since(), physical);
    out.before += ratio(before, r.load) / static_cast<double>(ffn_.size());
    out.after += ratio(r.placement, r.load) / static_cast<double>(ffn_.size());
    out.placement = r.placement.describe();
    block->reset_load();
  }
  return out;
}

}  // namespace switchyard
