// Speculative MoE's tables, predictor, chunk assignment, expert grouping and
// local-activation counters (moe/affinity.h, moe/expert_grouping.h). The
// expected values are written from the definitions, by hand or by brute force.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>

#include "core/error.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "moe/affinity.h"
#include "moe/expert_grouping.h"
#include "moe/routing_trace.h"

namespace switchyard {
namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + std::to_string(fresh_seed() % 1000000))).string();
}

// Rewrites a safetensors file through `edit(name, tensor)`, which may change a
// tensor in place or return false to leave it out.
template <class Edit>
void rewrite_safetensors(const std::string& path, Edit edit) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  std::vector<Tensor> keep;
  std::vector<std::pair<std::string, TensorView>> tensors;
  keep.reserve(f.entries().size());
  for (const SafetensorsEntry& entry : f.entries()) {
    keep.push_back(f.load(entry.name));
    if (edit(entry.name, keep.back())) tensors.emplace_back(entry.name, keep.back());
  }
  save_safetensors(path, tensors, f.metadata());
}

RoutingTrace make_trace(int layers, int experts, int k) {
  RoutingTrace t;
  t.path = "synthetic", t.model = "synthetic", t.layers = layers, t.experts = experts, t.k = k;
  t.choices.resize(static_cast<size_t>(layers));
  t.weights.resize(static_cast<size_t>(layers));
  return t;
}

// One token: its id, its sequence and per layer its k experts (weights descending 0.6, 0.4, ...).
void add_token(RoutingTrace& t, int id, int sequence, const std::vector<std::vector<int>>& experts) {
  t.positions.push_back(t.tokens.empty() || t.sequences.back() != sequence ? 0 : t.positions.back() + 1);
  t.tokens.push_back(id);
  t.sequences.push_back(sequence);
  for (int l = 0; l < t.layers; ++l)
    for (int j = 0; j < t.k; ++j) {
      t.choices[static_cast<size_t>(l)].push_back(experts[static_cast<size_t>(l)][static_cast<size_t>(j)]);
      t.weights[static_cast<size_t>(l)].push_back(j == 0 ? 0.6f : 0.4f / static_cast<float>(t.k - 1));
    }
}

TEST(Affinity, EqualChunksPutTheRemainderOnTheFirstRanks) {
  EXPECT_EQ(equal_chunks(10, 4), (std::vector<int64_t>{3, 3, 2, 2}));
  EXPECT_EQ(equal_chunks(2, 4), (std::vector<int64_t>{1, 1, 0, 0}));
  EXPECT_EQ(equal_chunks(0, 3), (std::vector<int64_t>{0, 0, 0}));
  EXPECT_EQ(equal_chunks(8, 4), (std::vector<int64_t>{2, 2, 2, 2}));
}

TEST(Affinity, OverflowGoesToEachRowsNextBestRank) {
  // 4 rows, 2 ranks of 2. Rows 0-2 prefer rank 0 (row 2 most sure), row 3 prefers rank 1.
  // Rank 0 fills with the two surest (rows 2 and 0); row 1 overflows to its second choice, rank 1.
  const std::vector<float> votes = {0.8f, 0.2f, 0.6f, 0.4f, 0.9f, 0.1f, 0.3f, 0.7f};
  const std::vector<float> weights(8, 0.0f);
  EXPECT_EQ(assign_to_chunks(votes, weights, 4, 2, {2, 2}), (std::vector<int>{0, 1, 0, 1}));
  // A vote tie is broken by the gate weights, not by the lower rank.
  const std::vector<float> tie_votes = {1.0f, 1.0f}, tie_weights = {0.3f, 0.7f};
  EXPECT_EQ(assign_to_chunks({1, 1, 1, 1}, {0.3f, 0.7f, 0.3f, 0.7f}, 2, 2, {1, 1}), (std::vector<int>{1, 0}));
  EXPECT_EQ(assign_to_chunks(tie_votes, tie_weights, 1, 2, {1, 0}), (std::vector<int>{0}));  // no room on rank 1
}

TEST(Affinity, AssignmentAlwaysFillsTheChunksExactly) {
  Rng rng(fresh_seed());
  for (int trial = 0; trial < 20; ++trial) {
    const int W = 1 + trial % 5;
    const int64_t rows = trial % 7 == 0 ? 0 : 1 + static_cast<int64_t>(trial * 37 % 101);
    Tensor u = Tensor::empty({std::max<int64_t>(1, rows * W)}, DType::f32);
    rng.fill_uniform(u, 0.0, 1.0);
    std::vector<float> votes(u.data_as<float>(), u.data_as<float>() + rows * W), weights(votes.size(), 0.5f);
    // Skewed predictions: every row prefers rank 0 strongly.
    for (int64_t r = 0; r < rows; ++r) votes[static_cast<size_t>(r * W)] += 10.0f;
    const std::vector<int64_t> chunks = equal_chunks(rows, W);
    const std::vector<int> rank = assign_to_chunks(votes, weights, rows, W, chunks);
    std::vector<int64_t> got(static_cast<size_t>(W), 0);
    for (int r : rank) {
      ASSERT_GE(r, 0);
      ASSERT_LT(r, W);
      ++got[static_cast<size_t>(r)];
    }
    EXPECT_EQ(got, chunks) << "W " << W << " rows " << rows;
  }
}

// LAR by hand: 1 layer, E = 4 on W = 2 (experts 0, 1 on rank 0), k = 2, one batch of 4 tokens in chunks 2 + 2.
TEST(Affinity, LocalActivationCountsMatchAHandComputedCase) {
  RoutingTrace t = make_trace(1, 4, 2);
  add_token(t, 9, 0, {{0, 1}});  // in place on rank 0: both local
  add_token(t, 9, 0, {{3, 2}});  // rank 0: both to rank 1
  add_token(t, 7, 0, {{0, 1}});  // rank 1: both to rank 0
  add_token(t, 7, 0, {{0, 2}});  // rank 1: one local, one to rank 0
  const AffinityTables tables = AffinityTables::build(t, 2, AffinityTables::identity_placement(1, 4, 2), 0);
  ShuffleOptions so;
  so.batch_tokens = 4;
  const LocalActivation la = score_local_activation(t, tables, so);
  EXPECT_EQ(la.pairs, 8);
  EXPECT_EQ(la.local, 3);
  EXPECT_DOUBLE_EQ(la.lar(), 3.0 / 8.0);
  EXPECT_EQ(la.remote_rows, 5);
  EXPECT_EQ(la.remote_rows_once, 3);
  EXPECT_EQ(la.rows_to_peer, (std::vector<int64_t>{0, 2, 3, 0}));  // 0 -> 1 twice, 1 -> 0 three times
  // Shuffled by the token table: id 7 chose experts 0, 1, 0, 2 (3 of 4 on rank 0: confidence 0.75), id 9
  // chose 0, 1, 3, 2 (an even split, weights too). The surer ids 7 take rank 0; ids 9 overflow to rank 1.
  so.shuffle = true;
  so.predictor = AffinityPredictor::token;
  const LocalActivation sh = score_local_activation(t, tables, so);
  EXPECT_EQ(sh.pairs, 8);
  EXPECT_EQ(sh.local, 0 + 2 + 2 + 1);
  // Batches smaller than W: one token per batch on W = 2, every token on rank 0 in place.
  so.shuffle = false;
  so.batch_tokens = 1;
  EXPECT_EQ(score_local_activation(t, tables, so).local, 2 + 0 + 2 + 1);
}

// Layer 1's experts follow the rank of layer 0's, not the token id: only the joint (look-back) table can know.
TEST(Affinity, TheLookBackTablePredictsWhatTheTokenIdCannot) {
  RoutingTrace t = make_trace(2, 4, 1);
  Rng rng(fresh_seed());
  Tensor u = Tensor::empty({4000}, DType::f32);
  rng.fill_uniform(u, 0.0, 1.0);
  for (int i = 0; i < 4000; ++i) {
    // Layer 0: a random expert of rank i % 2 (so every batch of 100 fits the chunks exactly).
    const int e0 = 2 * (i % 2) + static_cast<int>(u.data_as<float>()[i] * 2) % 2;
    add_token(t, 5, i / 100, {{e0}, {e0 < 2 ? 3 : 0}});  // layer 1: the other rank's expert
  }
  const AffinityTables tables = AffinityTables::build(t, 2, AffinityTables::identity_placement(2, 4, 2), 1);
  ShuffleOptions so;
  so.shuffle = true;
  so.batch_tokens = 100;
  so.predictor = AffinityPredictor::joint;
  const LocalActivation joint = score_local_activation(t, tables, so);
  EXPECT_DOUBLE_EQ(joint.per_layer[1], 1.0);
  EXPECT_DOUBLE_EQ(joint.predicted_share, 1.0);  // every row of layer 1 (layer 0 has no look-back) had a key
  so.predictor = AffinityPredictor::sequence;
  EXPECT_DOUBLE_EQ(score_local_activation(t, tables, so).per_layer[1], 1.0);
  so.predictor = AffinityPredictor::token;
  const LocalActivation token = score_local_activation(t, tables, so);
  EXPECT_DOUBLE_EQ(token.per_layer[1], 0.5);  // a token id that goes everywhere: no better than in place
}

TEST(Affinity, TablesRoundTripThroughSafetensors) {
  RoutingTrace t = make_trace(3, 4, 2);
  Rng rng(fresh_seed());
  Tensor u = Tensor::empty({3000}, DType::f32);
  rng.fill_uniform(u, 0.0, 1.0);
  for (int i = 0; i < 500; ++i) {
    std::vector<std::vector<int>> e;
    for (int l = 0; l < 3; ++l) {
      const int a = static_cast<int>(u.data_as<float>()[i * 6 + l * 2] * 4) % 4;
      e.push_back({a, (a + 1 + static_cast<int>(u.data_as<float>()[i * 6 + l * 2 + 1] * 3) % 3) % 4});
    }
    add_token(t, static_cast<int>(u.data_as<float>()[i * 6] * 10) % 10 + (i % 3 == 0 ? 20 : 0), i / 50, e);
  }
  const AffinityTables a = AffinityTables::build(t, 2, {{0, 1, 0, 1}, {1, 1, 0, 0}, {0, 0, 1, 1}}, 2, 32);
  const std::string path = temp_path("affinity");
  a.save(path);
  const AffinityTables b = AffinityTables::load(path);
  std::filesystem::remove(path);
  ASSERT_EQ(b.ranks(), 2);
  ASSERT_EQ(b.layers(), 3);
  EXPECT_EQ(b.vocab(), 32);
  EXPECT_EQ(b.lookback(), 2);
  EXPECT_EQ(b.token_frequency(), a.token_frequency());
  for (int l = 0; l < 3; ++l) {
    EXPECT_EQ(b.layer(l).rank_of_expert, a.layer(l).rank_of_expert);
    EXPECT_EQ(b.layer(l).confidence, a.layer(l).confidence);
    EXPECT_EQ(b.layer(l).joint.size(), a.layer(l).joint.size());
    for (const auto& [key, v] : a.layer(l).joint) {
      ASSERT_TRUE(b.layer(l).joint.count(key));
      EXPECT_EQ(b.layer(l).joint.at(key).votes, v.votes);
      EXPECT_EQ(b.layer(l).joint.at(key).weights, v.weights);
    }
  }
  ShuffleOptions so;
  so.shuffle = true;
  so.batch_tokens = 64;
  EXPECT_EQ(score_local_activation(t, a, so).local, score_local_activation(t, b, so).local);
}

TEST(Affinity, MalformedTablesAndTracesGiveClearErrors) {
  RoutingTrace t = make_trace(1, 4, 1);
  add_token(t, 1, 0, {{0}});
  add_token(t, 2, 1, {{3}});
  const AffinityTables a = AffinityTables::build(t, 2, AffinityTables::identity_placement(1, 4, 2), 1);
  const std::string path = temp_path("affinity_bad");
  a.save(path);
  // Another file format.
  const std::string trace_path = temp_path("trace_bad");
  t.save(trace_path);
  try {
    AffinityTables::load(trace_path);
    FAIL() << "a trace loaded as tables";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("expected switchyard-affinity-v1"), std::string::npos) << e.what();
  }
  // A placement naming a rank that does not exist.
  rewrite_safetensors(path, [](const std::string& name, Tensor& t) {
    if (name == "layer0.rank_of_expert") t.data_as<int32_t>()[2] = 5;
    return true;
  });
  try {
    AffinityTables::load(path);
    FAIL() << "rank 5 of 2 accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("layer0.rank_of_expert[2] = 5, expected 0..1"), std::string::npos) << e.what();
  }
  std::filesystem::remove(path);
  // A trace whose documents go backwards.
  t.sequences = {1, 0};
  t.save(trace_path);
  try {
    RoutingTrace::load(trace_path);
    FAIL() << "descending sequences accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("sequences[1] = 0 after 1"), std::string::npos) << e.what();
  }
  std::filesystem::remove(trace_path);
  // Tables and a trace that disagree.
  RoutingTrace other = make_trace(2, 4, 1);
  add_token(other, 1, 0, {{0}, {1}});
  EXPECT_THROW(score_local_activation(other, a, {}), InvalidArgument);
  EXPECT_THROW(AffinityTables::build(t, 0, AffinityTables::identity_placement(1, 4, 2), 0), InvalidArgument);
  EXPECT_THROW(AffinityTables::build(t, 2, {{0, 1, 2, 0}}, 0), InvalidArgument);
}

TEST(Affinity, HostileTracesAndSettingsAreRefusedClearly) {
  const std::string path = temp_path("trace_hostile");
  auto refused = [&](RoutingTrace t, const std::string& expected) {
    t.save(path);
    try {
      RoutingTrace::load(path);
      ADD_FAILURE() << "accepted; expected an error containing: " << expected;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
    }
  };
  {  // two tokens claiming dense tables of 2^20 ids x 2^16 experts
    RoutingTrace t = make_trace(1, 65536, 1);
    add_token(t, 1048575, 0, {{65535}});
    add_token(t, 0, 0, {{0}});
    refused(t, "need 68719476736 table entries, expected at most 67108864");
  }
  {  // a gate weight that is not a number
    RoutingTrace t = make_trace(1, 4, 2);
    add_token(t, 3, 0, {{0, 1}});
    t.weights[0][1] = std::nanf("");
    refused(t, "layer0.weights[0, 1] = nan, expected a finite gate weight >= 0");
  }
  std::filesystem::remove(path);
  RoutingTrace t = make_trace(1, 32, 1);
  add_token(t, 3, 0, {{0}});
  try {
    AffinityTables::build(t, 32, AffinityTables::identity_placement(1, 32, 32), 1);
    FAIL() << "32 ranks with look-back accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("at most 20 ranks, got ranks = 32"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(AffinityTables::build(t, 32, AffinityTables::identity_placement(1, 32, 32), 0));
}

// Documents: the file's sequence ids, else windows where the position restarts; a split keeps whole documents.
TEST(RoutingTraceDocuments, SplitKeepsWholeDocuments) {
  RoutingTrace t = make_trace(1, 4, 1);
  for (int doc = 0; doc < 6; ++doc)
    for (int i = 0; i < 3 + doc; ++i) add_token(t, 10 * doc + i, doc, {{doc % 4}});
  const RoutingTrace build = t.select_sequences([](int64_t j) { return j % 5 == 0; });
  const RoutingTrace scored = t.select_sequences([](int64_t j) { return j % 5 != 0; });
  EXPECT_EQ(build.size(), 3 + 8);  // documents 0 and 5
  EXPECT_EQ(scored.size(), t.size() - build.size());
  for (int64_t i = 0; i < build.size(); ++i) {
    EXPECT_EQ(build.sequences[static_cast<size_t>(i)] % 5, 0);
    EXPECT_EQ(build.expert(0, i, 0), build.sequences[static_cast<size_t>(i)] % 4);
    EXPECT_EQ(build.tokens[static_cast<size_t>(i)] / 10, build.sequences[static_cast<size_t>(i)]);
  }
  const std::string path = temp_path("trace_docs");
  t.save(path);
  EXPECT_TRUE(RoutingTrace::load(path).has_documents);
  EXPECT_EQ(RoutingTrace::load(path).sequences, t.sequences);
  // The same tensors without "sequences": windows from the positions (each document restarts at 0).
  rewrite_safetensors(path, [](const std::string& name, Tensor&) { return name != "sequences"; });
  const RoutingTrace windows = RoutingTrace::load(path);
  std::filesystem::remove(path);
  EXPECT_FALSE(windows.has_documents);
  EXPECT_EQ(windows.sequences, t.sequences);
}

TEST(Affinity, UnseenTokensBorrowTheirNearestNeighbour) {
  RoutingTrace t = make_trace(1, 4, 1);
  for (int i = 0; i < 10; ++i) add_token(t, 0, i, {{0}});
  for (int i = 0; i < 10; ++i) add_token(t, 1, i, {{3}});
  AffinityTables a = AffinityTables::build(t, 2, AffinityTables::identity_placement(1, 4, 2), 0, 3);
  // Token 2 is unseen: before borrowing it holds the layer's mean row.
  EXPECT_FLOAT_EQ(a.layer(0).confidence[2 * 4 + 0], 0.5f);
  const std::vector<float> embedding = {0, 0, 10, 10, 9, 9.5f};  // token 2 is nearest token 1
  a.borrow_unseen(embedding.data(), 3, 2);
  EXPECT_EQ(a.borrowed_from(), (std::vector<int>{-1, -1, 1}));
  EXPECT_FLOAT_EQ(a.layer(0).confidence[2 * 4 + 3], 1.0f);
  float votes[2], weights[2];
  a.rank_scores(0, 2, 0, 0, AffinityPredictor::token, votes, weights);
  EXPECT_FLOAT_EQ(votes[1], 1.0f);
}

TEST(ExpertGrouping, AssignmentMatchesBruteForce) {
  Rng rng(fresh_seed());
  for (int n : {1, 2, 3, 6}) {
    Tensor u = Tensor::empty({n * n}, DType::f32);
    rng.fill_uniform(u, 0.0, 1.0);
    const std::vector<double> value(u.data_as<float>(), u.data_as<float>() + n * n);
    const std::vector<int> got = max_weight_assignment(value, n);
    std::vector<int> perm(static_cast<size_t>(n));
    std::iota(perm.begin(), perm.end(), 0);
    double best = -1;
    do {
      double v = 0;
      for (int i = 0; i < n; ++i) v += value[static_cast<size_t>(i * n + perm[static_cast<size_t>(i)])];
      best = std::max(best, v);
    } while (std::next_permutation(perm.begin(), perm.end()));
    double v = 0;
    std::vector<int> used = got;
    std::sort(used.begin(), used.end());
    for (int i = 0; i < n; ++i) {
      EXPECT_EQ(used[static_cast<size_t>(i)], i);
      v += value[static_cast<size_t>(i * n + got[static_cast<size_t>(i)])];
    }
    EXPECT_NEAR(v, best, 1e-9) << "n " << n;
  }
}

// Planted pairs: token ids use experts {0, 5}, {1, 4}, {2, 7}, {3, 6}; on 4 ranks the grouping must put each pair
// on one rank (every choice local once tokens follow), which the identity placement (0,1 | 2,3 | ...) never does.
TEST(ExpertGrouping, CoLocatesExpertsThatTheSameTokensUse) {
  const int V = 4, E = 8, W = 4;
  const int pairs[4][2] = {{0, 5}, {1, 4}, {2, 7}, {3, 6}};
  std::vector<double> counts(static_cast<size_t>(V * E), 0.0);
  for (int t = 0; t < V; ++t)
    for (int e : pairs[t]) counts[static_cast<size_t>(t * E + e)] = 100.0;
  const ExpertGrouping g = group_experts(counts, V, E, W);
  for (const auto& p : pairs) EXPECT_EQ(g.rank_of_expert[static_cast<size_t>(p[0])], g.rank_of_expert[static_cast<size_t>(p[1])]);
  std::vector<int> per_rank(W, 0);
  for (int r : g.rank_of_expert) ++per_rank[static_cast<size_t>(r)];
  EXPECT_EQ(per_rank, (std::vector<int>{2, 2, 2, 2}));
  EXPECT_NEAR(g.local_share, 1.0, 1e-12);
  EXPECT_NEAR(g.identity_local_share, 0.5, 1e-12);
  EXPECT_NEAR(grouping_local_share(counts, V, E, W, g.rank_of_expert), 1.0, 1e-12);
  EXPECT_THROW(group_experts(counts, V, E, 3), InvalidArgument);
}

// Two hot experts used together (4 token ids, 80 of 200 choices): locality
// alone puts them on one rank (its experts then take 80 choices against a
// mean of 50); weighing the load pairs each with a cold expert (60).
TEST(ExpertGrouping, BalanceWeightTradesLocalityForTheBusiestRank) {
  const int V = 10, E = 8, W = 4;
  std::vector<double> counts(static_cast<size_t>(V * E), 0.0);
  for (int t = 0; t < 4; ++t) counts[static_cast<size_t>(t * E + 0)] = counts[static_cast<size_t>(t * E + 1)] = 10.0;
  for (int t = 4; t < V; ++t) {
    const int e = 2 + 2 * ((t - 4) / 2);
    counts[static_cast<size_t>(t * E + e)] = counts[static_cast<size_t>(t * E + e + 1)] = 10.0;
  }
  GroupingOptions local_only;
  local_only.balance_weight = 0;
  const ExpertGrouping a = group_experts(counts, V, E, W, local_only);
  EXPECT_EQ(a.rank_of_expert[0], a.rank_of_expert[1]);
  EXPECT_NEAR(a.rank_load_max_over_mean, 80.0 / 50.0, 1e-9);
  GroupingOptions balanced;
  balanced.balance_weight = 10;
  const ExpertGrouping b = group_experts(counts, V, E, W, balanced);
  EXPECT_NE(b.rank_of_expert[0], b.rank_of_expert[1]);
  EXPECT_NEAR(b.rank_load_max_over_mean, 60.0 / 50.0, 1e-9);  // a hot expert beside a cold one
  EXPECT_LT(b.local_share, a.local_share);
  balanced.balance_weight = -1;
  EXPECT_THROW(group_experts(counts, V, E, W, balanced), InvalidArgument);
}

}  // namespace
}  // namespace switchyard
