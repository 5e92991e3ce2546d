#include "model/layer_schedule.h"

#include <algorithm>
#include <numeric>
#include <sstream>

#include "core/error.h"

namespace switchyard {

const char* attention_mode_name(AttentionMode mode) {
  switch (mode) {
    case AttentionMode::replicated: return "replicated";
    case AttentionMode::dp: return "dp";
    case AttentionMode::tp: return "tp";
  }
  return "?";
}

namespace {
std::vector<int> all_ranks(int world) {
  std::vector<int> r(static_cast<size_t>(world));
  std::iota(r.begin(), r.end(), 0);
  return r;
}

LayerSchedule checked(int layers, int world) {
  if (layers < 1) SY_THROW(InvalidArgument, "layer schedule: ", layers, " layers, expected >= 1");
  if (world < 1) SY_THROW(InvalidArgument, "layer schedule: world of ", world, " ranks, expected >= 1");
  return {};
}
}  // namespace

LayerSchedule LayerSchedule::replicated(int layers, int world) {
  LayerSchedule s = checked(layers, world);
  s.mode_ = AttentionMode::replicated;
  s.world_ = world;
  s.groups_ = 1;
  for (int l = 0; l < layers; ++l) s.layers_.push_back({l, AttentionMode::replicated, all_ranks(world), all_ranks(world)});
  return s;
}

LayerSchedule LayerSchedule::data_parallel(int layers, int world) {
  LayerSchedule s = replicated(layers, world);
  s.mode_ = AttentionMode::dp;
  s.groups_ = world;
  for (LayerAssignment& a : s.layers_) a.attention = AttentionMode::dp;
  return s;
}

LayerSchedule LayerSchedule::tensor_parallel(int layers, int world, int tp) {
  if (tp < 1 || world % tp != 0)
    SY_THROW(InvalidArgument, "layer schedule: tensor-parallel groups of ", tp, " ranks do not divide the world of ",
             world, " ranks");
  LayerSchedule s = replicated(layers, world);
  s.mode_ = AttentionMode::tp;
  s.groups_ = world / tp;
  s.tp_ = tp;
  for (LayerAssignment& a : s.layers_) a.attention = AttentionMode::tp;
  return s;
}

LayerSchedule LayerSchedule::layer_parallel(int layers, int world, int n, const std::string& field) {
  if (n < 1 || n > world)
    SY_THROW(ConfigError, field, " = ", n, ": layer-parallel groups of ", n, " layers need as many ranks; expected 1..",
             world, " (the ranks of the draft)");
  LayerSchedule s = replicated(layers, world);
  s.layer_groups_.push_back({0});
  for (int l = 1; l < layers - 1; l += n) {
    std::vector<int> group;
    for (int j = l; j < std::min(l + n, layers - 1); ++j) group.push_back(j);
    s.layer_groups_.push_back(group);
  }
  if (layers > 1) s.layer_groups_.push_back({layers - 1});
  return s;
}

RoleSplit RoleSplit::of(std::vector<int> attention, std::vector<int> ffn, int world, const std::string& field) {
  if (attention.empty() || ffn.empty())
    SY_THROW(ConfigError, field, ": ", attention.size(), " attention and ", ffn.size(), " FFN rank(s); expected at "
             "least one of each");
  std::vector<int> seen(static_cast<size_t>(std::max(world, 0)), 0);
  for (const std::vector<int>* side : {&attention, &ffn})
    for (int r : *side) {
      if (r < 0 || r >= world)
        SY_THROW(ConfigError, field, ": rank ", r, " is outside the world of ", world, " rank(s) (expected 0..",
                 world - 1, ")");
      if (seen[static_cast<size_t>(r)]++)
        SY_THROW(ConfigError, field, ": rank ", r, " is given two roles (expected each rank once)");
    }
  for (int r = 0; r < world; ++r)
    if (!seen[static_cast<size_t>(r)])
      SY_THROW(ConfigError, field, ": rank ", r, " of the world of ", world, " has no role (", attention.size(),
               " attention + ", ffn.size(), " FFN rank(s); expected them to add up to the world)");
  std::sort(attention.begin(), attention.end());
  std::sort(ffn.begin(), ffn.end());
  return {std::move(attention), std::move(ffn)};
}

namespace {
// A whole non-negative decimal number, or -1.
int whole_number(const std::string& text) {
  size_t used = 0;
  int v = -1;
  try {
    v = std::stoi(text, &used);
  } catch (const std::exception&) {
    return -1;
  }
  return text.empty() || used != text.size() || v < 0 ? -1 : v;
}
}  // namespace

RoleSplit RoleSplit::parse(const std::string& spec, int world, const std::string& field) {
  const size_t colon = spec.find(':');
  auto number = [&](const std::string& part) {
    const int v = whole_number(part);
    if (v < 1)
      SY_THROW(ConfigError, field, " = '", spec, "': expected A:F, attention ranks A and FFN ranks F, each >= 1 "
               "(e.g. 2:2)");
    return v;
  };
  if (colon == std::string::npos) number("");
  // Rank lists, "[0,2]:[1,3]": which ranks take which role (any order, brackets optional when a side has a comma).
  if (spec.find_first_of("[,") != std::string::npos) {
    auto ranks = [&](std::string part) {
      if (part.size() >= 2 && part.front() == '[' && part.back() == ']') part = part.substr(1, part.size() - 2);
      std::vector<int> out;
      for (size_t at = 0; at <= part.size();) {
        const size_t comma = std::min(part.find(',', at), part.size());
        const std::string item = part.substr(at, comma - at);
        if (whole_number(item) < 0)
          SY_THROW(ConfigError, field, " = '", spec, "': '", item, "' is not a rank; expected rank lists such as "
                   "[0,2]:[1,3] (attention ranks, then FFN ranks)");
        out.push_back(whole_number(item));
        at = comma + 1;
      }
      return out;
    };
    return of(ranks(spec.substr(0, colon)), ranks(spec.substr(colon + 1)), world, field);
  }
  const int a = number(spec.substr(0, colon)), f = number(spec.substr(colon + 1));
  if (a + f != world)
    SY_THROW(ConfigError, field, " = '", spec, "': ", a, " attention + ", f, " FFN ranks = ", a + f,
             ", but the world has ", world, " rank(s) (expected A + F = ", world, ")");
  std::vector<int> attention(static_cast<size_t>(a)), ffn(static_cast<size_t>(f));
  std::iota(attention.begin(), attention.end(), 0);
  std::iota(ffn.begin(), ffn.end(), a);
  return of(std::move(attention), std::move(ffn), world, field);
}

bool RoleSplit::is_attention(int rank) const { return std::binary_search(attention.begin(), attention.end(), rank); }
bool RoleSplit::is_ffn(int rank) const { return std::binary_search(ffn.begin(), ffn.end(), rank); }

int RoleSplit::attention_index(int rank) const {
  const auto it = std::lower_bound(attention.begin(), attention.end(), rank);
  return it != attention.end() && *it == rank ? static_cast<int>(it - attention.begin()) : -1;
}

std::string RoleSplit::name() const { return std::to_string(attention.size()) + "A" + std::to_string(ffn.size()) + "F"; }

LayerSchedule LayerSchedule::disaggregated(int layers, const RoleSplit& roles) {
  const int world = static_cast<int>(roles.attention.size() + roles.ffn.size());
  LayerSchedule s = checked(layers, world);
  RoleSplit::of(roles.attention, roles.ffn, world);  // validated whatever built it
  s.mode_ = AttentionMode::dp;
  s.world_ = world;
  s.groups_ = static_cast<int>(roles.attention.size());
  s.roles_ = roles;
  for (int l = 0; l < layers; ++l) s.layers_.push_back({l, AttentionMode::dp, roles.attention, roles.ffn});
  return s;
}

LayerSchedule LayerSchedule::make(const ScheduleOptions& o, int layers, int world) {
  if (!o.afd.empty()) {
    if (o.attention != "replicated" && o.attention != "dp")
      SY_THROW(ConfigError, o.attention_field, " = ", o.attention, " with ", o.afd_field, " = ", o.afd,
               "; expected dp (the attention ranks of a disaggregated deployment run data-parallel attention)");
    if (o.tp != 1)
      SY_THROW(ConfigError, o.tp_field, " = ", o.tp, " with ", o.afd_field, " = ", o.afd, "; expected 1");
    return disaggregated(layers, RoleSplit::parse(o.afd, world, o.afd_field));
  }
  if (o.tp < 1) SY_THROW(ConfigError, o.tp_field, " = ", o.tp, ", expected >= 1");
  if (o.attention == "replicated" || o.attention == "dp") {
    if (o.tp != 1)
      SY_THROW(ConfigError, o.tp_field, " = ", o.tp, " with ", o.attention_field, " = ", o.attention,
               "; expected 1 (tensor-parallel groups need ", o.attention_field, " = tp)");
    return o.attention == "dp" ? data_parallel(layers, world) : replicated(layers, world);
  }
  if (o.attention == "tp") {
    if (world % o.tp != 0)
      SY_THROW(ConfigError, o.tp_field, " = ", o.tp, " does not divide the ", world, " ranks; expected a divisor "
               "(tensor-parallel groups of ", o.tp_field, " ranks, data-parallel across them)");
    return tensor_parallel(layers, world, o.tp);
  }
  SY_THROW(ConfigError, o.attention_field, " = '", o.attention, "', expected replicated, dp or tp");
}

int LayerSchedule::token_group_of(int rank) const {
  if (rank < 0 || rank >= world_) SY_THROW(InvalidArgument, "layer schedule: rank ", rank, ", expected 0..", world_ - 1);
  switch (mode_) {
    case AttentionMode::replicated: return 0;
    case AttentionMode::dp: return roles_ ? roles_->attention_index(rank) : rank;
    case AttentionMode::tp: return rank / tp_;
  }
  return 0;
}

int LayerSchedule::group_leader(int group) const {
  if (group < 0 || group >= groups_)
    SY_THROW(InvalidArgument, "layer schedule: token group ", group, ", expected 0..", groups_ - 1);
  if (roles_) return roles_->attention[static_cast<size_t>(group)];
  return mode_ == AttentionMode::replicated ? 0 : group * tp_;  // dp: tp_ = 1
}

std::vector<int> LayerSchedule::owned_layers(int rank) const {
  std::vector<int> owned;
  for (const LayerAssignment& a : layers_)
    if (std::find(a.attention_ranks.begin(), a.attention_ranks.end(), rank) != a.attention_ranks.end())
      owned.push_back(a.layer);
  return owned;
}

std::string LayerSchedule::describe() const {
  std::ostringstream out;
  out << layer_count() << " layers on " << world_ << " rank(s): attention " << attention_mode_name(mode_);
  if (mode_ == AttentionMode::dp) out << " (each rank its own sequences and KV)";
  if (mode_ == AttentionMode::replicated && world_ > 1) out << " (every rank the same sequences)";
  if (mode_ == AttentionMode::tp)
    out << " (" << groups_ << " group(s) of " << tp_ << " rank(s), heads split inside a group, each rank the MoE "
        << "layers on its slice of the group's rows)";
  if (!layer_groups_.empty()) {
    out << "; layer-parallel groups";
    for (const auto& g : layer_groups_) {
      out << " [";
      for (size_t i = 0; i < g.size(); ++i) out << (i ? "," : "") << g[i];
      out << "]";
    }
  }
  if (roles_) {
    auto list = [](const std::vector<int>& r) {
      std::string s = r.size() == 1 ? "rank " : "ranks ";
      for (size_t i = 0; i < r.size(); ++i) s += (i ? "," : "") + std::to_string(r[i]);
      return s;
    };
    out << " on attention " << list(roles_->attention) << ", experts on FFN " << list(roles_->ffn)
        << " (" << roles_->name() << "), " << groups_ << " token group(s)";
    return out.str();
  }
  out << ", experts over all " << world_ << " rank(s), " << groups_ << " token group(s)";
  return out.str();
}

}  // namespace switchyard
