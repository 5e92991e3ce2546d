// The layer's composition: construction, the batch phases (plan, dispatch,
// experts, combine, finish, backward) on handles, and forward/backward as
// those phases in order.
#include "moe/moe_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "comm/backends/staged/staged_backend.h"
#include "core/env.h"
#include "kernels/gemm.h"
#include "moe/eplb.h"
#include "moe/layer_internal.h"

namespace switchyard {

using kernels::Activation;
using moe_detail::PhaseTimer;

void MoEConfig::validate() const {
  if (model_dim < 1) SY_THROW(InvalidArgument, "moe: model_dim = ", model_dim, ", expected >= 1");
  if (compute != DType::f32 && compute != DType::bf16)
    SY_THROW(InvalidArgument, "moe: compute = ", dtype_name(compute), ", expected f32 or bf16");
  if (hidden_dim < 1) SY_THROW(InvalidArgument, "moe: hidden_dim = ", hidden_dim, ", expected >= 1");
  if (replica_domain < 0) SY_THROW(InvalidArgument, "moe: replica_domain = ", replica_domain, ", expected >= 0 ranks");
  if (replica_choice == ReplicaChoice::nearest && replica_domain > 0)
    SY_THROW(InvalidArgument, "moe: replica_choice = nearest with replica_domain = ", replica_domain,
             "; expected one of them (a domain keeps tokens in it, nearest balances across it)");
  if (batch_invariant && compute != DType::f32)
    SY_THROW(InvalidArgument, "moe: batch_invariant needs compute = f32, got ", dtype_name(compute));
  if (combine_payload == DType::fp8_e4m3)
    SY_THROW(InvalidArgument, "moe: combine_payload = fp8_e4m3 is not built (results come back in f32 or bf16, as "
             "DeepEP and Step-3 send them)");
  for (auto [field, dtype] : {std::pair{"dispatch_payload", dispatch_payload}, std::pair{"combine_payload", combine_payload}}) {
    if (dtype != DType::f32 && dtype != DType::bf16 && dtype != DType::fp8_e4m3)
      SY_THROW(InvalidArgument, "moe: ", field, " = ", dtype_name(dtype), ", expected f32, bf16 or fp8_e4m3");
    if (dtype != DType::f32 && send_once_per_rank)
      SY_THROW(InvalidArgument, "moe: ", field, " = ", dtype_name(dtype), " with send_once_per_rank is not built "
               "(expected f32, or send_once_per_rank off)");
  }
  router.validate();
}

ExpertPlacement MoEConfig::eplb_placement(const std::vector<double>& load, int physical, int ranks) const {
  if (!eplb_hierarchical) return eplb::place(load, physical, ranks);
  const int nodes = node_size > 1 && node_size < ranks ? ranks / node_size : 1;
  return eplb::place(load, physical, ranks, router.groups, nodes);
}

void MoEBatch::wait_posted() noexcept {
  for (auto* works : {&to_experts_, &back_})
    for (auto& w : *works) try {
        w.wait();
      } catch (...) {  // the error was or will be reported by whoever waited first
      }
}

MoEBatch::~MoEBatch() { wait_posted(); }

void MoEBatch::release_buffers() {
  if (released_) return;
  wait_posted();
  x_ = logits_ = send_ = rows_ = returned_ = arrived_ = send16_ = rows16_ = out16_ = returned16_ = Tensor();
  index_ = OpsIndex();
  weights_ = Working();
  experts_ = ExpertActivations();
  released_ = true;
}

Tensor MoELayer::buffer(Buffer which, Shape shape, DType dtype) {
  return pool_.acquire(static_cast<int>(which), std::move(shape), dtype);
}

Tensor MoELayer::ops_empty(Shape shape, DType dtype) const {
  return ops_->host_memory() ? Tensor::empty(std::move(shape), dtype) : ops_->allocate(std::move(shape), dtype, false);
}

Tensor MoELayer::ops_zeros(Shape shape, DType dtype) const {
  return ops_->host_memory() ? Tensor::zeros(std::move(shape), dtype) : ops_->allocate(std::move(shape), dtype, true);
}

ExpertParams MoELayer::to_host(const ExpertParams& p) const {
  return {ops_->copy_out(p.w1), ops_->copy_out(p.b1), ops_->copy_out(p.w2), ops_->copy_out(p.b2)};
}

template <class T>
const T* MoELayer::ops_array(const std::vector<T>& v, Tensor& slot) const {
  if (ops_->host_memory()) return v.data();
  if (!slot.defined()) {
    slot = ops_->allocate({static_cast<int64_t>(v.size())}, dtype_v<T>, false);
    ops_->from_host(slot.data(), v.data(), static_cast<int64_t>(v.size() * sizeof(T)));
  }
  return static_cast<const T*>(slot.data());
}

std::shared_ptr<Communicator> MoELayer::host_side(const std::shared_ptr<Communicator>& group) const {
  if (group->memory_device().is_cpu()) return group;
  auto& made = host_side_cache_[group.get()];
  if (!made) made = make_host_buffer_communicator(group, ops_->memory());
  return made;
}

namespace {
Work completed_work(const char* op) {
  auto state = std::make_shared<WorkState>(WorkLabel{op, "local", 0, 1, "none"});
  state->complete();
  return Work(state);
}

const char* stage_name(MoEBatch::Stage s) {
  switch (s) {
    case MoEBatch::Stage::planned: return "planned";
    case MoEBatch::Stage::dispatched: return "dispatched";
    case MoEBatch::Stage::combining: return "combining";
    case MoEBatch::Stage::finished: return "finished";
  }
  return "?";
}
}  // namespace

MoELayer::MoELayer(MoEConfig config, std::shared_ptr<Communicator> expert_group,
                   std::shared_ptr<Communicator> host_group)
    : config_(std::move(config)),
      group_(std::move(expert_group)),
      host_group_(std::move(host_group)),
      layout_(config_.router.experts, group_->size(), config_.placement),
      local_hidden_(layout_.local_hidden(config_.hidden_dim)),
      ops_(config_.ops ? config_.ops
                       : make_moe_ops(config_.device_model, config_.skip_compute, config_.batch_invariant)),
      // Timing only never touches the buffers, so poisoning them would only cost.
      pool_(static_cast<int>(Buffer::count), env().poison_buffers && ops_->computes(), ops_->memory()) {
  config_.validate();
  if (config_.ops && (config_.device_model || config_.skip_compute || config_.batch_invariant))
    SY_THROW(InvalidArgument, "moe: ops '", ops_->name(), "' given together with ",
             config_.device_model ? "device_model" : config_.skip_compute ? "skip_compute" : "batch_invariant",
             ", which choose the ops when none are given; expected one or the other (an EmulatedOps carries its "
             "device model and timing-only mode)");
  // Device ops: the bulk tensors live in the ops' memory and so must every
  // buffer the group moves; routing, plans and agreements stay on the host.
  if (group_->memory_device() != ops_->device())
    SY_THROW(InvalidArgument, "moe: ops '", ops_->name(), "' keep the layer's tensors on ",
             to_string(ops_->device()), " but the expert group '",
             group_->name(), "' (backend ", group_->backend_name(), ") moves memory of ",
             to_string(group_->memory_device()), "; expected a communicator of the ops' memory (",
             ops_->host_memory() ? "a host backend" : "nccl, or staged over a host backend", ")");
  host_group_given_ = host_group_ && host_group_ != group_;
  if (!host_group_given_) {
    host_group_ = host_side(group_);
  } else if (!host_group_->memory_device().is_cpu() || host_group_->size() != group_->size() ||
             host_group_->rank() != group_->rank()) {
    SY_THROW(InvalidArgument, "moe: host_group '", host_group_->name(), "' (rank ", host_group_->rank(), " of ",
             host_group_->size(), ", memory ", to_string(host_group_->memory_device()), ") must hold the expert "
             "group's ranks in its order (rank ", group_->rank(), " of ", group_->size(), ") over host memory");
  }
  const int64_t M = config_.model_dim, L = layout_.slots(group_->rank());
  const int64_t H1s = hidden_in() / layout_.shards();
  gate_weight_ = ops_zeros({M, config_.router.experts});
  gate_bias_ = Tensor::zeros({config_.router.experts}, DType::f32);
  params_.w1 = fresh({L, M, H1s});
  params_.b1 = fresh({L, H1s});
  params_.w2 = fresh({L, local_hidden_, M});
  params_.b2 = fresh({L, M});
  zero_grad();
  // Every group any plan needs, once: the S ranks of my expert, and for each r
  // the S/r consecutive ranks whose slices form one 1/r piece.
  const int S = layout_.shards(), me = group_->rank(), W = group_->size();
  if (S > 1) {
    std::vector<int> members;
    for (int s = 0; s < S; ++s) members.push_back(me / S * S + s);
    shard_group_ = group_->create_group(members, group_->name() + "/expert-shards");
    for (int r : valid_sharding_degrees(S)) {
      if (r == 0 || S / r == 1) continue;
      if (S / r == S) {
        gather_groups_[r] = shard_group_;
        continue;
      }
      const int R = S / r, first = me / R * R;
      std::vector<int> piece;
      for (int i = 0; i < R; ++i) piece.push_back(first + i);
      gather_groups_[r] = group_->create_group(piece, group_->name() + "/r" + std::to_string(r));
    }
  }
  if (config_.node_size > 1 && config_.node_size < W && W % config_.node_size != 0)
    SY_THROW(InvalidArgument, "moe: node_size = ", config_.node_size, " does not divide the ", W,
             " ranks of the expert group; expected a divisor (ranks per node)");
  if (config_.eplb_hierarchical) {
    const int nodes = config_.node_size > 1 && config_.node_size < W ? W / config_.node_size : 1;
    if (nodes < 2 || config_.router.groups < 2 || config_.router.groups % nodes != 0)
      SY_THROW(InvalidArgument, "moe: eplb_hierarchical packs router.groups = ", config_.router.groups,
               " expert groups onto ", nodes, " node(s) of node_size = ", config_.node_size,
               " ranks; expected 2 or more nodes and groups a multiple of them");
  }
  make_exchange_group();
  make_replica_groups();
  requested_a2a_ = config_.plan.a2a;
  check_plan(config_.plan);
}

bool MoELayer::domains_hold_every_expert() const {
  const int W = group_->size(), D = config_.replica_domain;
  if (D < 1 || D >= W || W % D != 0 || layout_.shards() > 1) return false;
  const ExpertPlacement& pl = layout_.placement();
  for (int e = 0; e < pl.experts(); ++e) {
    std::vector<char> held(static_cast<size_t>(W / D), 0);
    for (int p : pl.replicas_of(e)) held[static_cast<size_t>(pl.rank_of_slot(p) / D)] = 1;
    if (std::find(held.begin(), held.end(), 0) != held.end()) return false;
  }
  return true;
}

void MoELayer::make_exchange_group() {
  // Collective over the group (every rank decides alike from the placement):
  // a domain group is made by its members, a 2DH's groups by the exchange's.
  const int me = group_->rank(), D = config_.replica_domain;
  std::shared_ptr<Communicator> next = group_;
  exchange_first_ = 0;
  if (domains_hold_every_expert()) {
    exchange_first_ = me / D * D;
    std::vector<int> members(static_cast<size_t>(D));
    std::iota(members.begin(), members.end(), exchange_first_);
    auto& cached = domain_group_cache_[members];
    if (!cached) cached = group_->create_group(members, group_->name() + "/domain" + std::to_string(me / D));
    next = cached;
  }
  exchange_group_ = next;
  if (exchange_group_ == group_) {
    exchange_host_ = host_group_;
  } else if (host_group_given_) {
    // A host group of its own: the domain's counts travel on its own host domain group.
    std::vector<int> members(static_cast<size_t>(D));
    std::iota(members.begin(), members.end(), exchange_first_);
    auto& cached = host_domain_cache_[members];
    if (!cached) cached = host_group_->create_group(members, host_group_->name() + "/domain" + std::to_string(me / D));
    exchange_host_ = cached;
  } else {
    exchange_host_ = host_side(exchange_group_);
  }
  // 2DH over the exchange's own nodes; none when it fits in one node or its
  // nodes would not be whole. Its re-layouts are host copies: host ops only.
  const int X = exchange_group_->size(), g = config_.node_size;
  hierarchical_ = nullptr;
  if (g > 1 && g < X && X % g == 0 && ops_->host_memory()) {
    auto& made = hierarchical_cache_[exchange_group_.get()];
    if (!made) {
      made = std::make_unique<algorithms::HierarchicalAlltoall>(*exchange_group_, g);
      if (const DeviceModel* dev = ops_->device_model()) made->set_copy_bandwidth(dev->memory_bandwidth);
      made->set_skip_copies(!ops_->computes());
    }
    hierarchical_ = made.get();
  }
}

const std::vector<int64_t>& MoELayer::nearest_quanta(int expert) const {
  auto& q = nearest_share_cache_[expert];  // cleared by migrate
  if (q.empty()) q = layout_.placement().nearest_shares(expert, config_.node_size);
  return q;
}

std::vector<std::pair<int, double>> MoELayer::replica_shares(int source, int expert) const {
  std::vector<std::pair<int, double>> out;
  const ExpertPlacement& pl = layout_.placement();
  if (config_.replica_choice == MoEConfig::ReplicaChoice::nearest && pl.replicas(expert) > 1) {
    const std::vector<int64_t>& q = nearest_quanta(expert);
    const int R = pl.replicas(expert);
    for (int j = 0; j < R; ++j)
      if (const int64_t share = q[static_cast<size_t>(source) * R + j])
        out.push_back({pl.replicas_of(expert)[static_cast<size_t>(j)],
                       static_cast<double>(share) / static_cast<double>(ExpertPlacement::kShareQuanta)});
    return out;
  }
  const std::vector<int> used = replicas_used_by(source, expert);
  for (int p : used) out.push_back({p, 1.0 / static_cast<double>(used.size())});
  return out;
}

std::vector<int> MoELayer::replicas_used_by(int source, int expert) const {
  const ExpertPlacement& pl = layout_.placement();
  const int W = group_->size(), domain = config_.replica_domain > 0 ? config_.replica_domain : W;
  std::vector<int> mine;
  for (int p : pl.replicas_of(expert))
    if (pl.rank_of_slot(p) / domain == source / domain) mine.push_back(p);
  return mine.empty() ? pl.replicas_of(expert) : mine;
}

void MoELayer::make_replica_groups() {
  replica_groups_.clear();
  if (layout_.shards() > 1) return;
  const ExpertPlacement& pl = layout_.placement();
  const int me = group_->rank();
  // Ascending expert order on every rank: each group's members create it in
  // the same sequence, so no two groups wait on each other.
  for (int e = 0; e < pl.experts(); ++e) {
    if (pl.replicas(e) < 2) continue;
    std::vector<int> members, mine;
    for (int p : pl.replicas_of(e)) {
      const int rank = pl.rank_of_slot(p);
      members.push_back(rank);
      if (rank == me) mine.push_back(p - pl.first_slot(me));
    }
    if (mine.empty()) continue;
    std::sort(members.begin(), members.end());
    members.erase(std::unique(members.begin(), members.end()), members.end());
    std::shared_ptr<Communicator> group;
    if (members.size() > 1) {
      // Every member has the same cache (same placements so far), so all reuse or all create.
      auto& cached = replica_group_cache_[members];
      if (!cached) cached = group_->create_group(members, group_->name() + "/replicas-of-" + std::to_string(e));
      group = cached;
    }
    replica_groups_.push_back({mine, group});
  }
}

void MoELayer::sum_replica_gradients(ExpertParams& g) {
  if (replica_groups_.empty()) return;
  Tensor* parts[4] = {&g.w1, &g.b1, &g.w2, &g.b2};
  int64_t per_expert = 0;
  for (Tensor* t : parts) per_expert += t->numel() / t->shape()[0];
  // Timing only: a reduce-scatter and an all-gather (the ring all-reduce's two
  // halves, charged alike) move no bulk payload, where an all-reduce would
  // move the uninitialised sums for real.
  const bool charge_only = !ops_->computes();
  int64_t padded = per_expert, largest_block = 0;
  if (charge_only)
    for (const ReplicaGroup& r : replica_groups_)
      if (r.group) {
        const int64_t p = r.group->size(), block = (per_expert + p - 1) / p;
        padded = std::max(padded, block * p);
        largest_block = std::max(largest_block, block);
      }
  Tensor packed = buffer(Buffer::replica_sum, {padded});
  float* sum = packed.data_as<float>();
  Tensor scattered = largest_block ? ops_->allocate({largest_block}, DType::f32, false) : Tensor();
  for (const ReplicaGroup& r : replica_groups_) {
    // This rank's replicas summed into one packed expert, one all-reduce over
    // the ranks holding it, then back into every local replica.
    ops_->zero(sum, per_expert * static_cast<int64_t>(sizeof(float)));
    for (int slot : r.slots) {
      float* at = sum;
      for (Tensor* t : parts) {
        const int64_t n = t->numel() / t->shape()[0];
        ops_->axpy(1.f, t->data_as<float>() + slot * n, n, at);
        at += n;
      }
    }
    if (r.group && charge_only) {
      const int64_t p = r.group->size(), block = (per_expert + p - 1) / p;
      TensorView all = ops_view(sum, DType::f32, {block * p}), part = ops_view(scattered.data(), DType::f32, {block});
      r.group->reduce_scatter(all, part).wait();
      r.group->allgather(part, all).wait();
    } else if (r.group) {
      TensorView all = ops_view(sum, DType::f32, {per_expert});
      r.group->allreduce(all, all).wait();
    }
    for (int slot : r.slots) {
      const float* at = sum;
      for (Tensor* t : parts) {
        const int64_t n = t->numel() / t->shape()[0];
        ops_->copy(t->data_as<float>() + slot * n, at, n * static_cast<int64_t>(sizeof(float)));
        at += n;
      }
    }
  }
}

void MoELayer::check_plan(const ExecPlan& plan) const {
  const auto valid = valid_sharding_degrees(layout_.shards());
  if (std::find(valid.begin(), valid.end(), plan.r) == valid.end()) {
    std::string list;
    for (int r : valid) list += (list.empty() ? "" : ", ") + std::to_string(r);
    SY_THROW(InvalidArgument, "moe plan: r = ", plan.r, " is not a valid sharding degree for ", layout_.shards(),
             " ranks per expert (", config_.router.experts, " experts on ", group_->size(), " ranks); expected one of ",
             list);
  }
  if (plan.d < 1 || plan.d > 64)
    SY_THROW(InvalidArgument, "moe plan: d (pipelining degree) = ", plan.d, ", expected 1..64");
  if (plan.r != 1 && !layout_.is_permutation())
    SY_THROW(InvalidArgument, "moe plan: r = ", plan.r, " needs every expert once and equal slots per rank; the "
             "placement has ", layout_.placement().describe(), "; expected r = 1");
  if (plan.a2a == A2AAlgorithm::hierarchical &&
      (config_.dispatch_payload != DType::f32 || config_.combine_payload != DType::f32))
    SY_THROW(InvalidArgument, "moe plan: a2a = 2dh with bf16 payloads is not built; expected the flat all-to-all");
  const int X = exchange_group_->size();
  if (plan.a2a == A2AAlgorithm::hierarchical && X > 1 && !ops_->host_memory())
    SY_THROW(NotSupported, "moe plan: a2a = 2dh on ops '", ops_->name(), "' is not built (the 2D-hierarchical "
             "all-to-all re-lays its blocks out with host copies); expected the flat all-to-all");
  if (plan.a2a == A2AAlgorithm::hierarchical && !hierarchical_ && X > 1)
    SY_THROW(InvalidArgument, "moe plan: a2a = 2dh needs nodes: node_size = ", config_.node_size, " on the ", X,
             " ranks the all-to-all spans",
             X < group_->size() ? " (each replica domain holds every expert, so tokens stay in theirs)" : "",
             "; expected a divisor of those ranks between 2 and ", X - 1);
}

MoELayer::PlanShape MoELayer::shape_of(int r) const {
  const int S = layout_.shards(), W = group_->size();
  const int64_t H = config_.hidden_dim;
  if (r == 0) return {1, config_.router.experts, S, 0, 1, 1, H, W > 1 ? group_.get() : nullptr};
  if (S == 1) return {exchange_group_->size(), layout_.local_experts(), 1, 0, 1, 1, H, nullptr};
  const int R = S / r;
  auto it = gather_groups_.find(r);
  return {W, 1, R, layout_.shard_of_rank(group_->rank()) / R, r, R, H / r,
          it == gather_groups_.end() ? nullptr : it->second.get()};
}

const DispatchGeometry& MoELayer::geometry(int r) {
  auto it = geometries_.find(r);
  if (it == geometries_.end()) it = geometries_.emplace(r, make_geometry(shape_of(r), r)).first;
  return it->second;
}

DispatchGeometry MoELayer::make_geometry(const PlanShape& shape, int r) const {
  DispatchGeometry g;
  const int E = config_.router.experts;
  g.experts = E;
  g.shards = layout_.shards();
  g.exchange_ranks = shape.exchange_ranks;
  g.slots = shape.slots;
  g.copies = shape.copies;
  g.replicas = shape.replicas;
  g.rank = group_->rank() - exchange_first_;
  g.exchange_first = exchange_first_;
  g.send_once = config_.send_once_per_rank;
  if (g.shards > 1 && r != 0) {
    g.expert_at_position.resize(static_cast<size_t>(E));
    for (int pos = 0; pos < E; ++pos) g.expert_at_position[static_cast<size_t>(pos)] = layout_.expert_at_position(pos);
    return g;
  }
  g.blocks_of_expert.resize(static_cast<size_t>(E));
  if (r == 0) {  // every working expert on every rank, in position order
    for (int e = 0; e < E; ++e) g.blocks_of_expert[static_cast<size_t>(e)] = {layout_.position(e)};
    return g;
  }
  // Ranks below are the group's; blocks and sources the exchange's (its domain when it has one).
  const ExpertPlacement& pl = layout_.placement();
  const int me = group_->rank(), first = exchange_first_;
  auto block_of = [&](int e, int p) {
    const int u = pl.rank_of_slot(p);
    if (u < first || u >= first + g.exchange_ranks)
      SY_THROW(Error, "moe: rank ", me, " would send expert ", e, "'s rows to rank ", u, " outside its exchange of ",
               g.exchange_ranks, " ranks from ", first);
    return (u - first) * g.slots + p - pl.first_slot(u);
  };
  g.replicas_seen_by_source.assign(static_cast<size_t>(g.exchange_ranks * g.slots), 0);
  if (config_.replica_choice == MoEConfig::ReplicaChoice::nearest) {
    // Every source's quanta of every replicated expert, both for my blocks and for the padded sizes I receive.
    g.quanta_of_expert.resize(static_cast<size_t>(E));
    g.quanta_seen_by_source.assign(static_cast<size_t>(g.exchange_ranks * g.slots), 0);
    for (int e = 0; e < E; ++e) {
      const auto& slots = pl.replicas_of(e);
      const int R = static_cast<int>(slots.size());
      for (int j = 0; j < R; ++j)
        if (const int64_t q = nearest_quanta(e)[static_cast<size_t>(me) * R + j]) {
          g.blocks_of_expert[static_cast<size_t>(e)].push_back(block_of(e, slots[static_cast<size_t>(j)]));
          g.quanta_of_expert[static_cast<size_t>(e)].push_back(q);
        }
    }
    for (int l = 0; l < pl.slots(me); ++l) {
      const int e = pl.expert_at(me, l);
      if (e < 0) continue;
      const auto& slots = pl.replicas_of(e);
      const auto j = std::find(slots.begin(), slots.end(), pl.first_slot(me) + l) - slots.begin();
      for (int u = 0; u < g.exchange_ranks; ++u) {
        const int64_t q = nearest_quanta(e)[static_cast<size_t>(first + u) * slots.size() + static_cast<size_t>(j)];
        g.quanta_seen_by_source[static_cast<size_t>(u * g.slots + l)] = q;
        g.replicas_seen_by_source[static_cast<size_t>(u * g.slots + l)] = q > 0;
      }
    }
    return g;
  }
  for (int e = 0; e < E; ++e)
    for (int p : replicas_used_by(me, e)) g.blocks_of_expert[static_cast<size_t>(e)].push_back(block_of(e, p));
  for (int l = 0; l < pl.slots(me); ++l) {
    const int e = pl.expert_at(me, l);
    if (e < 0) continue;
    const int mine = pl.first_slot(me) + l;
    for (int u = 0; u < g.exchange_ranks; ++u) {
      const std::vector<int> used = replicas_used_by(first + u, e);
      if (std::find(used.begin(), used.end(), mine) != used.end())
        g.replicas_seen_by_source[static_cast<size_t>(u * g.slots + l)] = static_cast<int>(used.size());
    }
  }
  return g;
}

void MoELayer::set_placement(std::vector<int> position_of_expert) {
  if (parameters_exist_)
    SY_THROW(InvalidArgument, "moe: set_placement after the parameters exist (init_parameters or load ran) would "
                              "relabel the stored weights; set the placement first, or migrate()");
  if (config_.placement)
    SY_THROW(InvalidArgument, "moe: set_placement takes a permutation of the default layout, but this layer has the "
             "physical placement ", config_.placement->describe(), "; give the one you want in MoEConfig::placement");
  layout_.set_placement(std::move(position_of_expert));
  geometries_.clear();
  ++placement_generation_;
}

const DispatchPlan& MoELayer::last_plan() const {
  static const DispatchPlan none;
  return last_ ? last_->plan_ : none;
}

const Routing& MoELayer::last_routing() const {
  static const Routing none;
  return last_ ? last_->routing_ : none;
}

void MoELayer::replay_routing(Tensor experts, Tensor weights) {
  replay_experts_ = std::move(experts);
  replay_weights_ = std::move(weights);
}

Routing MoELayer::route_tokens(const RouterConfig& router, const TensorView& x, Tensor& logits) {
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::gate);
  const int64_t M = config_.model_dim;
  const Device where = ops_->device();  // cpu for host ops
  if (x.dtype() != DType::f32 || x.dim() != 2 || x.size(1) != M || !x.is_contiguous() || x.device() != where)
    SY_THROW(InvalidArgument, "moe: input is ", dtype_name(x.dtype()), " ", shape_string(x.shape()), " on ",
             to_string(x.device()), ", expected contiguous f32 [tokens, ", M, "] on ", to_string(where),
             " (the layer's ops: ", ops_->name(), ")");
  const int64_t T = x.size(0);
  if (config_.check_finite) {
    Tensor on_host;
    const float* v = static_cast<const float*>(x.data());
    if (!ops_->host_memory()) {
      on_host = Tensor::empty(x.shape(), DType::f32);
      ops_->to_host(on_host.data(), x.data(), static_cast<int64_t>(x.nbytes()));
      v = on_host.data_as<float>();
    }
    for (int64_t i = 0; i < T * M; ++i)
      if (!std::isfinite(v[i]))
        SY_THROW(InvalidArgument, "moe: input element ", i, " (token ", i / M, ") is ", v[i], "; expected finite values");
  }
  const int E = config_.router.experts;
  if (replay_experts_.defined()) {
    const Tensor experts = std::move(replay_experts_), weights = std::move(replay_weights_);
    replay_experts_ = Tensor(), replay_weights_ = Tensor();
    if (experts.shape().size() != 2 || experts.shape()[0] != T)
      SY_THROW(InvalidArgument, "moe: replayed routing of shape ", shape_string(experts.shape()), " for a batch of ", T,
               " tokens");
    logits = Tensor::zeros({T, E}, DType::f32);
    return replayed_routing(router, experts, weights);
  }
  // The gate runs on the ops; routing reads its logits on the host.
  Tensor computed = ops_empty({T, E});
  gemm({.m = T, .n = E, .k = M, .a = static_cast<const float*>(x.data()), .lda = M,
        .b = gate_weight_.data_as<float>(), .ldb = E, .c = computed.data_as<float>(), .ldc = E},
       OpData::gate);
  logits = ops_->copy_out(computed);
  const TensorView bias = gate_bias_.view();
  return route(router, logits, router.gate == GateKind::sigmoid_bias ? &bias : nullptr,
               router.noise_std > 0 ? &noise_ : nullptr);
}

void MoELayer::record(const MoEBatch& batch, Phase phase, int chunk) {
  // FNV-1a over (batch, phase, chunk): equal on ranks that issued the same sequence.
  const uint64_t items[] = {batch.sequence_, static_cast<uint64_t>(phase), static_cast<uint64_t>(chunk)};
  for (uint64_t v : items) {
    phase_hash_ ^= v;
    phase_hash_ *= 1099511628211ull;
  }
}

void MoELayer::require(const MoEBatch& batch, MoEBatch::Stage stage, const char* phase) const {
  if (batch.released_)
    SY_THROW(InvalidArgument, "moe: ", phase, " on batch ", batch.sequence_,
             " whose buffers were released (the layer let it go when a later batch was planned and nobody else held "
             "it); keep the handle from plan() to drive a batch later");
  if (batch.placement_generation_ != placement_generation_)
    SY_THROW(InvalidArgument, "moe: ", phase, " on batch ", batch.sequence_,
             ", planned before the experts migrated; plan it again");
  if (batch.stage_ != stage)
    SY_THROW(InvalidArgument, "moe: ", phase, " on batch ", batch.sequence_, " that is ", stage_name(batch.stage_),
             "; expected ", stage_name(stage), " (plan -> dispatch -> experts -> combine -> finish -> backward)");
}

void MoELayer::verify_plan_agreement(const ExecPlan& plan, bool moves_results) {
  if (!config_.check_plan || group_->size() == 1) return;
  // Whether results move (a combine layout) and the payloads' dtypes (they size every exchange) are part of
  // what the ranks must agree on.
  // The replica choice sizes padded blocks on both sides, so it is agreed too.
  const uint64_t payloads = (static_cast<uint64_t>(config_.dispatch_payload) * 31 + static_cast<uint64_t>(config_.combine_payload)) * 7 +
                            static_cast<uint64_t>(config_.replica_choice);
  const auto h = static_cast<int64_t>(
      (plan.hash() ^ (moves_results ? 0x9e3779b97f4a7c15ull : 0) ^ (payloads * 0xc2b2ae3d27d4eb4full)) >> 1);
  const auto order = static_cast<int64_t>(phase_hash_ >> 1);
  Tensor v = Tensor::empty({4}, DType::i64);
  int64_t* a = v.data_as<int64_t>();
  a[0] = h, a[1] = -h, a[2] = order, a[3] = -order;
  host_group_->allreduce(v, v, {.op = ReduceOp::max}).wait();
  if (a[0] != h || a[1] != -h)
    SY_THROW(InvalidArgument, "moe: ranks of '", group_->name(), "' run different plans; rank ", group_->rank(),
             " has (", plan.describe(), moves_results ? ", with a combine layout" : "", ", payloads ",
             dtype_name(config_.dispatch_payload), "/", dtype_name(config_.combine_payload),
             "). The plan and the layer's payloads must be the same on every rank");
  if (a[2] != order || a[3] != -order)
    SY_THROW(InvalidArgument, "moe: ranks of '", group_->name(), "' drove their batches' phases in different orders "
             "before batch ", batches_planned_ - 1, " (rank ", group_->rank(), "); every rank must call plan, dispatch, "
             "experts, backward (and finish with a combine layout) for the same batches in the same order");
}

MoEHandle MoELayer::plan(const TensorView& x, const RoutingChoice& routing, const ExecPlan& exec,
                         const CombineLayout* combine_layout) {
  return plan_impl(x, routing, &exec, nullptr, combine_layout);
}

MoEHandle MoELayer::plan(const TensorView& x, const RoutingChoice& routing, PlanChooser& chooser,
                         const CombineLayout* combine_layout) {
  return plan_impl(x, routing, nullptr, &chooser, combine_layout);
}

MoEHandle MoELayer::plan_impl(const TensorView& x, const RoutingChoice& routing, const ExecPlan* fixed,
                              PlanChooser* chooser, const CombineLayout* combine_layout) {
  if (fixed) check_plan(*fixed);
  if (routing.k < 1 || routing.k > config_.router.experts)
    SY_THROW(InvalidArgument, "moe: routing k = ", routing.k, ", expected 1..", config_.router.experts);
  // Nobody else holds the previous batch: its buffers go back to the pool for this one.
  if (last_ && last_.use_count() == 1) last_->release_buffers();
  MoEHandle b(new MoEBatch());
  b->router_ = config_.router;
  b->router_.k = routing.k;
  b->router_.capacity_factor = routing.capacity_factor;
  b->router_.validate();
  b->replayed_ = replay_experts_.defined();
  b->routing_ = route_tokens(b->router_, x, b->logits_);
  b->sequence_ = batches_planned_++;
  b->placement_generation_ = placement_generation_;
  const int64_t T = x.size(0);
  ExecPlan exec;
  int64_t capacity = 0;
  if (fixed) {
    exec = *fixed;
    PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::gate);
    // Uncapped dropless (capacity factor 0) drops nothing whatever the capacity
    // and sizes the exchange by counts, so it needs no all-reduce to agree one
    // (a collective per layer saved: decode steps are latency-bound).
    const bool agree = !(exec.exchange == ExchangeMode::dropless && b->router_.capacity_factor == 0);
    capacity = expert_capacity(b->router_, T, b->routing_, agree ? host_group_.get() : nullptr);
  } else {
    // One max-all-reduce agrees the capacity and the chooser's inputs.
    std::vector<double> values = chooser->local_inputs(*this, T, &b->routing_);
    values.insert(values.begin(), static_cast<double>(expert_capacity(b->router_, T, b->routing_, nullptr)));
    if (group_->size() > 1) {
      PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::gate);
      host_group_->allreduce(TensorView(values.data(), DType::f64, {static_cast<int64_t>(values.size())}),
                             TensorView(values.data(), DType::f64, {static_cast<int64_t>(values.size())}),
                             {.op = ReduceOp::max}).wait();
    }
    capacity = static_cast<int64_t>(values.front());
    values.erase(values.begin());
    exec = chooser->choose(*this, values, capacity);
    check_plan(exec);
  }
  {
    PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::gate);
    b->plan_ = build_dispatch_plan(b->router_, b->routing_, T, exec, capacity, geometry(exec.r), b->sequence_);
  }
  b->plan_.output_rows = T;
  record(*b, Phase::plan);
  verify_plan_agreement(exec, combine_layout != nullptr);
  exchange_layout(b->plan_);
  if (combine_layout) exchange_result_layout(b->plan_, *combine_layout);
  b->x_ = buffer(Buffer::input, x.shape());  // the gate's backward reads it
  ops_->copy(b->x_.data(), x.data(), static_cast<int64_t>(x.nbytes()), OpData::gate);
  last_ = b;
  return b;
}

void MoELayer::exchange_layout(DispatchPlan& p) {
  if (p.exec.exchange == ExchangeMode::padded || p.exchange_ranks == 1) return;
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::dispatch_a2a);
  const int X = p.exchange_ranks, Lw = p.slots, d = p.exec.d;
  // Per peer: the rows of every (chunk, slot) block, then (sent once) the distinct rows per chunk.
  const int64_t blocks = static_cast<int64_t>(d) * Lw, per_peer = blocks + (p.send_once ? d : 0);
  Tensor send = Tensor::empty({X * per_peer}, DType::i64), recv = Tensor::empty({X * per_peer}, DType::i64);
  int64_t* out = send.data_as<int64_t>();
  for (int u = 0; u < X; ++u)
    for (int i = 0; i < d; ++i) {
      for (int l = 0; l < Lw; ++l)
        out[u * per_peer + i * Lw + l] = p.send_block_rows[static_cast<size_t>((i * X + u) * Lw + l)];
      if (p.send_once) out[u * per_peer + blocks + i] = p.unique_send_counts[static_cast<size_t>(i * X + u)];
    }
  exchange_host_->alltoall(send, recv).wait();
  const int64_t* in = recv.data_as<int64_t>();
  p.recv_block_rows.resize(p.send_block_rows.size());
  for (int u = 0; u < X; ++u)
    for (int i = 0; i < d; ++i)
      for (int l = 0; l < Lw; ++l)
        p.recv_block_rows[static_cast<size_t>((i * X + u) * Lw + l)] = in[u * per_peer + i * Lw + l];
  if (!p.send_once) return;
  p.unique_recv_counts.resize(static_cast<size_t>(d * X));
  for (int u = 0; u < X; ++u)
    for (int i = 0; i < d; ++i) p.unique_recv_counts[static_cast<size_t>(i * X + u)] = in[u * per_peer + blocks + i];
  // Which distinct row each received expert row copies: the senders' maps,
  // grouped by peer for one all-to-all-v, then put in receive order.
  auto rows_of = [&](const std::vector<int64_t>& block_rows, int i, int u) {
    int64_t n = 0;
    for (int l = 0; l < Lw; ++l) n += block_rows[static_cast<size_t>((i * X + u) * Lw + l)];
    return n;
  };
  std::vector<int64_t> map_send_counts(static_cast<size_t>(X), 0), map_recv_counts(static_cast<size_t>(X), 0);
  std::vector<int64_t> send_group_offset(static_cast<size_t>(d * X) + 1, 0);
  for (int g = 0; g < d * X; ++g)
    send_group_offset[static_cast<size_t>(g) + 1] = send_group_offset[static_cast<size_t>(g)] + rows_of(p.send_block_rows, g / X, g % X);
  Tensor map_send = Tensor::empty({p.send_rows()}, DType::i32), map_recv = Tensor::empty({p.recv_rows()}, DType::i32);
  int32_t* ms = map_send.data_as<int32_t>();
  for (int u = 0; u < X; ++u)
    for (int i = 0; i < d; ++i) {
      const int64_t from = send_group_offset[static_cast<size_t>(i * X + u)], n = rows_of(p.send_block_rows, i, u);
      std::copy(p.unique_of_row.begin() + from, p.unique_of_row.begin() + from + n, ms);
      ms += n;
      map_send_counts[static_cast<size_t>(u)] += n;
      map_recv_counts[static_cast<size_t>(u)] += rows_of(p.recv_block_rows, i, u);
    }
  exchange_host_->alltoallv(map_send, map_send_counts, map_recv, map_recv_counts).wait();
  // Receive order is [chunk][source][slot]; the distinct rows arrive as [chunk][source].
  std::vector<int64_t> recv_group_offset(static_cast<size_t>(d * X) + 1, 0), unique_offset(static_cast<size_t>(d * X) + 1, 0);
  for (int g = 0; g < d * X; ++g) {
    recv_group_offset[static_cast<size_t>(g) + 1] = recv_group_offset[static_cast<size_t>(g)] + rows_of(p.recv_block_rows, g / X, g % X);
    unique_offset[static_cast<size_t>(g) + 1] = unique_offset[static_cast<size_t>(g)] + p.unique_recv_counts[static_cast<size_t>(g)];
  }
  p.recv_row_source.resize(static_cast<size_t>(p.recv_rows()));
  const int32_t* mr = map_recv.data_as<int32_t>();
  for (int u = 0; u < X; ++u)
    for (int i = 0; i < d; ++i) {
      const int g = i * X + u;
      for (int64_t r = recv_group_offset[static_cast<size_t>(g)]; r < recv_group_offset[static_cast<size_t>(g) + 1]; ++r) {
        const int32_t local = *mr++;
        if (local < 0 || local >= p.unique_recv_counts[static_cast<size_t>(g)])
          SY_THROW(Error, "moe: rank ", u, " sent a row map entry ", local, " beyond its ",
                   p.unique_recv_counts[static_cast<size_t>(g)], " distinct rows (chunk ", i, ")");
        p.recv_row_source[static_cast<size_t>(r)] = unique_offset[static_cast<size_t>(g)] + local;
      }
    }
}

namespace {
std::vector<int64_t> times(std::vector<int64_t> rows, int64_t width) {
  for (auto& v : rows) v *= width;
  return rows;
}
}  // namespace

int64_t MoELayer::payload_row() const {
  return config_.dispatch_payload == DType::fp8_e4m3 ? kernels::fp8_row_bytes(config_.model_dim) : config_.model_dim;
}

DType MoELayer::payload_storage() const {
  return config_.dispatch_payload == DType::fp8_e4m3 ? DType::u8 : config_.dispatch_payload;
}

void MoELayer::to_payload(const float* rows, int64_t n, void* out) {
  const int64_t M = config_.model_dim;
  if (config_.dispatch_payload == DType::fp8_e4m3) ops_->to_fp8_rows(rows, n, M, static_cast<uint8_t*>(out));
  else ops_->to_bf16(rows, n * M, static_cast<uint16_t*>(out));
}

void MoELayer::from_payload(const void* in, int64_t n, float* rows) {
  const int64_t M = config_.model_dim;
  if (config_.dispatch_payload == DType::fp8_e4m3) ops_->from_fp8_rows(static_cast<const uint8_t*>(in), n, M, rows);
  else ops_->from_bf16(static_cast<const uint16_t*>(in), n * M, rows);
}

Work MoELayer::exchange(const DispatchPlan& p, int chunk, const TensorView& in, const TensorView& out,
                        bool to_experts, int64_t per_row) {
  const int64_t M = per_row > 0 ? per_row : config_.model_dim;
  auto send = times(to_experts ? p.send_counts(chunk) : p.recv_counts(chunk), M);
  auto recv = times(to_experts ? p.recv_counts(chunk) : p.send_counts(chunk), M);
  const int64_t in_off = (to_experts ? p.send_offset(chunk) : p.recv_offset(chunk)) * M;
  const int64_t out_off = (to_experts ? p.recv_offset(chunk) : p.send_offset(chunk)) * M;
  const int64_t in_n = std::accumulate(send.begin(), send.end(), int64_t{0});
  const int64_t out_n = std::accumulate(recv.begin(), recv.end(), int64_t{0});
  const size_t es = in.element_size();  // f32, or a bf16 payload
  TensorView a(static_cast<char*>(in.data()) + in_off * static_cast<int64_t>(es), in.dtype(), {in_n}, in.device());
  TensorView b(static_cast<char*>(out.data()) + out_off * static_cast<int64_t>(out.element_size()), out.dtype(),
               {out_n}, out.device());
  if (p.exec.a2a == A2AAlgorithm::hierarchical && hierarchical_) {
    // Padded blocks are equal only when every rank holds the same slots once.
    if (p.exec.exchange == ExchangeMode::padded && layout_.is_permutation()) return hierarchical_->alltoall(a, b);
    return hierarchical_->alltoallv(a, std::move(send), b, std::move(recv));
  }
  return exchange_group_->alltoallv(a, std::move(send), b, std::move(recv));
}

Tensor MoELayer::encode(MoEBatch& b, const TensorView& x) {
  const DispatchPlan& p = b.plan_;
  const int64_t M = config_.model_dim, rows = p.dispatch_rows();
  Tensor send = buffer(Buffer::send, {rows, M});
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::encode);
  const int64_t* index = p.send_once ? ops_array(p.unique_token, b.index_.unique_token)
                                     : ops_array(p.token_of_row, b.index_.token_of_row);
  ops_->gather_rows(static_cast<const float*>(x.data()), index, rows, M, send.data_as<float>());
  return send;
}

Work MoELayer::exchange_distinct(const DispatchPlan& p, int chunk, const TensorView& in, const TensorView& out) {
  const int64_t M = config_.model_dim;
  const int X = p.exchange_ranks;
  auto counts = [&](const std::vector<int64_t>& per_group) {
    std::vector<int64_t> c(per_group.begin() + chunk * X, per_group.begin() + (chunk + 1) * X);
    return times(std::move(c), M);
  };
  auto offset = [&](const std::vector<int64_t>& per_group) {
    return std::accumulate(per_group.begin(), per_group.begin() + chunk * X, int64_t{0}) * M;
  };
  auto send = counts(p.unique_send_counts), recv = counts(p.unique_recv_counts);
  const int64_t in_n = std::accumulate(send.begin(), send.end(), int64_t{0});
  const int64_t out_n = std::accumulate(recv.begin(), recv.end(), int64_t{0});
  TensorView a(static_cast<float*>(in.data()) + offset(p.unique_send_counts), DType::f32, {in_n}, in.device());
  TensorView b(static_cast<float*>(out.data()) + offset(p.unique_recv_counts), DType::f32, {out_n}, out.device());
  if (p.exec.a2a == A2AAlgorithm::hierarchical && hierarchical_)
    return hierarchical_->alltoallv(a, std::move(send), b, std::move(recv));
  return exchange_group_->alltoallv(a, std::move(send), b, std::move(recv));
}

Work MoELayer::dispatch(MoEBatch& b) {
  require(b, MoEBatch::Stage::planned, "dispatch");
  record(b, Phase::dispatch);
  const DispatchPlan& p = b.plan_;
  b.send_ = encode(b, b.x_);
  if (p.exchange_ranks == 1) {
    if (config_.dispatch_payload != DType::f32) {  // rounded as if sent, so a payload's results need no exchange
      PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::encode);
      const int64_t n = b.send_.shape()[0];
      Tensor staged = buffer(Buffer::send_payload, {n, payload_row()}, payload_storage());
      to_payload(b.send_.data_as<float>(), n, staged.data());
      from_payload(staged.data(), n, b.send_.data_as<float>());
    }
    b.rows_ = b.send_;
    b.stage_ = MoEBatch::Stage::dispatched;
    return completed_work("dispatch");
  }
  b.rows_ = buffer(Buffer::recv, {p.recv_rows(), config_.model_dim});
  if (p.send_once) {
    int64_t distinct = 0;
    for (int64_t c : p.unique_recv_counts) distinct += c;
    b.arrived_ = buffer(Buffer::arrived, {distinct, config_.model_dim});
    for (int i = 0; i < p.exec.d; ++i) b.to_experts_.push_back(exchange_distinct(p, i, b.send_, b.arrived_));
  } else if (config_.dispatch_payload != DType::f32) {  // rounded once, sent at half (bf16) or about a quarter (fp8) of the bytes
    const int64_t per_row = payload_row();
    b.send16_ = buffer(Buffer::send_payload, {p.send_rows(), per_row}, payload_storage());
    b.rows16_ = buffer(Buffer::recv_payload, {p.recv_rows(), per_row}, payload_storage());
    {
      PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::encode);
      to_payload(b.send_.data_as<float>(), p.send_rows(), b.send16_.data());
    }
    for (int i = 0; i < p.exec.d; ++i) b.to_experts_.push_back(exchange(p, i, b.send16_, b.rows16_, true, per_row));
  } else {
    for (int i = 0; i < p.exec.d; ++i) b.to_experts_.push_back(exchange(p, i, b.send_, b.rows_, true));
  }
  b.stage_ = MoEBatch::Stage::dispatched;  // only once every chunk is posted
  return b.to_experts_.back();
}

void MoELayer::experts(MoEBatch& b, int chunk) {
  require(b, MoEBatch::Stage::dispatched, "experts");
  if (chunk != b.experts_done_ || chunk >= b.chunks())
    SY_THROW(InvalidArgument, "moe: experts(chunk ", chunk, ") on batch ", b.sequence_, " of ", b.chunks(),
             " chunks; expected chunk ", b.experts_done_, " next (chunks run in order)");
  record(b, Phase::experts, chunk);
  const DispatchPlan& p = b.plan_;
  const bool moves = p.exchange_ranks > 1;
  if (!b.weights_ready_) {
    // The working weights are gathered while the dispatch all-to-alls run.
    gather_weights(p, b.weights_);
    b.experts_ = allocate_activations(p, b.weights_);
    b.returned_ = moves ? buffer(Buffer::back, {p.send_rows(), config_.model_dim}) : b.experts_.out;
    b.weights_ready_ = true;
  }
  if (moves) {
    PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::dispatch_a2a);
    b.to_experts_[static_cast<size_t>(chunk)].wait();
  }
  if (b.rows16_.defined()) {  // the chunk's payload rows widened (exactly) for the experts
    PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::encode);
    const int64_t M = config_.model_dim, first = p.recv_offset(chunk), n = p.recv_offset(chunk + 1) - first;
    from_payload(static_cast<const char*>(b.rows16_.data()) + first * payload_row() * static_cast<int64_t>(dtype_size(b.rows16_.dtype())), n,
                 b.rows_.data_as<float>() + first * M);
  }
  if (p.send_once) {  // each expert's rows from the distinct ones
    PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::encode);
    const int64_t M = config_.model_dim, first = p.recv_offset(chunk), n = p.recv_offset(chunk + 1) - first;
    ops_->gather_rows(b.arrived_.data_as<float>(), ops_array(p.recv_row_source, b.index_.recv_row_source) + first, n,
                      M, b.rows_.data_as<float>() + first * M);
  }
  run_chunk(b, chunk);
  if (moves && config_.combine_payload == DType::bf16) {
    const int64_t M = config_.model_dim, first = p.recv_offset(chunk), n = p.recv_offset(chunk + 1) - first;
    if (!b.out16_.defined()) {
      b.out16_ = buffer(Buffer::out_payload, {p.recv_rows(), M}, DType::bf16);
      b.returned16_ = buffer(Buffer::back_payload, {p.send_rows(), M}, DType::bf16);
    }
    {
      PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::decode);
      ops_->to_bf16(b.experts_.out.data_as<float>() + first * M, n * M,
                    static_cast<uint16_t*>(b.out16_.data()) + first * M);
    }
    b.back_.push_back(exchange(p, chunk, b.out16_, b.returned16_, false));
  } else if (moves) {
    b.back_.push_back(exchange(p, chunk, b.experts_.out, b.returned_, false));
  } else if (config_.combine_payload == DType::bf16) {  // nothing moves: the results rounded as if returned
    PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::decode);
    const int64_t M = config_.model_dim, first = p.recv_offset(chunk), n = p.recv_offset(chunk + 1) - first;
    Tensor staged = buffer(Buffer::out_payload, {n, M}, DType::bf16);
    float* out = b.experts_.out.data_as<float>() + first * M;
    ops_->to_bf16(out, n * M, static_cast<uint16_t*>(staged.data()));
    ops_->from_bf16(static_cast<const uint16_t*>(staged.data()), n * M, out);
  }
  ++b.experts_done_;
}

Work MoELayer::combine(MoEBatch& b) {
  require(b, MoEBatch::Stage::dispatched, "combine");
  while (b.experts_done_ < b.chunks()) experts(b, b.experts_done_);
  b.stage_ = MoEBatch::Stage::combining;
  return b.back_.empty() ? completed_work("combine") : b.back_.back();
}

const MoEForward& MoELayer::finish(MoEBatch& b) {
  if (b.stage_ == MoEBatch::Stage::dispatched) combine(b);
  require(b, MoEBatch::Stage::combining, "finish");
  if (b.plan_.moves_results) record(b, Phase::finish);  // a collective only with a combine layout
  const DispatchPlan& p = b.plan_;
  const int64_t M = config_.model_dim;
  {
    PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::combine_a2a);
    for (auto& w : b.back_) w.wait();
  }
  // Backward never reads the sent rows or (when they moved) the experts' own
  // outputs: back to the pool now, so a handle kept for backward holds less.
  for (auto& w : b.to_experts_) w.wait();
  b.send_ = b.arrived_ = b.send16_ = b.rows16_ = b.out16_ = Tensor();
  if (p.exchange_ranks > 1) b.experts_.out = Tensor();
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::decode);
  if (b.returned16_.defined()) {  // the bf16 results widened (exactly) before the weighted sum
    ops_->from_bf16(static_cast<const uint16_t*>(b.returned16_.data()), b.returned_.numel(), b.returned_.data_as<float>());
    b.returned16_ = Tensor();
  }
  const int kc = p.k * p.copies;
  MoEForward& f = b.result_;
  f.output = ops_empty({p.tokens, M});
  std::vector<float> scale(p.row_of_choice.size(), 0.f);
  for (size_t c = 0; c < scale.size(); ++c)
    if (p.row_of_choice[c] >= 0) scale[c] = p.weight_of_row[static_cast<size_t>(p.row_of_choice[c])];
  Tensor scale_slot;
  ops_->combine_rows(b.returned_.data_as<float>(), ops_array(p.row_of_choice, b.index_.row_of_choice),
                     ops_array(scale, scale_slot), p.tokens, kc, M, f.output.data_as<float>());
  if (p.moves_results) {
    PhaseTimer back_timer(times_, virtual_times_, &MoEPhaseTimes::combine_a2a);
    Tensor arrived = move_rows(f.output.data_as<float>(), p.result_send_order, b.index_.result_send_order,
                               p.result_send_counts, p.result_recv_counts);
    f.output = ops_zeros({p.output_rows, M});
    ops_->scatter_rows(arrived.data_as<float>(), ops_array(p.result_index, b.index_.result_index),
                       static_cast<int64_t>(p.result_index.size()), M, f.output.data_as<float>());
  }
  f.balance_loss = b.routing_.balance_loss;
  f.z_loss = b.routing_.z_loss;
  f.dropped = p.dropped;
  b.stage_ = MoEBatch::Stage::finished;
  return f;
}

Tensor MoELayer::move_rows(const float* from, const std::vector<int64_t>& order, Tensor& order_slot,
                           const std::vector<int64_t>& send_counts, const std::vector<int64_t>& recv_counts) {
  const int64_t M = config_.model_dim;
  int64_t incoming = 0;
  for (int64_t c : recv_counts) incoming += c;
  Tensor send = ops_empty({static_cast<int64_t>(order.size()), M});
  Tensor recv = ops_empty({incoming, M});
  ops_->gather_rows(from, ops_array(order, order_slot), static_cast<int64_t>(order.size()), M, send.data_as<float>());
  group_->alltoallv(ops_view(send.data(), DType::f32, {send.numel()}), times(send_counts, M),
                    ops_view(recv.data(), DType::f32, {recv.numel()}), times(recv_counts, M)).wait();
  return recv;
}

void MoELayer::exchange_result_layout(DispatchPlan& p, const CombineLayout& layout) {
  const int W = group_->size();
  const int64_t T = p.tokens;
  // A bad layout fails on every rank at once: its flag rides on the count exchange.
  std::string problem;
  if (static_cast<int64_t>(layout.rank.size()) != T || static_cast<int64_t>(layout.index.size()) != T)
    problem = detail::make_string("it has ", layout.rank.size(), " ranks and ", layout.index.size(),
                                  " indices for ", T, " tokens");
  else if (layout.output_rows < 0)
    problem = detail::make_string("output_rows = ", layout.output_rows);
  for (int64_t t = 0; problem.empty() && t < T; ++t)
    if (layout.rank[t] < 0 || layout.rank[t] >= W || layout.index[t] < 0)
      problem = detail::make_string("token ", t, " goes to rank ", layout.rank[t], " row ", layout.index[t],
                                    " (", W, " ranks)");
  p.result_send_counts.assign(static_cast<size_t>(W), 0);
  if (problem.empty())
    for (int64_t t = 0; t < T; ++t) ++p.result_send_counts[static_cast<size_t>(layout.rank[t])];
  Tensor counts = Tensor::empty({2 * W}, DType::i64), theirs = Tensor::empty({2 * W}, DType::i64);
  for (int u = 0; u < W; ++u) {
    counts.data_as<int64_t>()[2 * u] = p.result_send_counts[u];
    counts.data_as<int64_t>()[2 * u + 1] = problem.empty() ? 0 : 1;
  }
  host_group_->alltoall(counts, theirs).wait();
  for (int u = 0; u < W; ++u)
    if (theirs.data_as<int64_t>()[2 * u + 1])
      SY_THROW(InvalidArgument, "moe: rank ", u, "'s combine layout is invalid",
               u == group_->rank() ? ": " + problem : std::string(" (it says why)"));
  p.result_recv_counts.assign(static_cast<size_t>(W), 0);
  for (int u = 0; u < W; ++u) p.result_recv_counts[u] = theirs.data_as<int64_t>()[2 * u];
  // My tokens grouped by destination (stable), and each one's row there.
  p.result_send_order.resize(static_cast<size_t>(T));
  std::iota(p.result_send_order.begin(), p.result_send_order.end(), int64_t{0});
  std::stable_sort(p.result_send_order.begin(), p.result_send_order.end(),
                   [&](int64_t a, int64_t b) { return layout.rank[a] < layout.rank[b]; });
  Tensor rows = Tensor::empty({T}, DType::i64);
  for (int64_t i = 0; i < T; ++i) rows.data_as<int64_t>()[i] = layout.index[p.result_send_order[i]];
  int64_t incoming = 0;
  for (int64_t c : p.result_recv_counts) incoming += c;
  Tensor arrived = Tensor::empty({incoming}, DType::i64);
  host_group_->alltoallv(rows, p.result_send_counts, arrived, p.result_recv_counts).wait();
  p.result_index.assign(arrived.data_as<int64_t>(), arrived.data_as<int64_t>() + incoming);
  // The receivers' checks, then agreed: a bad row on any rank fails every rank.
  std::vector<int64_t> sorted = p.result_index;
  std::sort(sorted.begin(), sorted.end());
  std::string bad;
  for (size_t i = 0; i < sorted.size() && bad.empty(); ++i)
    if (sorted[i] >= layout.output_rows)
      bad = detail::make_string("a result for row ", sorted[i], ", beyond its output_rows = ", layout.output_rows);
    else if (i > 0 && sorted[i] == sorted[i - 1])
      bad = detail::make_string("two results for row ", sorted[i]);
  double flag[2] = {bad.empty() ? -1.0 : static_cast<double>(group_->rank()), 0.0};
  host_group_->allreduce(TensorView(flag, DType::f64, {2}), TensorView(flag, DType::f64, {2}), {.op = ReduceOp::max})
      .wait();
  if (flag[0] >= 0) {
    const int culprit = static_cast<int>(flag[0]);
    SY_THROW(InvalidArgument, "moe: rank ", culprit, " receives ",
             culprit == group_->rank() ? bad : std::string("results its combine layout cannot hold (it says which)"),
             "; expected each of its rows at most once");
  }
  p.moves_results = true;
  p.output_rows = layout.output_rows;
}

const MoEForward& MoELayer::forward(MoEBatch& b) {
  if (b.stage_ == MoEBatch::Stage::planned) dispatch(b);
  if (b.stage_ == MoEBatch::Stage::dispatched) combine(b);  // the chunks experts() has not run
  return finish(b);
}

MoEForward MoELayer::forward(const TensorView& x) { return forward(x, routing_choice(), config_.plan); }

MoEForward MoELayer::forward(const TensorView& x, const RoutingChoice& routing, const ExecPlan& exec) {
  current_.reset();  // one batch at a time: the previous one's buffers serve this one
  current_ = plan(x, routing, exec);
  return forward(*current_);
}

MoEForward MoELayer::forward(const TensorView& x, const RoutingChoice& routing, PlanChooser& chooser) {
  current_.reset();
  current_ = plan(x, routing, chooser);
  return forward(*current_);
}

Tensor MoELayer::backward(const TensorView& dout, double balance_coef, double z_coef, bool input_grad) {
  if (!current_) SY_THROW(InvalidArgument, "moe: backward without a forward to differentiate");
  return backward(*current_, dout, balance_coef, z_coef, input_grad);
}

Tensor MoELayer::backward(MoEBatch& b, const TensorView& dout, double balance_coef, double z_coef, bool input_grad) {
  require(b, MoEBatch::Stage::finished, "backward");
  if (b.replayed_)
    SY_THROW(InvalidArgument, "moe: backward on batch ", b.sequence_, ", routed by replay_routing: a replayed routing has "
             "no gate logits to train (replays are for inference and timing)");
  parameters_changed();  // an optimizer step follows: the next batch makes its bf16 copies again
  if (config_.dispatch_payload != DType::f32 || config_.combine_payload != DType::f32)
    SY_THROW(NotSupported, "moe: backward with ", dtype_name(config_.dispatch_payload), " dispatch and ",
             dtype_name(config_.combine_payload), " combine payloads is not built (payloads other than f32 are for "
             "inference)");
  record(b, Phase::backward);
  PhaseTimer timer(times_, virtual_times_, &MoEPhaseTimes::backward);
  const DispatchPlan& p = b.plan_;
  const int64_t T = p.tokens, M = config_.model_dim;
  const int k = p.k, kc = p.k * p.copies, S = layout_.shards();
  const Device where = ops_->device();  // cpu for host ops
  if (dout.dtype() != DType::f32 || dout.shape() != Shape{p.output_rows, M} || !dout.is_contiguous() ||
      dout.device() != where)
    SY_THROW(InvalidArgument, "moe: dout is ", dtype_name(dout.dtype()), " ", shape_string(dout.shape()), " on ",
             to_string(dout.device()), ", expected contiguous f32 [", p.output_rows, ", ", M, "] on ",
             to_string(where), " like the output");
  const float* g = static_cast<const float*>(dout.data());
  Tensor dout_of_tokens;  // the combine layout's dout, back at the tokens' ranks
  if (p.moves_results) {
    Tensor home = move_rows(g, p.result_index, b.index_.result_index, p.result_recv_counts, p.result_send_counts);
    dout_of_tokens = ops_empty({T, M});
    ops_->scatter_rows(home.data_as<float>(), ops_array(p.result_send_order, b.index_.result_send_order), T, M,
                       dout_of_tokens.data_as<float>());
    g = dout_of_tokens.data_as<float>();
  }

  // Combine: returned rows (every copy) were weighted and summed into their tokens.
  Tensor d_returned = buffer(Buffer::d_returned, {p.send_rows(), M});
  const int64_t* token_of_row = ops_array(p.token_of_row, b.index_.token_of_row);
  ops_->gather_scaled_rows(g, token_of_row, ops_array(p.weight_of_row, b.index_.weight_of_row), p.send_rows(), M,
                           d_returned.data_as<float>());
  std::vector<float> d_weight_of_row(static_cast<size_t>(p.send_rows()));
  {
    Tensor dots = ops_->host_memory() ? Tensor() : ops_empty({p.send_rows()});
    ops_->row_dots(g, token_of_row, b.returned_.data_as<float>(), p.send_rows(), M,
                   dots.defined() ? dots.data_as<float>() : d_weight_of_row.data());
    if (dots.defined()) ops_->to_host(d_weight_of_row.data(), dots.data(), static_cast<int64_t>(dots.nbytes()));
  }

  // To the experts the way the tokens went, chunk by chunk, each chunk's
  // gradient returning while the next one computes.
  const bool moves = p.exchange_ranks > 1;
  const int d = p.exec.d;
  Tensor d_out = moves ? buffer(Buffer::d_out, {p.recv_rows(), M}) : d_returned;
  Tensor d_rows = buffer(Buffer::d_rows, {p.recv_rows(), M});
  Tensor d_sent = moves ? buffer(Buffer::d_sent, {p.send_rows(), M}) : d_rows;
  // Declared after the buffers they write: destroyed (waited for) first on unwinding.
  struct Posted {
    std::vector<Work> works;
    ~Posted() {
      for (auto& w : works) try {
          w.wait();
        } catch (...) {
        }
    }
  } to_experts, back;
  if (moves)
    for (int i = 0; i < d; ++i) to_experts.works.push_back(exchange(p, i, d_returned, d_out, true));
  const PlanShape shape = shape_of(p.exec.r);
  const Working& w = b.weights_;
  ExpertParams wg;  // working-weight gradients
  if (w.gathered) {
    wg.w1 = buffer(Buffer::dw1, w.p.w1.shape());
    wg.w2 = buffer(Buffer::dw2, w.p.w2.shape());
    ops_->zero(wg.w1.data(), static_cast<int64_t>(wg.w1.nbytes()));
    ops_->zero(wg.w2.data(), static_cast<int64_t>(wg.w2.nbytes()));
    wg.b1 = ops_zeros(w.p.b1.shape());
    wg.b2 = ops_zeros(w.p.b2.shape());
  } else if (!replica_groups_.empty()) {
    // This batch's gradients alone are summed over each expert's replicas.
    wg = {fresh(grads_.w1.shape()), fresh(grads_.b1.shape()), fresh(grads_.w2.shape()), fresh(grads_.b2.shape())};
  } else {
    wg = grads_;
    if (S > 1) wg.b2 = ops_zeros(grads_.b2.shape());  // summed over the expert's ranks below
  }
  Tensor dy16, dp16;
  if (config_.compute == DType::bf16) {
    dy16 = buffer(Buffer::d_out_bf16, {p.recv_rows(), M}, DType::bf16);
    dp16 = buffer(Buffer::d_pre_bf16, {p.recv_rows(), w.p.w1.shape()[2]}, DType::bf16);
  }
  for (int i = 0; i < d; ++i) {
    if (moves) to_experts.works[static_cast<size_t>(i)].wait();
    backward_chunk(b, i, d_out, input_grad, wg, d_rows, dy16, dp16);
    if (moves && input_grad) back.works.push_back(exchange(p, i, d_rows, d_sent, false));
  }
  scatter_gradients(shape, wg, w.gathered);
  if (!w.gathered && !replica_groups_.empty()) {
    sum_replica_gradients(wg);
    for (auto [acc, part] : {std::pair{&grads_.w1, &wg.w1}, {&grads_.b1, &wg.b1}, {&grads_.w2, &wg.w2},
                             {&grads_.b2, &wg.b2}})
      ops_->axpy(1.f, part->data_as<float>(), part->numel(), acc->data_as<float>());
  }

  // Gate: the weights of the choices (summed over a row's copies), then the
  // losses, down to the logits.
  std::vector<double> d_weight(static_cast<size_t>(T * k), 0.0);
  for (int64_t c = 0; c < T * k; ++c)
    for (int copy = 0; copy < p.copies; ++copy) {
      const int64_t row = p.row_of_choice[static_cast<size_t>(c * p.copies + copy)];
      if (row >= 0) d_weight[static_cast<size_t>(c)] += d_weight_of_row[static_cast<size_t>(row)];
    }
  Tensor d_logits = ops_->copy_in(gate_backward(b.router_, b.routing_, b.logits_, d_weight, balance_coef, z_coef));
  const int E = config_.router.experts;
  Tensor local_gate_grad = ops_zeros({M, E});
  gemm({.transpose_a = true, .m = M, .n = E, .k = T, .a = b.x_.data_as<float>(), .lda = M,
        .b = d_logits.data_as<float>(), .ldb = E, .c = local_gate_grad.data_as<float>(), .ldc = E},
       OpData::gate);
  group_->allreduce(local_gate_grad, local_gate_grad).wait();
  ops_->axpy(1.f, local_gate_grad.data_as<float>(), E * M, gate_grad_.data_as<float>(), OpData::gate);

  if (!input_grad) return Tensor();
  for (auto& work : back.works) work.wait();
  // Every copy's partial input gradient lands on its token.
  Tensor dx = ops_empty({T, M});
  ops_->combine_rows(d_sent.data_as<float>(), ops_array(p.row_of_choice, b.index_.row_of_choice), nullptr, T, kc, M,
                     dx.data_as<float>());
  gemm({.transpose_b = true, .m = T, .n = M, .k = E, .a = d_logits.data_as<float>(), .lda = E,
        .b = gate_weight_.data_as<float>(), .ldb = E, .beta = 1.f, .c = dx.data_as<float>(), .ldc = M},
       OpData::gate);
  return dx;
}

void MoELayer::update_gate_bias(double rate) {
  if (config_.router.gate != GateKind::sigmoid_bias)
    SY_THROW(InvalidArgument, "moe: update_gate_bias needs the sigmoid_bias gate");
  if (!last_) SY_THROW(InvalidArgument, "moe: update_gate_bias without a forward");
  const int E = config_.router.experts;
  Tensor load = Tensor::empty({E}, DType::f64);
  for (int e = 0; e < E; ++e) load.data_as<double>()[e] = static_cast<double>(last_->routing_.expert_load[e]);
  host_group_->allreduce(load, load).wait();  // the group's load, so every replica moves its bias alike
  double mean = 0;
  for (int e = 0; e < E; ++e) mean += load.data_as<double>()[e] / E;
  for (int e = 0; e < E; ++e) {
    const double l = load.data_as<double>()[e];
    gate_bias_.data_as<float>()[e] += static_cast<float>(l < mean ? rate : l > mean ? -rate : 0.0);
  }
}

MoELayer::CommBusy MoELayer::comm_busy() const {
  const bool virt = ops_->device_model() != nullptr;
  auto sum = [&](const Communicator& c, std::initializer_list<const char*> ops) {
    const CommStats st = c.stats();
    double t = 0;
    for (const char* op : ops) {
      auto it = st.ops.find(op);
      if (it != st.ops.end()) t += virt ? it->second.virtual_seconds : it->second.seconds;
    }
    return t;
  };
  CommBusy b;
  b.exchange = sum(*group_, {"alltoall", "alltoallv"});
  if (exchange_group_ != group_) b.exchange += sum(*exchange_group_, {"alltoall", "alltoallv"});
  if (hierarchical_)
    b.exchange += sum(*hierarchical_->intra(), {"alltoall", "alltoallv"}) +
                  sum(*hierarchical_->inter(), {"alltoall", "alltoallv"});
  b.weights = sum(*group_, {"allgather", "allgatherv", "reduce_scatter"});
  std::vector<const Communicator*> seen;
  for (const auto& [r, g] : gather_groups_)
    if (std::find(seen.begin(), seen.end(), g.get()) == seen.end()) {
      seen.push_back(g.get());
      b.weights += sum(*g, {"allgather", "allgatherv", "reduce_scatter"});
    }
  return b;
}

double rank_load_max_over_mean(Communicator& group, const std::vector<const DispatchPlan*>& plans) {
  const int W = group.size();
  std::vector<double> rows(static_cast<size_t>(W), 0.0);
  for (const DispatchPlan* p : plans)
    for (size_t u = 0; u < p->kept_rows_to_rank.size() && p->exchange_first + u < rows.size(); ++u)
      rows[p->exchange_first + u] += static_cast<double>(p->kept_rows_to_rank[u]);
  group.allreduce(TensorView(rows.data(), DType::f64, {W}), TensorView(rows.data(), DType::f64, {W})).wait();
  double total = 0;
  for (double r : rows) total += r;
  return total > 0 ? *std::max_element(rows.begin(), rows.end()) / (total / W) : 1.0;
}

}  // namespace switchyard
