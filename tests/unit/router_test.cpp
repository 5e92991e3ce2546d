// Router gates, losses and capacity against a float64 reference written here
// independently of the kernel, on fresh random logits, odd sizes and empty batches.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "comm/backends/threads/threads_backend.h"
#include "moe/router.h"

namespace switchyard {
namespace {

struct Reference {
  std::vector<std::vector<int>> experts;
  std::vector<std::vector<double>> weights;
  std::vector<std::vector<double>> scores, select;
  double balance = 0, z = 0;
};

Reference reference_route(const RouterConfig& c, const std::vector<float>& logits, int64_t T,
                          const std::vector<float>& bias) {
  const int E = c.experts, gsize = E / c.groups;
  Reference ref;
  std::vector<double> load(E, 0), mean(E, 0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> score(E), select(E);
    double m = -INFINITY;
    for (int e = 0; e < E; ++e) m = std::max(m, double(logits[t * E + e]));
    double sum = 0;
    for (int e = 0; e < E; ++e) sum += std::exp(logits[t * E + e] - m);
    double lse = m + std::log(sum);
    ref.z += lse * lse;
    for (int e = 0; e < E; ++e) {
      const double l = logits[t * E + e];
      score[e] = c.gate == GateKind::softmax ? std::exp(l - lse) : 1.0 / (1.0 + std::exp(-l));
      select[e] = score[e] + (bias.empty() ? 0.0 : bias[e]);
    }
    std::vector<int> allowed(E, 1);
    if (c.groups > 1) {
      std::vector<std::pair<double, int>> gs;
      for (int g = 0; g < c.groups; ++g) {
        std::vector<double> v(select.begin() + g * gsize, select.begin() + (g + 1) * gsize);
        std::sort(v.rbegin(), v.rend());
        gs.push_back({-(v[0] + (gsize > 1 ? v[1] : 0.0)), g});
      }
      std::sort(gs.begin(), gs.end());
      std::fill(allowed.begin(), allowed.end(), 0);
      for (int j = 0; j < c.topk_groups; ++j)
        for (int e = 0; e < gsize; ++e) allowed[gs[j].second * gsize + e] = 1;
    }
    std::vector<std::pair<double, int>> order;
    for (int e = 0; e < E; ++e)
      if (allowed[e]) order.push_back({-select[e], e});
    std::sort(order.begin(), order.end());
    std::vector<int> chosen;
    std::vector<double> w;
    for (int j = 0; j < c.k; ++j) chosen.push_back(order[j].second), w.push_back(score[order[j].second]);
    if (c.renormalize) {
      const double total = std::accumulate(w.begin(), w.end(), 0.0);
      for (double& x : w) x /= total;
    }
    const double row = std::accumulate(score.begin(), score.end(), 0.0);
    for (int e = 0; e < E; ++e) mean[e] += score[e] / row / T;
    if (c.balance_loss == BalanceLoss::top1)
      load[chosen[0]] += 1.0 / double(T);  // GShard: the share of tokens whose first choice is e
    else
      for (int e : chosen) load[e] += 1.0 / double(T * c.k);
    ref.experts.push_back(chosen), ref.weights.push_back(w), ref.scores.push_back(score), ref.select.push_back(select);
  }
  for (int e = 0; e < E; ++e) ref.balance += E * load[e] * mean[e];
  if (T) ref.z /= T;
  return ref;
}

void check_against_reference(const RouterConfig& c, int64_t T, Rng& rng, bool with_bias) {
  const int E = c.experts;
  Tensor logits = Tensor::empty({T, E}, DType::f32);
  rng.fill_normal(logits, 0.0, 2.0);
  std::vector<float> lv(logits.data_as<float>(), logits.data_as<float>() + T * E), bv;
  Tensor bias = Tensor::empty({with_bias ? E : 0}, DType::f32);
  if (with_bias) {
    rng.fill_uniform(bias, -0.3, 0.3);
    bv.assign(bias.data_as<float>(), bias.data_as<float>() + E);
  }
  TensorView bias_view = bias.view();
  Routing r = route(c, logits, with_bias ? &bias_view : nullptr);
  Reference ref = reference_route(c, lv, T, bv);
  const std::string what = "E=" + std::to_string(E) + " k=" + std::to_string(c.k) + " T=" + std::to_string(T);
  for (int64_t t = 0; t < T; ++t) {
    for (int j = 0; j < c.k; ++j) {
      const int got = r.experts.data_as<int32_t>()[t * c.k + j], want = ref.experts[t][j];
      // fp32 may order two choices the float64 reference separates by less than rounding.
      if (got != want)
        ASSERT_NEAR(ref.select[t][got], ref.select[t][want], 1e-6) << what << " token " << t << " choice " << j;
      else
        ASSERT_NEAR(r.weights.data_as<float>()[t * c.k + j], ref.weights[t][j], 2e-6) << what;
    }
    for (int e = 0; e < E; ++e) ASSERT_NEAR(r.scores.data_as<float>()[t * E + e], ref.scores[t][e], 2e-6) << what;
  }
  EXPECT_NEAR(r.balance_loss, ref.balance, 1e-5 * std::max(1.0, ref.balance)) << what;
  EXPECT_NEAR(r.z_loss, ref.z, 1e-5 * std::max(1.0, ref.z)) << what;
  EXPECT_EQ(std::accumulate(r.expert_load.begin(), r.expert_load.end(), int64_t{0}), T * c.k) << what;
}

TEST(Router, SoftmaxTopKMatchesFloat64ReferenceOverSizes) {
  Rng rng(fresh_seed());
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  for (int E : {1, 4, 7, 64})
    for (int k : {1, 2, 8})
      for (bool renorm : {false, true})
        for (int64_t T : {0, 1, 37, 513}) {
          if (k > E) continue;
          RouterConfig c;
          c.experts = E, c.k = k, c.renormalize = renorm;
          check_against_reference(c, T, rng, false);
          c.balance_loss = BalanceLoss::top1;
          check_against_reference(c, T, rng, false);
        }
}

// Slots per expert, worked by hand from each rule's definition.
TEST(Router, CapacityRoundingSwitchyardAndTutel) {
  RouterConfig c;
  c.experts = 8, c.k = 2;
  auto slots = [&](CapacityRounding rounding, double cf, int64_t T) {
    c.capacity_rounding = rounding, c.capacity_factor = cf;
    return capacity_by_factor(c, T);
  };
  // T = 64, cf = 1.3: switchyard 2 * ceil(1.3 * 64 / 8) = 2 * ceil(10.4) = 22; tutel 2 * floor(1.3 * 8) = 20.
  EXPECT_EQ(slots(CapacityRounding::switchyard, 1.3, 64), 22);
  EXPECT_EQ(slots(CapacityRounding::tutel, 1.3, 64), 20);
  // T = 100, cf = 0.7: ceil(T / E) = 13 first under tutel: 2 * floor(9.1) = 18; switchyard 2 * ceil(8.75) = 18.
  EXPECT_EQ(slots(CapacityRounding::tutel, 0.7, 100), 18);
  EXPECT_EQ(slots(CapacityRounding::switchyard, 0.7, 100), 18);
  // T = 9, cf = 0.5: tutel 2 * floor(0.5 * 2) = 2; switchyard 2 * ceil(0.5625) = 2.
  EXPECT_EQ(slots(CapacityRounding::tutel, 0.5, 9), 2);
  // T = 17, cf = 1.0: tutel 2 * floor(3) = 6; switchyard 2 * ceil(2.125) = 6; cf = 0.9: tutel 2 * floor(2.7) = 4, switchyard 2 * ceil(1.9125) = 4.
  EXPECT_EQ(slots(CapacityRounding::tutel, 0.9, 17), 4);
  EXPECT_EQ(slots(CapacityRounding::switchyard, 1.2, 17), 2 * 3);  // ceil(2.55) = 3
  EXPECT_EQ(slots(CapacityRounding::tutel, 1.2, 17), 2 * 3);       // floor(3.6) = 3
  EXPECT_EQ(slots(CapacityRounding::tutel, 1.2, 0), 0);
  // A negative factor caps dropless by the same rule; the capacity all-reduce is the group's max.
  c.capacity_rounding = CapacityRounding::tutel, c.capacity_factor = -1.3;
  Routing r;
  r.expert_load = {40, 1, 1, 1, 1, 1, 1, 18};
  EXPECT_EQ(expert_capacity(c, 64, r), 20);
  EXPECT_THROW(parse_capacity_rounding("gshard", "--capacity_rounding"), ConfigError);
  c.capacity_factor = 1e308;
  EXPECT_THROW(c.validate(), InvalidArgument);
}

TEST(Router, SigmoidWithBiasAndGroupedTopK) {
  Rng rng(fresh_seed());
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  for (int64_t T : {0, 1, 129}) {
    RouterConfig c;
    c.experts = 64, c.k = 6, c.gate = GateKind::sigmoid_bias, c.renormalize = true;
    check_against_reference(c, T, rng, true);
    c.groups = 8, c.topk_groups = 3;
    check_against_reference(c, T, rng, true);
    c.gate = GateKind::softmax;
    check_against_reference(c, T, rng, false);
  }
}

TEST(Router, GroupedTopKNeverLeavesTheChosenGroups) {
  Rng rng(fresh_seed());
  RouterConfig c;
  c.experts = 32, c.k = 4, c.groups = 8, c.topk_groups = 2;
  Tensor logits = Tensor::empty({200, 32}, DType::f32);
  rng.fill_normal(logits, 0, 1);
  Routing r = route(c, logits);
  for (int64_t t = 0; t < 200; ++t) {
    std::vector<int> groups;
    for (int j = 0; j < 4; ++j) groups.push_back(r.experts.data_as<int32_t>()[t * 4 + j] / 4);
    std::sort(groups.begin(), groups.end());
    EXPECT_LE(std::unique(groups.begin(), groups.end()) - groups.begin(), 2) << "token " << t;
  }
}

TEST(Router, NoiseChangesChoicesReproduciblyAndTiesGoToTheLowerExpert) {
  RouterConfig c;
  c.experts = 8, c.k = 2;
  Tensor flat = Tensor::zeros({3, 8}, DType::f32);  // all tied
  Routing tied = route(c, flat);
  for (int t = 0; t < 3; ++t) {
    EXPECT_EQ(tied.experts.data_as<int32_t>()[t * 2], 0);
    EXPECT_EQ(tied.experts.data_as<int32_t>()[t * 2 + 1], 1);
    EXPECT_FLOAT_EQ(tied.weights.data_as<float>()[t * 2], 0.125f);
  }
  c.noise_std = 1.0;
  Rng a(7), b(7);
  Routing na = route(c, flat, nullptr, &a), nb = route(c, flat, nullptr, &b);
  EXPECT_EQ(std::memcmp(na.experts.data(), nb.experts.data(), na.experts.nbytes()), 0);
  bool moved = false;  // noise breaks the ties: some token no longer picks (0, 1)
  for (int t = 0; t < 3; ++t)
    moved |= na.experts.data_as<int32_t>()[t * 2] != 0 || na.experts.data_as<int32_t>()[t * 2 + 1] != 1;
  EXPECT_TRUE(moved);
  EXPECT_THROW(route(c, flat), InvalidArgument);  // noise needs an Rng
}

TEST(Router, BadConfigsAndInputsNameTheField) {
  auto message_of = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    return "no error";
  };
  Tensor logits = Tensor::zeros({4, 8}, DType::f32);
  RouterConfig c;
  c.experts = 8, c.k = 9;
  EXPECT_NE(message_of([&] { route(c, logits); }).find("k = 9, expected 1..experts (8)"), std::string::npos);
  c.k = 2, c.groups = 3;
  EXPECT_NE(message_of([&] { route(c, logits); }).find("groups = 3, expected a divisor of experts (8)"),
            std::string::npos);
  c.groups = 4, c.topk_groups = 5;
  EXPECT_NE(message_of([&] { route(c, logits); }).find("topk_groups = 5"), std::string::npos);
  c.topk_groups = 1, c.k = 3;
  EXPECT_NE(message_of([&] { route(c, logits); }).find("cannot hold k = 3"), std::string::npos);
  c = RouterConfig{};
  c.experts = 6;
  EXPECT_NE(message_of([&] { route(c, logits); }).find("logits have 8 columns, expected experts = 6"),
            std::string::npos);
  Tensor f64 = Tensor::zeros({4, 6}, DType::f64);
  EXPECT_NE(message_of([&] { route(c, f64); }).find("expected contiguous host f32"), std::string::npos);
  c.capacity_alignment = 0;
  EXPECT_NE(message_of([&] { c.validate(); }).find("capacity_alignment = 0"), std::string::npos);
}

TEST(Router, CapacityModesAndAgreementAcrossRanksWithDifferentTokenCounts) {
  RouterConfig c;
  c.experts = 4, c.k = 2;
  Routing r;
  r.expert_load = {5, 0, 9, 2};
  c.capacity_factor = 1.0;
  EXPECT_EQ(expert_capacity(c, 10, r), 2 * 3);  // k * ceil(10/4)
  c.capacity_factor = 1.5;
  c.capacity_alignment = 4;
  EXPECT_EQ(expert_capacity(c, 10, r), 8);      // 2 * ceil(3.75) = 8
  c.capacity_factor = 0;
  c.capacity_alignment = 1;
  EXPECT_EQ(expert_capacity(c, 10, r), 9);      // dropless: the largest load
  c.capacity_factor = -1.0;
  EXPECT_EQ(expert_capacity(c, 10, r), 6);      // capped at k * ceil(10/4)
  c.capacity_factor = -10.0;
  EXPECT_EQ(expert_capacity(c, 10, r), 9);
  EXPECT_EQ(expert_capacity(c, 0, Routing{}), 0);
  // Ranks with 3, 40 and 0 tokens agree on one capacity: the group's maximum.
  run_thread_ranks(3, [](Communicator& comm) {
    RouterConfig rc;
    rc.experts = 4, rc.k = 2, rc.capacity_factor = 1.25;
    const int64_t tokens[] = {3, 40, 0};
    const int64_t T = tokens[comm.rank()];
    Tensor logits = Tensor::zeros({T, 4}, DType::f32);
    Routing routing = route(rc, logits);
    EXPECT_EQ(expert_capacity(rc, T, routing, &comm), 2 * 13);  // 2 * ceil(1.25 * 40 / 4)
    rc.capacity_factor = 0;  // all tied: every token picks experts 0 and 1
    EXPECT_EQ(expert_capacity(rc, T, routing, &comm), 40);
  });
}

}  // namespace
}  // namespace switchyard
