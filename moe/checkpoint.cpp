#include "moe/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "core/error.h"
#include "moe/layer_internal.h"
#include "moe/param_layout.h"

namespace switchyard {

std::vector<SafetensorsFile> open_checkpoint_shards(const std::string& prefix) {
  namespace fs = std::filesystem;
  const fs::path base(prefix);
  const fs::path dir = base.has_parent_path() ? base.parent_path() : fs::path(".");
  const std::string stem = base.filename().string() + ".rank";
  std::vector<SafetensorsFile> shards;
  if (fs::is_directory(dir))
    for (const auto& entry : fs::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind(stem, 0) == 0 && name.size() > 12 && name.substr(name.size() - 12) == ".safetensors")
        shards.push_back(SafetensorsFile::open(entry.path().string()));
    }
  if (shards.empty()) SY_THROW(IoError, "moe checkpoint: no shards '", prefix, ".rank*-of-*.safetensors'");
  return shards;
}

ReshardReport reshard_checkpoint(const std::string& source_prefix, const std::string& target_prefix, int ranks) {
  if (ranks < 1) SY_THROW(InvalidArgument, "reshard: ranks = ", ranks, ", expected >= 1");
  const auto shards = open_checkpoint_shards(source_prefix);
  // Which file holds each tensor (a tensor in two files: stale shards of another save).
  std::map<std::string, const SafetensorsFile*> where;
  std::set<int> experts;
  for (const auto& f : shards)
    for (const auto& e : f.entries()) {
      auto [it, fresh] = where.emplace(e.name, &f);
      if (!fresh)
        SY_THROW(InvalidArgument, "reshard: tensor '", e.name, "' is in both '", it->second->path(), "' and '",
                 f.path(), "'; shards of several saves share the prefix '", source_prefix, "'");
      if (e.name.rfind("experts.", 0) == 0) experts.insert(std::stoi(e.name.substr(8)));
    }
  const int E = static_cast<int>(experts.size());
  if (E == 0 || *experts.rbegin() != E - 1)
    SY_THROW(InvalidArgument, "reshard: checkpoint '", source_prefix, "' holds experts ",
             E == 0 ? std::string("none") : std::to_string(*experts.begin()) + ".." + std::to_string(*experts.rbegin()),
             " (", E, " distinct); expected 0..E-1");
  if (!where.count("gate.weight")) SY_THROW(InvalidArgument, "reshard: checkpoint '", source_prefix, "' has no gate.weight");
  const ParamLayout layout(E, ranks);  // validates E against ranks
  std::vector<std::vector<std::string>> names(static_cast<size_t>(ranks));
  names[0].push_back("gate.weight");
  for (const auto& [name, file] : where)
    if (name.rfind("experts.", 0) == 0) names[static_cast<size_t>(layout.owner(std::stoi(name.substr(8))))].push_back(name);
  for (int r = 0; r < ranks; ++r) {
    std::vector<Tensor> keep;
    std::vector<std::pair<std::string, TensorView>> tensors;
    for (const auto& name : names[static_cast<size_t>(r)]) {
      keep.push_back(where.at(name)->load(name));
      tensors.emplace_back(name, keep.back().view());
    }
    save_safetensors(target_prefix + ".rank" + std::to_string(r) + "-of-" + std::to_string(ranks) + ".safetensors",
                     tensors, {{"format", "switchyard-moe-v1"}, {"experts", std::to_string(E)}});
  }
  return {E, static_cast<int>(shards.size()), ranks};
}

// ---- MoELayer's own checkpoints ----

namespace {
using moe_detail::copy_hidden_piece;
using kernels::Activation;
std::string expert_key(int expert, const char* name) { return "experts." + std::to_string(expert) + "." + name; }
}  // namespace

void MoELayer::save(const std::string& prefix) const {
  const int me = group_->rank(), W = group_->size(), S = layout_.shards();
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in(), H1s = H1 / S, Hs = local_hidden_;
  const bool gated = config_.activation == Activation::swiglu;
  std::vector<std::pair<std::string, TensorView>> tensors;
  std::vector<Tensor> keep;
  if (me == 0) tensors.emplace_back("gate.weight", gate_weight_.view());
  auto slice = [](const Tensor& t, int slot, Shape shape) {
    const int64_t n = shape_numel(shape);
    return TensorView(const_cast<float*>(t.data_as<float>()) + slot * n, DType::f32, std::move(shape));
  };
  if (S == 1) {
    for (int slot = 0; slot < layout_.slots(me); ++slot) {
      const int e = layout_.expert_at(me, slot);
      // Each logical expert once, by its primary replica.
      if (e < 0 || layout_.position(e) != layout_.position_at(me, slot)) continue;
      tensors.emplace_back(expert_key(e, "w1"), slice(params_.w1, slot, {M, H1}));
      tensors.emplace_back(expert_key(e, "b1"), slice(params_.b1, slot, {H1}));
      tensors.emplace_back(expert_key(e, "w2"), slice(params_.w2, slot, {H, M}));
      tensors.emplace_back(expert_key(e, "b2"), slice(params_.b2, slot, {M}));
    }
  } else {
    // Sliced experts are saved whole by their first shard, so the checkpoint
    // does not depend on S.
    Tensor w1 = Tensor::empty({S, M, H1s}, DType::f32), b1 = Tensor::empty({S, H1s}, DType::f32);
    Tensor w2 = Tensor::empty({S * Hs, M}, DType::f32);
    Work works[] = {shard_group_->allgather(params_.w1, w1), shard_group_->allgather(params_.b1, b1),
                    shard_group_->allgather(params_.w2, w2)};
    for (auto& work : works) work.wait();
    if (layout_.shard_of_rank(me) == 0) {
      Tensor fw1 = Tensor::empty({M, H1}, DType::f32), fb1 = Tensor::empty({H1}, DType::f32);
      for (int s = 0; s < S; ++s) {
        copy_hidden_piece(gated, M, H, s, S, fw1.data_as<float>(), w1.data_as<float>() + s * M * H1s, false);
        copy_hidden_piece(gated, 1, H, s, S, fb1.data_as<float>(), b1.data_as<float>() + s * H1s, false);
      }
      const int e = layout_.expert_at(me, 0);
      tensors.emplace_back(expert_key(e, "w1"), fw1.view());
      tensors.emplace_back(expert_key(e, "b1"), fb1.view());
      tensors.emplace_back(expert_key(e, "w2"), TensorView(w2.data(), DType::f32, {H, M}));
      tensors.emplace_back(expert_key(e, "b2"), slice(params_.b2, 0, {M}));
      keep = {fw1, fb1, w2};
    }
  }
  save_safetensors(prefix + ".rank" + std::to_string(me) + "-of-" + std::to_string(W) + ".safetensors", tensors,
                   {{"format", "switchyard-moe-v1"}, {"experts", std::to_string(config_.router.experts)}});
  group_->barrier().wait();  // every shard is on disk before anyone loads
}

void MoELayer::load(const std::string& prefix) {
  parameters_exist_ = true;
  const std::vector<SafetensorsFile> shards = open_checkpoint_shards(prefix);
  auto find = [&](const std::string& key) -> const SafetensorsFile& {
    const SafetensorsFile* found = nullptr;
    for (const auto& f : shards) {
      if (!f.contains(key)) continue;
      if (found)
        SY_THROW(InvalidArgument, "moe: checkpoint '", prefix, "': tensor '", key, "' is in both '", found->path(),
                 "' and '", f.path(), "'; shards of several saves share the prefix, remove the stale ones");
      found = &f;
    }
    if (!found)
      SY_THROW(InvalidArgument, "moe: checkpoint '", prefix, "' has no tensor '", key, "' (", shards.size(), " shards)");
    return *found;
  };
  const int S = layout_.shards(), shard = layout_.shard_of_rank(group_->rank());
  const int64_t M = config_.model_dim, H = config_.hidden_dim, H1 = hidden_in(), H1s = H1 / S, Hs = local_hidden_;
  const bool gated = config_.activation == Activation::swiglu;
  Tensor g = find("gate.weight").load("gate.weight", gate_weight_.shape(), DType::f32);
  std::memcpy(gate_weight_.data(), g.data(), g.nbytes());
  const int me = group_->rank();
  for (int slot = 0; slot < layout_.slots(me); ++slot) {
    const int e = layout_.expert_at(me, slot);
    if (e < 0) continue;  // an unused slot
    auto load = [&](const char* name, const Shape& shape) {
      const std::string key = expert_key(e, name);
      return find(key).load(key, shape, DType::f32);
    };
    Tensor w1 = load("w1", {M, H1}), b1 = load("b1", {H1}), w2 = load("w2", {H, M}), b2 = load("b2", {M});
    copy_hidden_piece(gated, M, H, shard, S, w1.data_as<float>(), params_.w1.data_as<float>() + slot * M * H1s, true);
    copy_hidden_piece(gated, 1, H, shard, S, b1.data_as<float>(), params_.b1.data_as<float>() + slot * H1s, true);
    std::memcpy(params_.w2.data_as<float>() + slot * Hs * M, w2.data_as<float>() + shard * Hs * M,
                static_cast<size_t>(Hs * M) * sizeof(float));
    std::memcpy(params_.b2.data_as<float>() + slot * M, b2.data(), b2.nbytes());
  }
  group_->barrier().wait();
}

}  // namespace switchyard
