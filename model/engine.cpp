#include "model/engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <numeric>
#include <set>

#include "comm/virtual_time.h"
#include "core/error.h"
#include "model/afd_plan.h"
#include "moe/planner.h"

namespace switchyard {

InferenceEngine::InferenceEngine(Model& model, LayerSchedule schedule, std::shared_ptr<Communicator> group)
    : model_(model), schedule_(std::move(schedule)), group_(group ? std::move(group) : model.expert_group()),
      rank_(group_->rank()) {
  if (schedule_.world() != group_->size())
    SY_THROW(InvalidArgument, "inference engine: the schedule is for ", schedule_.world(), " rank(s), its group has ",
             group_->size());
  if (group_ != model.expert_group() && model.expert_group()->size() != 1)
    SY_THROW(InvalidArgument, "inference engine: a schedule group other than the model's expert group needs the "
             "model's experts local to each rank (an expert group of 1), got ", model.expert_group()->size());
  if (group_ != model.expert_group() && group_->size() > 1 && schedule_.attention() != AttentionMode::replicated)
    SY_THROW(InvalidArgument, "inference engine: a model replicated on every rank runs replicated or layer-parallel "
             "schedules, not ", attention_mode_name(schedule_.attention()));
  if (schedule_.roles() != model.roles())
    SY_THROW(InvalidArgument, "inference engine: the schedule's role split is ",
             schedule_.roles() ? schedule_.roles()->name() : std::string("colocated"), ", the model was loaded ",
             model.roles() ? "for " + model.roles()->name() : std::string("colocated"),
             " (ModelOptions::roles must be the schedule's)");
  if (schedule_.roles() && group_ != model.expert_group())
    SY_THROW(InvalidArgument, "inference engine: a disaggregated schedule runs over the model's expert group");
  if (schedule_.layer_count() != model.config().layers)
    SY_THROW(InvalidArgument, "inference engine: the schedule has ", schedule_.layer_count(), " layers, model '",
             model.config().name, "' has ", model.config().layers);
  if (schedule_.attention() == AttentionMode::tp) {
    const int tp = schedule_.tp(), heads = model.config().heads, t = schedule_.tp_rank(rank_);
    if (heads % tp != 0)
      SY_THROW(InvalidArgument, "inference engine: tensor-parallel groups of ", tp, " ranks (tp) cannot split the ",
               heads, " heads of model '", model.config().name, "' evenly (expected a tp dividing the head count)");
    tp_group_ = world().split(rank_ / tp, rank_);
    for (int l = 0; l < model.config().layers; ++l)
      tp_attention_.push_back(model.attention_block(l).head_slice(t * heads / tp, heads / tp));
  }
  // EasySpec: a group of g layers gathers its deltas inside blocks of g
  // consecutive ranks (rank r computes the group's layer r mod g), so the
  // all-gather pays g - 1 latencies, not W - 1; ranks past the last whole
  // block compute nothing and join block 0's gather. One group per size, made
  // in ascending order on every rank.
  std::set<int> sizes;
  for (const std::vector<int>& lg : schedule_.layer_groups())
    if (lg.size() > 1) sizes.insert(static_cast<int>(lg.size()));
  const int W = group_->size();
  for (int g : sizes) {
    const int whole = W / g * g;
    std::vector<int> members;
    const int first = rank_ < whole ? rank_ / g * g : 0;
    for (int r = first; r < first + g; ++r) members.push_back(r);
    if (first == 0)
      for (int r = whole; r < W; ++r) members.push_back(r);
    layer_parallel_groups_[g] = members.size() == static_cast<size_t>(W)
                                    ? group_
                                    : world().create_group(members, world().name() + "/lp" + std::to_string(g));
  }
}

KVCache InferenceEngine::new_cache(int capacity) const {
  const int width = tp_attention_.empty() ? 0 : tp_attention_.front()->width();
  return KVCache(model_.config(), capacity > 0 ? capacity : model_.config().max_seq, schedule_.owned_layers(rank_),
                 width);
}

int64_t DecodeMemory::max_sequences(int positions) const {
  if (capacity <= 0) return -1;
  if (weights >= capacity) return 0;
  if (kv_per_position <= 0) return -1;  // a rank that holds no KV (an FFN rank) bounds no sequence count
  return static_cast<int64_t>((capacity - weights) / (kv_per_position * std::max(positions, 1)));
}

DecodeMemory InferenceEngine::memory() const {
  DecodeMemory m;
  m.weights = model_.rank_weight_bytes(1.0 / schedule_.tp());
  m.kv_per_position = static_cast<double>(kv_floats_per_position()) * sizeof(float);
  if (model_.device_model()) m.capacity = model_.device_model()->memory_capacity;
  return m;
}

int64_t InferenceEngine::kv_floats_per_position() const {
  const int64_t width = tp_attention_.empty() ? model_.config().d_model : tp_attention_.front()->width();
  return 2 * width * static_cast<int64_t>(schedule_.owned_layers(rank_).size());
}

void InferenceEngine::verify_replicas(const std::vector<Chunk>& chunks) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over (chunk length, tokens, cache length)
  auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
  for (const Chunk& c : chunks) {
    mix(c.tokens.size());
    mix(c.cache ? static_cast<uint64_t>(c.cache->length()) : ~0ull);
    for (int t : c.tokens) mix(static_cast<uint64_t>(t));
  }
  const bool same = same_on_every_rank(tp_group_ ? *tp_group_ : world(), h);
  // Every rank of the world learns whether any group disagreed: they all throw, none goes on into the all-to-all.
  if (!same_on_every_rank(world(), same ? 1 : 0) || !same)
    SY_THROW(InvalidArgument, "inference engine: ", tp_group_ ? "tensor-parallel" : "replicated", " attention, but the "
             "ranks' chunks differ this step (every rank ", tp_group_ ? "of a tensor-parallel group " : "",
             "must pass the same sequences and tokens)");
}

Tensor InferenceEngine::step_exact(const std::vector<Chunk>& chunks) {
  if (schedule_.layer_groups().empty()) return step(chunks);
  if (check_replicas_ && schedule_.world() > 1) verify_replicas(chunks);
  return model_.forward(chunks);
}

// EasySpec's fuzzy step: the layers of a group of n take the group's input
// at once, rank r computing layer r mod n's attention delta (and writing only
// that layer's KV; its copies of the group's other layers keep stale
// positions until step_exact recomputes them); one all-gather of the deltas
// inside r's block of n ranks; then every rank adds them and runs the
// group's FFNs in order (the MoE layers are collective over the world anyway).
Tensor InferenceEngine::step_layer_parallel(const std::vector<Chunk>& chunks) {
  const int64_t d = model_.config().d_model;
  Tensor x = model_.embed(chunks);
  const int64_t rows = x.shape()[0];
  for (const std::vector<int>& group : schedule_.layer_groups()) {
    if (group.size() == 1) {
      model_.attention(group[0], x, chunks);
      model_.ffn(group[0], x);
      continue;
    }
    const int n = static_cast<int>(group.size());
    // The block's first n members contribute a layer each (a tail rank in block 0 sends nothing); every rank
    // has the same rows.
    Communicator& block = *layer_parallel_groups_.at(n);
    const int member = block.rank();
    Tensor all = Tensor::empty({n * rows, d}, DType::f32);
    {
      const Model::PhaseTimer timer(model_, &ModelPhaseTimes::attention);
      const Tensor mine = member < n ? model_.attention_block(group[static_cast<size_t>(member)]).delta(x, chunks)
                                     : Tensor::zeros({rows, d}, DType::f32);
      std::vector<int64_t> counts(static_cast<size_t>(block.size()), 0);
      for (int j = 0; j < n; ++j) counts[static_cast<size_t>(j)] = rows * d;
      const TensorView sent = member < n ? mine.view() : TensorView(mine.data(), DType::f32, {0});
      if (rows > 0) block.allgatherv(sent, all, counts).wait();
    }
    for (int j = 0; j < n; ++j) {
      float* out = x.data_as<float>();
      const float* delta = all.data_as<float>() + static_cast<int64_t>(j) * rows * d;
      for (int64_t i = 0; i < rows * d; ++i) out[i] += delta[i];
      model_.ffn(group[static_cast<size_t>(j)], x);
    }
  }
  Tensor logits = model_.head(x);
  model_.commit(chunks);
  return logits;
}

// Megatron's sequence-parallel form of tensor-parallel attention: every rank
// of a group computes its heads' partial output projection for all of the
// group's rows; the partials are summed so each rank is left a slice of the
// rows, the MoE layer runs on that slice (the group's rows are computed once,
// not tp times), and an all-gather returns the whole rows for the next
// layer's heads. Rows are split in blocks of ceil(rows / tp), the last ranks'
// blocks padded (or empty); each rank still joins every MoE collective.
//
// The sum is a reduce-scatter written as an all-to-all of the partials' row
// blocks (the same bytes) followed by additions in rank order: a ring
// reduce-scatter adds a block's partials in an order that depends on which
// rank owns the block, so with tp >= 3 a row's bits would depend on how many
// rows its step had (not batch-invariant).
Tensor InferenceEngine::step_tensor_parallel(const std::vector<Chunk>& chunks) {
  const int tp = schedule_.tp(), t = schedule_.tp_rank(rank_);
  const int64_t d = model_.config().d_model;
  Tensor x = model_.embed(chunks);
  const int64_t rows = x.shape()[0], per = (rows + tp - 1) / tp;
  const size_t row_bytes = static_cast<size_t>(d) * sizeof(float);
  Tensor full = Tensor::zeros({per * tp, d}, DType::f32), block = Tensor::zeros({per, d}, DType::f32);
  Tensor parts = Tensor::zeros({per * tp, d}, DType::f32);  // [source rank][row of my block]
  // at[p]: the row at position p of the blocks (rank j's block: positions j * per .. j * per + per - 1), -1 for
  // padding; a block's rows come first. In order unless shuffled.
  std::vector<int64_t> at(static_cast<size_t>(per * tp), -1);
  std::vector<int64_t> held(static_cast<size_t>(tp), 0);  // rows in each member's block
  for (int64_t r = 0; r < rows; ++r) at[static_cast<size_t>(r)] = r, ++held[static_cast<size_t>(r / per)];
  const std::vector<int64_t> in_order = at, held_in_order = held;
  // Token shuffling: the gathered rows carry two more columns, the rank set
  // of their experts in the layer just run and how many of their choices were
  // on the rank that computed them.
  const bool shuffling = shuffle_tables_ && rows > 0;
  const int64_t width = shuffling ? d + 2 : d;
  std::vector<uint32_t> mask1(shuffling ? rows : 0, 0), mask2(shuffling ? rows : 0, 0);
  std::vector<int32_t> token_of_row;
  if (shuffling)
    for (const Chunk& c : chunks) token_of_row.insert(token_of_row.end(), c.tokens.begin(), c.tokens.end());
  Tensor gathered = Tensor::zeros({per * tp, width}, DType::f32), mine = Tensor::zeros({per, width}, DType::f32);
  for (int l = 0; l < model_.config().layers; ++l) {
    bool shuffled = false;
    int64_t n = 0;
    const int64_t first = t * per;
    Tensor slice;
    {  // the heads, their summed projection and the residual
      const Model::PhaseTimer timer(model_, &ModelPhaseTimes::attention);
      const double heads_start = virtual_time::now();
      const Tensor partial = tp_attention_[static_cast<size_t>(l)]->delta(x, chunks);
      if (shuffling) {
        // The heads are issued first, so on a GPU the host predicts while the
        // device computes them: only what outlasts them shows on its clock
        // (emulated: the device model's heads time; this CPU does both in turn).
        // The planner prices the whole host cost: a member's heads time is
        // read off its own clock and may differ in its last bit from the
        // others', and every member must decide alike.
        const bool emulated = model_.device_model() != nullptr;
        const double heads = emulated ? virtual_time::now() - heads_start : 0.0;
        shuffled = !shuffle_planner_ || shuffle_planner_->decide(l, held_in_order);
        ++shuffle_counts_.decided, shuffle_counts_.shuffled += shuffled;
        if (shuffled) {
          shuffle_rows(l, token_of_row, mask1, mask2, per, at, held);
          if (emulated) virtual_time::charge(std::max(0.0, shuffle_cost_.seconds(rows) - heads));
        } else {
          at = in_order, held = held_in_order;
        }
      }
      n = held[static_cast<size_t>(t)];
      slice = Tensor::empty({n, d}, DType::f32);
      if (rows > 0) {
        for (int64_t p = 0; p < per * tp; ++p) {
          float* to = full.data_as<float>() + p * d;
          if (at[static_cast<size_t>(p)] < 0)
            std::memset(to, 0, row_bytes);
          else
            std::memcpy(to, partial.data_as<float>() + at[static_cast<size_t>(p)] * d, row_bytes);
        }
        tp_group_->alltoall(full, parts).wait();
        float* sum = block.data_as<float>();
        const float* part = parts.data_as<float>();
        std::memcpy(sum, part, static_cast<size_t>(per) * row_bytes);
        for (int from = 1; from < tp; ++from)
          for (int64_t i = 0; i < per * d; ++i) sum[i] += part[from * per * d + i];
      }
      const float* sum = block.data_as<float>();
      float* s = slice.data_as<float>();
      for (int64_t i = 0; i < n; ++i) {
        const float* residual = x.data_as<float>() + at[static_cast<size_t>(first + i)] * d;
        for (int64_t j = 0; j < d; ++j) s[i * d + j] = residual[j] + sum[i * d + j];
      }
    }
    model_.ffn(l, slice);  // every rank of the world, with its slice (possibly no rows)
    if (rows > 0) {  // the group's whole rows back, for the next layer's heads
      const Model::PhaseTimer timer(model_, &ModelPhaseTimes::attention);
      float* m = mine.data_as<float>();
      for (int64_t i = 0; i < n; ++i) std::memcpy(m + i * width, slice.data_as<float>() + i * d, row_bytes);
      if (shuffling) {  // each row's expert ranks (a mask below 2^20: exact in f32) and its local choices
        const MoELayer& moe = model_.moe(l);
        const Tensor& experts = moe.last_routing().experts;
        const int k = static_cast<int>(experts.shape()[1]);
        for (int64_t i = 0; i < n; ++i) {
          uint32_t mask = 0;
          int local = 0;
          for (int j = 0; j < k; ++j) {
            const int owner = moe.layout().owner(experts.data_as<int32_t>()[i * k + j]);
            mask |= uint32_t{1} << owner;
            local += owner == rank_;
          }
          m[i * width + d] = static_cast<float>(mask);
          m[i * width + d + 1] = static_cast<float>(local);
        }
      }
      tp_group_->allgather(mine, gathered).wait();
      double local_choices = 0;
      for (int64_t p = 0; p < per * tp; ++p) {
        const int64_t r = at[static_cast<size_t>(p)];
        if (r < 0) continue;
        const float* g = gathered.data_as<float>() + p * width;
        std::memcpy(x.data_as<float>() + r * d, g, row_bytes);
        if (shuffling) {
          mask2[static_cast<size_t>(r)] = mask1[static_cast<size_t>(r)], mask1[static_cast<size_t>(r)] = static_cast<uint32_t>(g[d]);
          local_choices += g[d + 1];
        }
      }
      if (shuffle_planner_ && shuffling)  // what this layout reached, the same on every member
        shuffle_planner_->observe(l, shuffled, static_cast<double>(rows) * model_.config().k, local_choices);
    }
  }
  Tensor logits = model_.head(x);
  model_.commit(chunks);
  return logits;
}

// The group's rows in its members' blocks by predicted rank: every member
// computes the same order from the same tokens and rank sets. A block holds
// up to ceil(rows / tp) rows (the reduce-scatter's all-to-all moves that many
// per member anyway), so a row goes to its best member with room, and a
// batch smaller than the group still goes where the tables predict.
void InferenceEngine::shuffle_rows(int layer, const std::vector<int32_t>& token_of_row, const std::vector<uint32_t>& mask1,
                                   const std::vector<uint32_t>& mask2, int64_t per, std::vector<int64_t>& at,
                                   std::vector<int64_t>& held) {
  const int tp = schedule_.tp();
  int64_t keyed = 0;
  const std::vector<int> member = predict_members(*shuffle_tables_, layer, token_of_row, mask1, mask2,
                                                  shuffle_options_.predictor, rank_ / tp * tp, tp, per, &keyed);
  const int64_t rows = static_cast<int64_t>(token_of_row.size());
  if (layer >= 1) shuffle_counts_.predicted += keyed, shuffle_counts_.rows += rows;
  std::fill(at.begin(), at.end(), -1);
  std::fill(held.begin(), held.end(), 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int j = member[static_cast<size_t>(r)];
    at[static_cast<size_t>(j * per + held[static_cast<size_t>(j)]++)] = r;
  }
}

void InferenceEngine::set_token_shuffling(std::shared_ptr<const AffinityTables> tables,
                                          const TokenShufflingOptions& options) {
  if (!tables) {
    shuffle_tables_ = nullptr;
    shuffle_planner_.reset();
    return;
  }
  const ModelConfig& c = model_.config();
  if (!tp_group_)
    SY_THROW(InvalidArgument, "token shuffling moves rows inside tensor-parallel attention's reduce-scatter; this "
             "engine's attention is ", attention_mode_name(schedule_.attention()), " (expected tp)");
  if (tables->ranks() != model_.expert_group()->size() || group_ != model_.expert_group())
    SY_THROW(InvalidArgument, "token shuffling: tables for ", tables->ranks(), " ranks, the expert group has ",
             model_.expert_group()->size());
  if (tables->layers() != c.layers || tables->experts() != c.experts || tables->k() != c.k)
    SY_THROW(InvalidArgument, "token shuffling: tables of ", tables->layers(), " layers, ", tables->experts(),
             " experts, top-", tables->k(), " for model '", c.name, "' (", c.layers, " layers, ", c.experts,
             " experts, top-", c.k, ")");
  for (int l = 0; l < c.layers; ++l)
    for (int e = 0; e < c.experts; ++e)
      if (model_.moe(l).layout().owner(e) != tables->layer(l).rank_of_expert[static_cast<size_t>(e)])
        SY_THROW(InvalidArgument, "token shuffling: layer ", l, " holds expert ", e, " on rank ",
                 model_.moe(l).layout().owner(e), ", the tables on rank ", tables->layer(l).rank_of_expert[static_cast<size_t>(e)],
                 " (load the model with the tables' placement: ModelOptions::placements, --affinity)");
  if (options.ranks_per_node < 0)
    SY_THROW(InvalidArgument, "token shuffling: ranks_per_node = ", options.ranks_per_node, ", expected >= 0 (0: one node)");
  shuffle_tables_ = std::move(tables);
  shuffle_options_ = options;
  shuffle_planner_.reset();
  // The host cost, the slowest rank's: every member decides and charges alike.
  Tensor cost = Tensor::zeros({2}, DType::f64);
  double* v = cost.data_as<double>();
  if (options.seconds_per_batch >= 0 && options.seconds_per_row >= 0) {
    v[0] = options.seconds_per_batch, v[1] = options.seconds_per_row;
  } else {
    const ShuffleCost measured = measure_shuffle_cost(*shuffle_tables_, options.predictor, schedule_.tp());
    v[0] = measured.per_batch, v[1] = measured.per_row;
  }
  group_->allreduce(cost, cost, {.op = ReduceOp::max}).wait();
  shuffle_cost_ = {v[0], v[1]};
  if (!options.automatic) return;
  Tensor node = Tensor::zeros({2}, DType::f64);  // every rank must calibrate the same node layout
  node.data_as<double>()[0] = options.ranks_per_node, node.data_as<double>()[1] = -options.ranks_per_node;
  group_->allreduce(node, node, {.op = ReduceOp::max}).wait();
  if (node.data_as<double>()[0] != -node.data_as<double>()[1])
    SY_THROW(InvalidArgument, "token shuffling: ranks_per_node differs between ranks (", -node.data_as<double>()[1], " to ",
             node.data_as<double>()[0], "; expected the same on every rank)");
  const int tp = schedule_.tp();
  auto [device, link] =
      MoEPlanner::calibrate(model_.moe(0), options.ranks_per_node > 0 ? options.ranks_per_node : group_->size());
  shuffle_planner_ =
      std::make_unique<ShufflePlanner>(model_.moe(0), device, link, *shuffle_tables_, rank_ / tp * tp, tp, shuffle_cost_);
}

std::pair<double, double> InferenceEngine::shuffle_local_shares(int layer) const {
  return shuffle_planner_ ? shuffle_planner_->local_shares(layer) : std::pair<double, double>{0, 0};
}

std::string InferenceEngine::shuffle_explanation(int layer) const {
  return shuffle_planner_ ? shuffle_planner_->explanation(layer) : "";
}

void InferenceEngine::set_microbatches(int m) {
  if (m < 0) SY_THROW(InvalidArgument, "inference engine: ", m, " micro-batches, expected >= 1 (0: automatic)");
  microbatches_ = m;
}

std::pair<double, double> InferenceEngine::exchange_waits() const {
  double wall = 0, virt = 0;
  for (int l = 0; l < model_.config().layers; ++l) {
    const MoELayer& moe = model_.moe(l);
    wall += moe.phase_times().dispatch_a2a + moe.phase_times().combine_a2a;
    virt += moe.virtual_phase_times().dispatch_a2a + moe.virtual_phase_times().combine_a2a;
  }
  return {wall, virt};
}

// Attention-FFN disaggregation, MegaScale-Infer's ping-pong: the attention
// ranks take micro-batch i through layer l's attention and post its rows to
// the experts (MoELayer handles: several batches in flight), then go on with
// micro-batch i + 1 while the FFN ranks compute i; micro-batch i's results
// are collected just before its next layer's attention. The FFN ranks walk
// the same (layer, micro-batch) order with no rows of their own, so every
// rank issues the MoE collectives in one order. Every row's arithmetic is
// the colocated model's (row-wise kernels, the same experts), so the logits
// are the same bits whatever m and the split.
Tensor InferenceEngine::step_disaggregated(const std::vector<Chunk>& chunks) {
  const RoleSplit& roles = *schedule_.roles();
  const bool attention = roles.is_attention(rank_);
  const int L = model_.config().layers;
  const int64_t d = model_.config().d_model;
  // A chunk this rank cannot run would fail here mid-step while the others wait in a collective: found first.
  std::string bad_chunk;
  const int V = model_.config().vocab_size;
  std::map<const KVCache*, int> appended;  // chunks sharing a cache write one after another
  for (const Chunk& c : chunks) {
    const int n = static_cast<int>(c.tokens.size());
    if (!c.cache) {
      bad_chunk = "a chunk without a KV cache";
      continue;
    }
    if (!c.cache->fits(model_.config()))  // no tensor parallelism here: the whole width
      bad_chunk = "a chunk whose KV cache is not this engine's (another model's, or other layers or heads)";
    const int total = appended[c.cache] += n;
    if (c.cache->length() + total > c.cache->capacity())
      bad_chunk = std::to_string(total) + " token(s) at position " + std::to_string(c.cache->length()) +
                  " of a cache of " + std::to_string(c.cache->capacity());
    for (int t : c.tokens)
      if (t < 0 || t >= V) bad_chunk = "token " + std::to_string(t) + " (expected 0.." + std::to_string(V - 1) + ")";
  }
  // The step's agreement: the ping-pong depth, whether an FFN rank was wrongly given rows, and which rank (if
  // any) was given a chunk it cannot run: every rank fails alike, none is left in a collective.
  // Also, for an automatic depth, the last step's measured times and the most sequences a rank holds.
  double agree[7] = {attention ? static_cast<double>(microbatches_) : 0.0, !attention && !chunks.empty() ? 1.0 : 0.0,
                     bad_chunk.empty() ? 0.0 : rank_ + 1.0, measured_ta_, measured_te_, measured_tc_,
                     static_cast<double>(chunks.size())};
  {
    const auto t0 = std::chrono::steady_clock::now();
    const double v0 = virtual_time::now();
    const TensorView v(agree, DType::f64, {7});
    world().allreduce(v, v, {.op = ReduceOp::max}).wait();
    step_times_.waiting += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    step_times_.virtual_waiting += virtual_time::now() - v0;
  }
  if (agree[1] > 0)
    SY_THROW(InvalidArgument, "inference engine: an FFN rank of ", roles.name(), " was given sequences this step; "
             "FFN ranks hold no attention or KV and pass no chunks (requests go to the attention ranks)");
  if (agree[2] > 0) {
    if (!bad_chunk.empty()) SY_THROW(InvalidArgument, "inference engine: rank ", rank_, " was given ", bad_chunk);
    SY_THROW(InvalidArgument, "inference engine: rank ", static_cast<int>(agree[2]) - 1, " was given a chunk it "
             "cannot run this step (its error names it); every rank of ", roles.name(), " stops");
  }
  const int m = agree[0] >= 1 ? static_cast<int>(agree[0])
                              : auto_microbatches(agree[3], agree[4], agree[5], static_cast<int64_t>(agree[6]));
  last_microbatches_ = m;
  double ta_sum = 0, te_sum = 0, tc_sum = 0;
  int ta_n = 0, fe_n = 0;
  auto ffn = [&](int l) -> MoEFfnBlock& { return static_cast<MoEFfnBlock&>(model_.ffn_block(l)); };
  // The timeline's clock: virtual when emulated (the device's time), else wall; from after the agreement.
  const bool emulated = model_.device_model() != nullptr;
  const auto wall0 = std::chrono::steady_clock::now();
  const double virtual0 = virtual_time::now();
  auto clock = [&] {
    return emulated ? virtual_time::now() - virtual0
                    : std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  };
  timeline_.clear();
  if (!attention) {
    const Tensor none = Tensor::empty({0, d}, DType::f32);
    const Model::PhaseTimer timer(model_, &ModelPhaseTimes::moe);
    for (int l = 0; l < L; ++l)
      for (int i = 0; i < m; ++i) {
        MoEFfnBlock::PostTimes pt;
        const MoEHandle batch = ffn(l).post(none, &pt);  // the experts compute in here, last
        if (record_timeline_) {
          const double end = clock();
          timeline_.push_back({l, i, false, end - pt.compute, end});
        }
        te_sum += pt.compute, tc_sum += pt.transfer, ++fe_n;
        ffn(l).collect(*batch);
      }
    measured_ta_ = 0, measured_te_ = fe_n ? te_sum / fe_n : 0, measured_tc_ = fe_n ? tc_sum / fe_n : 0;
    return Tensor::empty({0, model_.config().vocab_size}, DType::f32);
  }
  // Contiguous micro-batches balanced by rows: a chunk goes to the part its first row falls in.
  std::vector<std::vector<Chunk>> parts(static_cast<size_t>(m));
  int64_t total = 0, before = 0;
  for (const Chunk& c : chunks) total += static_cast<int64_t>(c.tokens.size());
  for (const Chunk& c : chunks) {
    parts[static_cast<size_t>(total > 0 ? before * m / total : 0)].push_back(c);
    before += static_cast<int64_t>(c.tokens.size());
  }
  std::vector<Tensor> x;
  for (const auto& part : parts) x.push_back(model_.embed(part));
  std::vector<MoEHandle> pending(static_cast<size_t>(m));
  auto add_results = [&](int l, int i) {
    const Model::PhaseTimer timer(model_, &ModelPhaseTimes::moe);
    const Tensor delta = ffn(l).collect(*pending[static_cast<size_t>(i)]);
    pending[static_cast<size_t>(i)].reset();
    float* out = x[static_cast<size_t>(i)].data_as<float>();
    const float* a = delta.data_as<float>();
    for (int64_t j = 0; j < delta.numel(); ++j) out[j] += a[j];  // FfnBlock::apply's addition
  };
  for (int l = 0; l < L; ++l)
    for (int i = 0; i < m; ++i) {
      if (l > 0) add_results(l - 1, i);
      const double start = clock();
      model_.attention(l, x[static_cast<size_t>(i)], parts[static_cast<size_t>(i)]);
      const double end = clock();
      if (record_timeline_) timeline_.push_back({l, i, true, start, end});
      if (x[static_cast<size_t>(i)].shape()[0] > 0) ta_sum += end - start, ++ta_n;
      const Model::PhaseTimer timer(model_, &ModelPhaseTimes::moe);
      pending[static_cast<size_t>(i)] = ffn(l).post(x[static_cast<size_t>(i)]);
    }
  for (int i = 0; i < m; ++i) add_results(L - 1, i);
  measured_ta_ = ta_n ? ta_sum / ta_n : 0, measured_te_ = measured_tc_ = 0;
  Tensor rows = Tensor::empty({total, d}, DType::f32);
  int64_t at = 0;
  for (const Tensor& part : x) {
    std::memcpy(rows.data_as<float>() + at * d, part.data(), part.nbytes());
    at += part.shape()[0];
  }
  Tensor logits = model_.head(rows);
  model_.commit(chunks);
  return logits;
}

Tensor InferenceEngine::step(const std::vector<Chunk>& chunks) {
  const auto start = std::chrono::steady_clock::now();
  const double virtual_start = virtual_time::now();
  const auto [wait0, virtual_wait0] = exchange_waits();
  Tensor logits = step_any(chunks);
  const auto [wait1, virtual_wait1] = exchange_waits();
  ++step_times_.steps;
  step_times_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  step_times_.waiting += wait1 - wait0;
  step_times_.virtual_seconds += virtual_time::now() - virtual_start;
  step_times_.virtual_waiting += virtual_wait1 - virtual_wait0;
  return logits;
}

Tensor InferenceEngine::step_any(const std::vector<Chunk>& chunks) {
  if (schedule_.roles()) return step_disaggregated(chunks);
  if (check_replicas_ && schedule_.attention() != AttentionMode::dp && schedule_.world() > 1) verify_replicas(chunks);
  if (tp_group_) return step_tensor_parallel(chunks);
  if (!schedule_.layer_groups().empty()) return step_layer_parallel(chunks);
  // replicated and dp run every layer's attention on this rank's own rows and
  // the FFN's experts over every rank: the model's own layer order. Schedules
  // that place layers elsewhere (tp, parallel layer groups, AFD) walk the
  // blocks here instead.
  return model_.forward(chunks);
}

}  // namespace switchyard
