#include "moe/router.h"

#include <cstring>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "core/logging.h"
#include "kernels/router.h"

namespace switchyard {

void RouterConfig::validate() const {
  auto bad = [](const char* field, auto value, const char* expected) {
    SY_THROW(InvalidArgument, "router: ", field, " = ", value, ", expected ", expected);
  };
  if (experts < 1) bad("experts", experts, ">= 1");
  if (k < 1 || k > experts) SY_THROW(InvalidArgument, "router: k = ", k, ", expected 1..experts (", experts, ")");
  if (groups < 1 || experts % groups != 0)
    SY_THROW(InvalidArgument, "router: groups = ", groups, ", expected a divisor of experts (", experts, ")");
  if (topk_groups < 1 || topk_groups > groups)
    SY_THROW(InvalidArgument, "router: topk_groups = ", topk_groups, ", expected 1..groups (", groups, ")");
  if (topk_groups * (experts / groups) < k)
    SY_THROW(InvalidArgument, "router: topk_groups = ", topk_groups, " groups of ", experts / groups,
             " experts cannot hold k = ", k, " choices");
  if (!(noise_std >= 0.0)) bad("noise_std", noise_std, ">= 0");
  if (!(std::fabs(capacity_factor) <= 1e6)) bad("capacity_factor", capacity_factor, "a number in [-1e6, 1e6]");
  if (k == 1 && renormalize) {
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true))
      SY_LOG_WARN("moe", "router: renormalize with k = 1 makes every weight 1, so the gate learns nothing from the "
                  "task loss (only from the balance loss); Tutel normalises only when k > 1");
  }
  if (capacity_alignment < 1) bad("capacity_alignment", capacity_alignment, ">= 1");
}

Routing route(const RouterConfig& config, const TensorView& logits, const TensorView* bias, Rng* noise) {
  config.validate();
  if (logits.dtype() != DType::f32 || logits.dim() != 2 || !logits.device().is_cpu() || !logits.is_contiguous())
    SY_THROW(InvalidArgument, "router: logits are ", dtype_name(logits.dtype()), " ", shape_string(logits.shape()),
             ", expected contiguous host f32 [tokens, ", config.experts, "]");
  if (logits.size(1) != config.experts)
    SY_THROW(InvalidArgument, "router: logits have ", logits.size(1), " columns, expected experts = ", config.experts);
  const bool has_bias = bias && bias->numel() > 0;
  if (has_bias && (bias->dtype() != DType::f32 || bias->numel() != config.experts || !bias->is_contiguous()))
    SY_THROW(InvalidArgument, "router: bias is ", dtype_name(bias->dtype()), " ", shape_string(bias->shape()),
             ", expected f32 [", config.experts, "]");
  if (has_bias && config.gate != GateKind::sigmoid_bias)
    SY_THROW(InvalidArgument, "router: a bias is only used by the sigmoid_bias gate");
  if (config.noise_std > 0 && !noise) SY_THROW(InvalidArgument, "router: noise_std > 0 needs an Rng");

  const int64_t T = logits.size(0);
  const int E = config.experts, k = config.k;
  const float* raw = static_cast<const float*>(logits.data());
  const float* x = raw;
  Tensor noisy;
  if (config.noise_std > 0 && T > 0) {
    noisy = Tensor::empty({T, E}, DType::f32);
    float* y = noisy.data_as<float>();
    for (int64_t i = 0; i < T * E; ++i) y[i] = x[i] + static_cast<float>(noise->normal(0.0, config.noise_std));
    x = y;
  }

  Routing r;
  r.experts = Tensor::empty({T, k}, DType::i32);
  r.weights = Tensor::empty({T, k}, DType::f32);
  r.scores = Tensor::empty({T, E}, DType::f32);
  kernels::TopKGateArgs args;
  args.logits = x;
  args.bias = has_bias ? static_cast<const float*>(bias->data()) : nullptr;
  args.tokens = T;
  args.experts = E;
  args.k = k;
  args.score = config.gate == GateKind::softmax ? kernels::GateScore::softmax : kernels::GateScore::sigmoid_bias;
  args.renormalize = config.renormalize;
  args.groups = config.groups;
  args.topk_groups = config.topk_groups;
  args.experts_out = r.experts.data_as<int32_t>();
  args.weights_out = r.weights.data_as<float>();
  args.scores_out = r.scores.data_as<float>();
  kernels::cpu::topk_gate(args);

  r.expert_load.assign(static_cast<size_t>(E), 0);
  const int32_t* chosen = r.experts.data_as<int32_t>();
  for (int64_t i = 0; i < T * k; ++i) ++r.expert_load[static_cast<size_t>(chosen[i])];
  r.balance_fraction.assign(static_cast<size_t>(E), 0.0);
  if (T == 0) return r;
  if (config.balance_loss == BalanceLoss::top1)
    for (int64_t t = 0; t < T; ++t) r.balance_fraction[static_cast<size_t>(chosen[t * k])] += 1.0 / static_cast<double>(T);
  else
    for (int e = 0; e < E; ++e)
      r.balance_fraction[static_cast<size_t>(e)] = static_cast<double>(r.expert_load[e]) / static_cast<double>(T * k);

  // Losses in double: they are reported and compared, never on the hot path.
  std::vector<double> mean_score(static_cast<size_t>(E), 0.0);
  double z = 0.0;
  const float* s = r.scores.data_as<float>();
  for (int64_t t = 0; t < T; ++t) {
    double row_sum = 0.0, m = -INFINITY;
    // z-loss on the logits as given (noise only steers the choice).
    for (int e = 0; e < E; ++e) row_sum += s[t * E + e], m = std::max(m, static_cast<double>(raw[t * E + e]));
    for (int e = 0; e < E; ++e) mean_score[e] += s[t * E + e] / row_sum;
    double lse = 0.0;
    for (int e = 0; e < E; ++e) lse += std::exp(raw[t * E + e] - m);
    lse = m + std::log(lse);
    z += lse * lse;
  }
  double balance = 0.0;
  for (int e = 0; e < E; ++e) balance += r.balance_fraction[static_cast<size_t>(e)] * (mean_score[e] / T);
  r.balance_loss = E * balance;
  r.z_loss = z / static_cast<double>(T);
  return r;
}

Routing replayed_routing(const RouterConfig& config, const TensorView& experts, const TensorView& weights) {
  const int E = config.experts, k = config.k;
  if (experts.dtype() != DType::i32 || experts.dim() != 2 || experts.size(1) != k || !experts.is_contiguous() ||
      weights.dtype() != DType::f32 || weights.shape() != experts.shape() || !weights.is_contiguous())
    SY_THROW(InvalidArgument, "router: replayed choices are ", dtype_name(experts.dtype()), " ",
             shape_string(experts.shape()), " and weights ", dtype_name(weights.dtype()), " ",
             shape_string(weights.shape()), ", expected i32 and f32 [tokens, k = ", k, "]");
  const int64_t T = experts.size(0);
  Routing r;
  r.experts = Tensor::empty({T, k}, DType::i32);
  r.weights = Tensor::empty({T, k}, DType::f32);
  r.scores = Tensor::zeros({T, E}, DType::f32);
  std::memcpy(r.experts.data(), experts.data(), static_cast<size_t>(T * k) * sizeof(int32_t));
  std::memcpy(r.weights.data(), weights.data(), static_cast<size_t>(T * k) * sizeof(float));
  const int32_t* chosen = r.experts.data_as<int32_t>();
  const float* w = r.weights.data_as<float>();
  r.expert_load.assign(static_cast<size_t>(E), 0);
  r.balance_fraction.assign(static_cast<size_t>(E), 0.0);
  for (int64_t i = 0; i < T * k; ++i) {
    if (chosen[i] < 0 || chosen[i] >= E)
      SY_THROW(InvalidArgument, "router: replayed choice [", i / k, ", ", i % k, "] = ", chosen[i], ", expected 0..", E - 1);
    if (!std::isfinite(w[i]))
      SY_THROW(InvalidArgument, "router: replayed weight [", i / k, ", ", i % k, "] = ", w[i], ", expected finite");
    for (int64_t j = i - i % k; j < i; ++j)
      if (chosen[j] == chosen[i])
        SY_THROW(InvalidArgument, "router: replayed token ", i / k, " chooses expert ", chosen[i], " twice");
    ++r.expert_load[static_cast<size_t>(chosen[i])];
    r.scores.data_as<float>()[(i / k) * E + chosen[i]] = w[i];
  }
  for (int e = 0; e < E && T > 0; ++e)
    r.balance_fraction[static_cast<size_t>(e)] = static_cast<double>(r.expert_load[static_cast<size_t>(e)]) / static_cast<double>(T * k);
  return r;
}

int64_t capacity_by_factor(const RouterConfig& config, int64_t tokens) {
  const double cf = std::fabs(config.capacity_factor);
  const int64_t E = config.experts;
  if (config.capacity_rounding == CapacityRounding::tutel)
    return config.k * static_cast<int64_t>(std::floor(cf * static_cast<double>((tokens + E - 1) / E)));
  return config.k * static_cast<int64_t>(std::ceil(cf * static_cast<double>(tokens) / static_cast<double>(E)));
}

CapacityRounding parse_capacity_rounding(const std::string& name, const std::string& field) {
  if (name == "switchyard") return CapacityRounding::switchyard;
  if (name == "tutel") return CapacityRounding::tutel;
  SY_THROW(ConfigError, field, " = '", name, "', expected switchyard (k*ceil(cf*T/E)) or tutel (k*floor(cf*ceil(T/E)))");
}

BalanceLoss parse_balance_loss(const std::string& name, const std::string& field) {
  if (name == "all_choices") return BalanceLoss::all_choices;
  if (name == "top1") return BalanceLoss::top1;
  SY_THROW(ConfigError, field, " = '", name, "', expected all_choices or top1");
}

int64_t expert_capacity(const RouterConfig& config, int64_t tokens, const Routing& routing, Communicator* expert_group) {
  config.validate();
  const double cf = config.capacity_factor;
  const int64_t by_factor = capacity_by_factor(config, tokens);
  const int64_t largest_load =
      routing.expert_load.empty() ? 0 : *std::max_element(routing.expert_load.begin(), routing.expert_load.end());
  int64_t c = cf > 0 ? by_factor : cf == 0 ? largest_load : std::min(largest_load, by_factor);
  const int64_t a = config.capacity_alignment;
  c = (c + a - 1) / a * a;
  if (expert_group && expert_group->size() > 1) {
    Tensor v = Tensor::empty({1}, DType::i64);
    v.data_as<int64_t>()[0] = c;
    ReduceOptions max;
    max.op = ReduceOp::max;
    expert_group->allreduce(v, v, max).wait();
    c = v.data_as<int64_t>()[0];
  }
  return c;
}

}  // namespace switchyard

namespace switchyard {

Tensor gate_backward(const RouterConfig& config, const Routing& routing, const TensorView& logits,
                     const std::vector<double>& d_weight_of_choice, double balance_coef, double z_coef) {
  const int64_t T = logits.size(0);
  const int E = config.experts;
  const int k = T ? static_cast<int>(routing.experts.shape()[1]) : config.k;
  SY_CHECK_EQ(d_weight_of_choice.size(), static_cast<size_t>(T * k), "gate backward: d_weight per choice");
  Tensor d_logits = Tensor::zeros({T, E}, DType::f32);
  if (T == 0) return d_logits;
  const float* s = routing.scores.data_as<float>();
  const float* raw = static_cast<const float*>(logits.data());
  const int32_t* chosen = routing.experts.data_as<int32_t>();
  const float* weight = routing.weights.data_as<float>();
  std::vector<double> ds(static_cast<size_t>(E)), gbal(static_cast<size_t>(E));
  if (balance_coef != 0.0)
    SY_CHECK_EQ(routing.balance_fraction.size(), static_cast<size_t>(E), "balance fractions of the routing");
  for (int64_t t = 0; t < T; ++t) {
    std::fill(ds.begin(), ds.end(), 0.0);
    double chosen_sum = 0.0, dot = 0.0;
    for (int j = 0; j < k; ++j) {
      const double dw = d_weight_of_choice[static_cast<size_t>(t * k + j)];
      chosen_sum += s[t * E + chosen[t * k + j]];
      dot += dw * weight[t * k + j];
      ds[chosen[t * k + j]] += dw;
    }
    if (config.renormalize)  // w_j = s_j / sum_chosen s
      for (int j = 0; j < k; ++j) {
        const int e = chosen[t * k + j];
        ds[e] = (ds[e] - dot) / chosen_sum;
      }
    if (balance_coef != 0.0) {
      // balance = E * sum_e f_e * mean_t(s_te / sum_e s_te); f_e (a count) has no gradient.
      double row_sum = 0.0, gs = 0.0;
      for (int e = 0; e < E; ++e) row_sum += s[t * E + e];
      for (int e = 0; e < E; ++e) {
        const double f = routing.balance_fraction[static_cast<size_t>(e)];
        gbal[e] = balance_coef * E * f / static_cast<double>(T);
        gs += gbal[e] * s[t * E + e] / row_sum;
      }
      for (int e = 0; e < E; ++e) ds[e] += (gbal[e] - gs) / row_sum;
    }
    float* dl = d_logits.data_as<float>() + t * E;
    if (config.gate == GateKind::softmax) {
      double sds = 0.0;
      for (int e = 0; e < E; ++e) sds += s[t * E + e] * ds[e];
      for (int e = 0; e < E; ++e) dl[e] = static_cast<float>(s[t * E + e] * (ds[e] - sds));
    } else {
      for (int e = 0; e < E; ++e) dl[e] = static_cast<float>(ds[e] * s[t * E + e] * (1.0 - s[t * E + e]));
    }
    if (z_coef != 0.0) {  // z = mean_t lse_t^2 on the raw logits
      double m = -INFINITY, sum = 0.0;
      for (int e = 0; e < E; ++e) m = std::max(m, static_cast<double>(raw[t * E + e]));
      for (int e = 0; e < E; ++e) sum += std::exp(raw[t * E + e] - m);
      const double lse = m + std::log(sum);
      for (int e = 0; e < E; ++e)
        dl[e] += static_cast<float>(z_coef * 2.0 * lse * std::exp(raw[t * E + e] - lse) / static_cast<double>(T));
    }
  }
  return d_logits;
}

}  // namespace switchyard
