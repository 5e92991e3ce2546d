#include "parallel/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "core/error.h"
#include "moe/layer_internal.h"
#include "moe/moe_layer.h"
#include "moe/param_layout.h"

namespace switchyard {

// MoELayer's checkpoints, in the format of parallel/checkpoint.h: whole logical
// experts keyed "experts.<e>.w1" (a sliced expert saved whole by its first
// slice's rank), rank 0 also the gate, so any world size, E/W split,
// placement or plan loads them.


namespace {
using moe_detail::copy_hidden_piece;
using kernels::Activation;
std::string expert_key(int expert, const char* name) { return "experts." + std::to_string(expert) + "." + name; }
}  // namespace

LogicalExpertTensors MoELayer::logical_expert_tensors(const ExpertParams& stored, const std::string& prefix) const {
  const int me = group_->rank(), S = layout_.shards();
  // Device ops: the experts copied out once; the views below point into the copies.
  const ExpertParams p = to_host(stored);
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in(), H1s = H1 / S, Hs = local_hidden_;
  const bool gated = config_.activation == Activation::swiglu;
  LogicalExpertTensors out;
  auto slice = [](const Tensor& t, int slot, Shape shape) {
    const int64_t n = shape_numel(shape);
    return TensorView(const_cast<float*>(t.data_as<float>()) + slot * n, DType::f32, std::move(shape));
  };
  auto key = [&](int e, const char* name) { return prefix + expert_key(e, name); };
  if (S == 1) {
    for (int slot = 0; slot < layout_.slots(me); ++slot) {
      const int e = layout_.expert_at(me, slot);
      // Each logical expert once, by its primary replica.
      if (e < 0 || layout_.position(e) != layout_.position_at(me, slot)) continue;
      out.tensors.emplace_back(key(e, "w1"), slice(p.w1, slot, {M, H1}));
      out.tensors.emplace_back(key(e, "b1"), slice(p.b1, slot, {H1}));
      out.tensors.emplace_back(key(e, "w2"), slice(p.w2, slot, {H, M}));
      out.tensors.emplace_back(key(e, "b2"), slice(p.b2, slot, {M}));
    }
    if (!ops_->host_memory()) out.keep = {p.w1, p.b1, p.w2, p.b2};
    return out;
  }
  // Sliced experts are saved whole by their first shard, so the checkpoint
  // does not depend on S.
  Tensor w1 = Tensor::empty({S, M, H1s}, DType::f32), b1 = Tensor::empty({S, H1s}, DType::f32);
  Tensor w2 = Tensor::empty({S * Hs, M}, DType::f32);
  const std::shared_ptr<Communicator> shards = host_side(shard_group_);
  Work works[] = {shards->allgather(p.w1, w1), shards->allgather(p.b1, b1), shards->allgather(p.w2, w2)};
  for (auto& work : works) work.wait();
  if (layout_.shard_of_rank(me) == 0) {
    Tensor fw1 = Tensor::empty({M, H1}, DType::f32), fb1 = Tensor::empty({H1}, DType::f32);
    for (int s = 0; s < S; ++s) {
      copy_hidden_piece(gated, M, H, s, S, fw1.data_as<float>(), w1.data_as<float>() + s * M * H1s, false);
      copy_hidden_piece(gated, 1, H, s, S, fb1.data_as<float>(), b1.data_as<float>() + s * H1s, false);
    }
    const int e = layout_.expert_at(me, 0);
    out.tensors.emplace_back(key(e, "w1"), fw1.view());
    out.tensors.emplace_back(key(e, "b1"), fb1.view());
    out.tensors.emplace_back(key(e, "w2"), TensorView(w2.data(), DType::f32, {H, M}));
    out.tensors.emplace_back(key(e, "b2"), slice(p.b2, 0, {M}));
    out.keep = {fw1, fb1, w2, p.b2};
  }
  return out;
}

void MoELayer::assign_logical_experts(const LogicalExpertSource& get, ExpertParams& stored) const {
  // Device ops: filled on host copies, then copied in.
  ExpertParams host_copy = to_host(stored);
  ExpertParams& into = ops_->host_memory() ? stored : host_copy;
  const int S = layout_.shards(), shard = layout_.shard_of_rank(group_->rank());
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in(), H1s = H1 / S, Hs = local_hidden_;
  const bool gated = config_.activation == Activation::swiglu;
  const int me = group_->rank();
  for (int slot = 0; slot < layout_.slots(me); ++slot) {
    const int e = layout_.expert_at(me, slot);
    if (e < 0) continue;  // an unused slot
    Tensor w1 = get(e, "w1", {M, H1}), b1 = get(e, "b1", {H1}), w2 = get(e, "w2", {H, M}), b2 = get(e, "b2", {M});
    copy_hidden_piece(gated, M, H, shard, S, w1.data_as<float>(), into.w1.data_as<float>() + slot * M * H1s, true);
    copy_hidden_piece(gated, 1, H, shard, S, b1.data_as<float>(), into.b1.data_as<float>() + slot * H1s, true);
    std::memcpy(into.w2.data_as<float>() + slot * Hs * M, w2.data_as<float>() + shard * Hs * M,
                static_cast<size_t>(Hs * M) * sizeof(float));
    std::memcpy(into.b2.data_as<float>() + slot * M, b2.data(), b2.nbytes());
  }
  if (!ops_->host_memory())
    for (auto [to, from] : {std::pair{&stored.w1, &into.w1}, {&stored.b1, &into.b1}, {&stored.w2, &into.w2},
                            {&stored.b2, &into.b2}})
      ops_->from_host(to->data(), from->data(), static_cast<int64_t>(from->nbytes()));
}

void MoELayer::save(const std::string& dir) const {
  LogicalExpertTensors experts = logical_expert_tensors(params_);
  std::vector<std::pair<std::string, TensorView>> tensors;
  const Tensor gate = ops_->copy_out(gate_weight_);
  if (group_->rank() == 0) tensors.emplace_back("gate.weight", gate.view());
  tensors.insert(tensors.end(), experts.tensors.begin(), experts.tensors.end());
  save_checkpoint(*host_group_, dir, tensors,
                  {{"content", "moe-layer"},
                   {"experts", std::to_string(config_.router.experts)},
                   {"saved_by", std::to_string(group_->size())}});
}

void MoELayer::load(const std::string& dir) {
  // Every rank reads; one rank's failure (an expert missing, a shape) fails them all alike.
  std::string error;
  try {
    load_here(dir);
  } catch (const std::exception& e) {
    error = e.what();
  }
  agree_on_success(*host_group_, dir, error, "load it");
}

void MoELayer::load_here(const std::string& dir) {
  parameters_exist_ = true;
  parameters_changed();
  const Checkpoint ckpt = Checkpoint::open(dir);
  const Tensor g = ckpt.load_f32("gate.weight", gate_weight_.shape());
  ops_->from_host(gate_weight_.data(), g.data(), static_cast<int64_t>(g.nbytes()));
  assign_logical_experts(
      [&](int e, const char* name, const Shape& shape) { return ckpt.load_f32(expert_key(e, name), shape); }, params_);
}

}  // namespace switchyard
