// The parallel inference engine on every rank of the harness's world (thread
// ranks or mpirun): replicated and data-parallel attention against the model
// on one rank (tokens equal, logits bit-identical), a scheduler that leaves
// ranks empty, continuous batching, chunked prefill and the KV budget.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>

#include "comm/backends/emulated/emulated_backend.h"
#include "comm/backends/threads/threads_backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/engine.h"
#include "model/serving.h"
#include "model/speculative.h"
#include "moe/affinity.h"
#include "moe/expert_grouping.h"
#include "tests/common/rank_harness.h"

namespace switchyard {
namespace {

using testing::for_each_rank;

const std::string kDraft = std::string(SWITCHYARD_SOURCE_DIR) + "/examples/tiny_lm/draft";
const std::string kBase = std::string(SWITCHYARD_SOURCE_DIR) + "/examples/tiny_lm/base";

std::shared_ptr<Communicator> one_rank() { return ThreadsWorld(1).communicator(0); }

// Fresh random byte prompts of lengths in [lo, hi].
std::vector<std::vector<int>> random_prompts(uint64_t seed, int n, int lo, int hi) {
  Rng rng(seed);
  std::vector<std::vector<int>> p(static_cast<size_t>(n));
  for (auto& s : p) {
    const int len = lo + static_cast<int>(rng.uniform(0, hi - lo + 1 - 1e-9));
    for (int i = 0; i < len; ++i) s.push_back(32 + static_cast<int>(rng.uniform(0, 95 - 1e-9)));
  }
  return p;
}

int argmax(const float* row, int n) { return static_cast<int>(std::max_element(row, row + n) - row); }

// Per sequence: the logits rows of its prefill's last position and of each
// greedy decode step, bit for bit, and the tokens chosen.
struct Trace {
  std::vector<std::vector<float>> rows;
  std::vector<int> tokens;
};

// Runs `mine` (indices into prompts) through `step`: one prefill of all of
// them, then `steps` greedy decode steps; empty `mine` still runs every step.
// A cache per sequence of `mine` and a chunk holding its prompt (a moved
// Sequences keeps its caches' storage, so the chunks stay valid).
struct Sequences {
  std::vector<KVCache> caches;
  std::vector<Chunk> chunks;
};
template <typename NewCache>
Sequences start(const std::vector<std::vector<int>>& prompts, const std::vector<int>& mine, NewCache&& new_cache) {
  Sequences q;
  q.caches.reserve(mine.size());
  for (int s : mine) {
    q.caches.push_back(new_cache());
    q.chunks.push_back({&q.caches.back(), prompts[static_cast<size_t>(s)]});
  }
  return q;
}

template <typename Step, typename NewCache>
std::map<int, Trace> run_sequences(const std::vector<std::vector<int>>& prompts, const std::vector<int>& mine, int steps,
                                   int V, Step&& step, NewCache&& new_cache) {
  Sequences q = start(prompts, mine, new_cache);
  std::vector<Chunk>& chunks = q.chunks;
  std::map<int, Trace> out;
  for (int i = 0; i <= steps; ++i) {
    const Tensor logits = step(chunks);
    int64_t row = -1;
    for (size_t c = 0; c < chunks.size(); ++c) {
      row += static_cast<int64_t>(chunks[c].tokens.size());
      const float* r = logits.data_as<float>() + row * V;
      Trace& t = out[mine[c]];
      t.rows.emplace_back(r, r + V);
      t.tokens.push_back(argmax(r, V));
      chunks[c].tokens = {t.tokens.back()};
    }
  }
  return out;
}

std::map<int, Trace> reference_traces(Model& ref, const std::vector<std::vector<int>>& prompts, int steps) {
  std::vector<int> all(prompts.size());
  std::iota(all.begin(), all.end(), 0);
  return run_sequences(prompts, all, steps, ref.config().vocab_size,
                       [&](const std::vector<Chunk>& c) { return ref.forward(c); }, [&] { return ref.new_cache(64); });
}

void expect_same_traces(const std::map<int, Trace>& got, const std::map<int, Trace>& want, const std::string& what) {
  for (const auto& [s, t] : got) {
    const Trace& w = want.at(s);
    EXPECT_EQ(t.tokens, w.tokens) << what << ", sequence " << s;
    ASSERT_EQ(t.rows.size(), w.rows.size());
    for (size_t i = 0; i < t.rows.size(); ++i)
      EXPECT_EQ(0, std::memcmp(t.rows[i].data(), w.rows[i].data(), t.rows[i].size() * sizeof(float)))
          << what << ", sequence " << s << ", step " << i << ": logits differ from one rank's";
  }
}

TEST(Engine, ReplicatedAndDataParallelEqualOneRankBitForBit) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size(), R = world.rank();
    // Three sequences: with four ranks one rank holds none under dp and still joins every collective.
    const auto prompts = random_prompts(seed, 3, 1, 19);
    Model ref(kDraft, one_rank());
    const auto want = reference_traces(ref, prompts, 5);
    Model model(kDraft, world.shared_from_this());
    const int V = model.config().vocab_size;
    for (const char* mode : {"replicated", "dp"}) {
      InferenceEngine engine(model, LayerSchedule::make({.attention = mode}, model.config().layers, W));
      engine.set_check_replicas(true);
      std::vector<int> mine;
      for (int s = 0; s < 3; ++s)
        if (engine.schedule().attention() == AttentionMode::replicated || s % W == R) mine.push_back(s);
      const auto got = run_sequences(prompts, mine, 5, V, [&](const std::vector<Chunk>& c) { return engine.step(c); },
                                     [&] { return engine.new_cache(64); });
      EXPECT_EQ(got.size(), mine.size());
      expect_same_traces(got, want, std::string(mode) + " on " + std::to_string(W) + " ranks, rank " + std::to_string(R));
    }
  }, Milliseconds(20000));
}

// Redundant experts re-placed by EPLB between decode steps (the layers
// migrate their weights) leave every logit bit as it was: a replica holds the
// same weights and computes a row with the same batch-invariant kernels.
TEST(Engine, RebalancingRedundantExpertsBetweenStepsKeepsEveryLogitBit) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size(), R = world.rank();
    const auto prompts = random_prompts(seed + 7, 3, 1, 19);
    Model ref(kDraft, one_rank());
    const auto want = reference_traces(ref, prompts, 6);
    Model model(kDraft, world.shared_from_this());
    InferenceEngine engine(model, LayerSchedule::make({.attention = "dp"}, model.config().layers, W));
    std::vector<int> mine;
    for (int s = 0; s < 3; ++s)
      if (s % W == R) mine.push_back(s);
    int steps = 0;
    Model::Rebalance last;
    const auto got = run_sequences(
        prompts, mine, 6, model.config().vocab_size,
        [&](const std::vector<Chunk>& c) {
          Tensor logits = engine.step(c);
          if (++steps % 2 == 0) last = model.rebalance_experts(W);  // E + W physical experts
          return logits;
        },
        [&] { return engine.new_cache(64); });
    expect_same_traces(got, want, "rebalanced every 2 steps on " + std::to_string(W) + " ranks");
    EXPECT_NE(last.placement.find(std::to_string(W) + " extra replicas"), std::string::npos) << last.placement;
    EXPECT_GE(last.after, 1.0 - 1e-9);  // a mean over layers of max/mean ratios
  }, Milliseconds(20000));
}

// Tensor-parallel attention against the model on one rank. The heads'
// partial output projections are summed by a reduce-scatter, not inside one
// dot product as on one rank, so logits are not bit-identical: they agree
// within 1e-5 of the row's largest magnitude, and the greedy token agrees
// wherever the reference's top-2 margin exceeds 1e-3. The reference's tokens
// are fed back to both (teacher forcing), so one near-tie cannot send the
// two runs down different continuations.
struct Close {
  double worst = 0;  // largest |tp - ref| / max(1, max |ref|) seen
  int compared = 0, skipped = 0;
};
template <typename Step, typename NewCache>
Close tp_against_reference(const std::vector<std::vector<int>>& prompts, const std::vector<int>& mine,
                           const std::map<int, Trace>& want, int steps, int V, Step&& step, NewCache&& new_cache,
                           const std::string& what) {
  Sequences q = start(prompts, mine, new_cache);
  std::vector<Chunk>& chunks = q.chunks;
  Close close;
  for (int i = 0; i <= steps; ++i) {
    const Tensor logits = step(chunks);
    int64_t row = -1;
    for (size_t c = 0; c < chunks.size(); ++c) {
      row += static_cast<int64_t>(chunks[c].tokens.size());
      const float* got = logits.data_as<float>() + row * V;
      const std::vector<float>& ref = want.at(mine[c]).rows[static_cast<size_t>(i)];
      double scale = 1, diff = 0;
      for (int v = 0; v < V; ++v) scale = std::max(scale, std::abs(static_cast<double>(ref[static_cast<size_t>(v)])));
      for (int v = 0; v < V; ++v) diff = std::max(diff, std::abs(static_cast<double>(got[v]) - ref[static_cast<size_t>(v)]));
      close.worst = std::max(close.worst, diff / scale);
      EXPECT_LE(diff / scale, 1e-5) << what << ", sequence " << mine[c] << ", step " << i;
      std::vector<float> sorted(ref);
      std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
      const int want_token = want.at(mine[c]).tokens[static_cast<size_t>(i)];
      if (sorted[0] - sorted[1] > 1e-3) {
        EXPECT_EQ(argmax(got, V), want_token) << what << ", sequence " << mine[c] << ", step " << i;
        ++close.compared;
      } else {
        ++close.skipped;
      }
      chunks[c].tokens = {want_token};
    }
  }
  return close;
}

TEST(Engine, TensorParallelAttentionEqualsOneRankWithinTolerance) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size(), R = world.rank();
    // Five sequences: rows split unevenly over a group's ranks, a decode step
    // of one sequence leaves a rank without rows.
    const auto prompts = random_prompts(seed + 3, 5, 1, 21);
    Model ref(kDraft, one_rank());
    const auto want = reference_traces(ref, prompts, 5);
    Model model(kDraft, world.shared_from_this());
    const int heads = model.config().heads;
    for (int tp = 1; tp <= W; ++tp) {
      if (W % tp != 0 || heads % tp != 0) continue;
      InferenceEngine engine(model, LayerSchedule::make({.attention = "tp", .tp = tp}, model.config().layers, W));
      engine.set_check_replicas(true);
      ASSERT_EQ(engine.tp_group()->size(), tp);
      EXPECT_EQ(engine.new_cache(8).width(), model.config().d_model / tp);
      std::vector<int> mine;  // group g of W / tp holds sequences g, g + W / tp, ...
      for (int s = 0; s < 5; ++s)
        if (s % engine.schedule().token_groups() == engine.token_group()) mine.push_back(s);
      const std::string what = "tp " + std::to_string(tp) + " on " + std::to_string(W) + " ranks, rank " + std::to_string(R);
      const Close c = tp_against_reference(
          prompts, mine, want, 5, model.config().vocab_size, [&](const std::vector<Chunk>& ch) { return engine.step(ch); },
          [&] { return engine.new_cache(64); }, what);
      if (!mine.empty()) {
        EXPECT_GT(c.compared, 0) << what;
      }
      // Batch invariance: the group's first sequence alone gives the bits it gets beside the others.
      if (!mine.empty()) {
        const std::vector<int> first = {mine.front()};
        auto step = [&](const std::vector<Chunk>& ch) { return engine.step(ch); };
        auto cache = [&] { return engine.new_cache(64); };
        const auto together = run_sequences(prompts, mine, 3, model.config().vocab_size, step, cache);
        const auto alone = run_sequences(prompts, first, 3, model.config().vocab_size, step, cache);
        expect_same_traces(alone, together, what + ", alone vs beside the others");
      } else {
        for (int i = 0; i < 2; ++i) run_sequences(prompts, {}, 3, model.config().vocab_size,
                                                  [&](const std::vector<Chunk>& ch) { return engine.step(ch); },
                                                  [&] { return engine.new_cache(64); });
      }
      if (R == 0)
        std::printf("[tp %d on %d ranks] worst relative logit difference %.2e; %d tokens compared, %d near-ties skipped\n",
                    tp, W, c.worst, c.compared, c.skipped);
    }
  }, Milliseconds(30000));
}

// Tables from the held-out draft trace under its grouped placement: a good
// predictor, and one that always points away from the experts (every choice
// moved to the next rank's expert of the same slot before counting).
struct ShuffleTables {
  std::vector<std::vector<int>> grouped;
  std::shared_ptr<const AffinityTables> good, wrong;
};
ShuffleTables shuffle_tables(int W) {
  const RoutingTrace trace =
      RoutingTrace::load(std::string(SWITCHYARD_SOURCE_DIR) + "/examples/tiny_lm/trace/draft_heldout.safetensors");
  ShuffleTables t;
  for (const ExpertGrouping& g : group_experts(trace, W)) t.grouped.push_back(g.rank_of_expert);
  t.good = std::make_shared<const AffinityTables>(AffinityTables::build(trace, W, t.grouped, 2, 256));
  RoutingTrace away = trace;
  const int E = trace.experts, per_rank = E / W;
  for (auto& layer : away.choices)
    for (int32_t& e : layer) {
      const std::vector<int>& rank_of = t.grouped[static_cast<size_t>(&layer - away.choices.data())];
      const int r = rank_of[static_cast<size_t>(e)];
      int j = 0;  // e's index among its rank's experts
      for (int f = 0; f < e; ++f) j += rank_of[static_cast<size_t>(f)] == r;
      int seen = 0;
      for (int f = 0; f < E; ++f)
        if (rank_of[static_cast<size_t>(f)] == (r + 1) % W && seen++ == j % per_rank) e = f;
    }
  t.wrong = std::make_shared<const AffinityTables>(AffinityTables::build(away, W, t.grouped, 2, 256));
  return t;
}

// Speculative token shuffling (moe/affinity.h) inside tensor-parallel
// attention: with the tables' grouped placement loaded, every logit bit is
// the unshuffled engine's, for a good predictor and for one that always
// points away from the experts (tables from a trace with every expert moved
// to the next rank), for every tp and batches smaller than a group; a good
// predictor keeps more choices local on held-out text.
TEST(Engine, TokenShufflingKeepsEveryLogitBitAndLocalises) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size(), R = world.rank();
    const ShuffleTables tables = shuffle_tables(W);
    const std::vector<std::vector<int>>& grouped = tables.grouped;
    const auto& good = tables.good;
    const auto& wrong = tables.wrong;
    const int E = good->experts();
    Model model(kDraft, world.shared_from_this(), {.placements = good->placements()});
    // Held-out text and short random prompts: rows split unevenly, decode steps of fewer rows than a group.
    std::vector<std::vector<int>> prompts = random_prompts(seed + 7, 3, 1, 9);
    for (const char* text : {"A complex system that works is invariably found to have evolved",
                             "Anything that can go wrong will go wrong, and at the worst possible"})
      prompts.push_back(std::vector<int>(text, text + std::strlen(text)));
    const int V = model.config().vocab_size, heads = model.config().heads;
    for (int tp = 1; tp <= W; ++tp) {
      if (W % tp != 0 || heads % tp != 0) continue;
      InferenceEngine engine(model, LayerSchedule::make({.attention = "tp", .tp = tp}, model.config().layers, W));
      std::vector<int> mine;
      for (int s = 0; s < static_cast<int>(prompts.size()); ++s)
        if (s % engine.schedule().token_groups() == engine.token_group()) mine.push_back(s);
      auto step = [&](const std::vector<Chunk>& ch) { return engine.step(ch); };
      auto cache = [&] { return engine.new_cache(96); };
      const std::string what = "tp " + std::to_string(tp) + " on " + std::to_string(W) + " ranks, rank " + std::to_string(R);
      auto local_share = [&] {
        const Model::LocalActivationCount& la = model.local_activation();
        Tensor v = Tensor::zeros({2}, DType::f64);
        for (size_t l = 0; l < la.pairs.size(); ++l)
          v.data_as<double>()[0] += static_cast<double>(la.pairs[l]), v.data_as<double>()[1] += static_cast<double>(la.local[l]);
        world.allreduce(v, v).wait();
        model.reset_local_activation();
        return v.data_as<double>()[1] / v.data_as<double>()[0];
      };
      model.reset_local_activation();
      const auto off = run_sequences(prompts, mine, 6, V, step, cache);
      const double lar_off = local_share();
      engine.set_token_shuffling(good);
      const auto on = run_sequences(prompts, mine, 6, V, step, cache);
      const double lar_on = local_share();
      expect_same_traces(on, off, what + ", shuffled by the tables");
      EXPECT_GT(engine.shuffle_counts().rows, 0) << what;
      engine.set_token_shuffling(wrong);
      const auto misled = run_sequences(prompts, mine, 6, V, step, cache);
      const double lar_wrong = local_share();
      expect_same_traces(misled, off, what + ", shuffled away from the experts");
      if (tp == W && W > 1) {
        EXPECT_GT(lar_on, lar_off + 0.1) << what;
        EXPECT_LT(lar_wrong, lar_off) << what;
      }
      if (R == 0)
        std::printf("[tp %d on %d ranks] local activation: in place %.3f, shuffled %.3f, misled %.3f\n", tp, W, lar_off,
                    lar_on, lar_wrong);
    }
    // What cannot shuffle says so.
    InferenceEngine dp(model, LayerSchedule::make({.attention = "dp"}, model.config().layers, W));
    EXPECT_THROW(dp.set_token_shuffling(good), InvalidArgument);
    if (W > 1) {
      Model plain(kDraft, world.shared_from_this());  // E / W per rank in order: not the tables' placement
      InferenceEngine tp(plain, LayerSchedule::make({.attention = "tp", .tp = W}, plain.config().layers, W));
      bool differs = false;
      for (int l = 0; l < plain.config().layers; ++l)
        for (int e = 0; e < E; ++e) differs |= plain.moe(l).layout().owner(e) != grouped[static_cast<size_t>(l)][static_cast<size_t>(e)];
      if (differs) EXPECT_THROW(tp.set_token_shuffling(good), InvalidArgument);
    }
  }, Milliseconds(60000));
}

// --specmoe auto (ExecPlan::shuffle): on an emulated slow link with a cheap
// host, the planner shuffles a prefill's layers and leaves a decode step's
// few rows in place (what they would save cannot pay the shuffle's fixed
// cost); with tables that point away from the experts it stops once shuffled
// batches showed it; one rank never shuffles (nothing to save); every logit
// keeps its bits throughout, for every tp.
TEST(Engine, AutomaticTokenShufflingShufflesOnlyWhereItPays) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size(), R = world.rank();
    const ShuffleTables tables = shuffle_tables(W);
    LinkModel slow;
    slow.intra = slow.inter = {.latency = 2e-6, .bandwidth = 2e8};
    slow.ranks_per_node = W;
    const auto device = std::make_shared<const DeviceModel>(DeviceModel{.gemm_flops_f32 = 5e13, .memory_bandwidth = 2e12});
    Model model(kDraft, make_emulated_communicator(world.shared_from_this(), slow),
                {.device = device, .placements = tables.good->placements()});
    const int V = model.config().vocab_size, L = model.config().layers;
    std::vector<std::vector<int>> prompts = random_prompts(seed + 11, 2, 40, 60);
    for (const char* text : {"Anything that can go wrong will go wrong, and at the worst possible moment of all",
                             "A complex system that works is invariably found to have evolved from a simple one"})
      prompts.push_back(std::vector<int>(text, text + std::strlen(text)));
    for (int tp = 1; tp <= W; ++tp) {
      if (W % tp != 0 || model.config().heads % tp != 0) continue;
      InferenceEngine engine(model, LayerSchedule::make({.attention = "tp", .tp = tp}, L, W));
      std::vector<int> mine;
      for (int s = 0; s < static_cast<int>(prompts.size()); ++s)
        if (s % engine.schedule().token_groups() == engine.token_group()) mine.push_back(s);
      const std::string what = "tp " + std::to_string(tp) + " on " + std::to_string(W) + " ranks, rank " + std::to_string(R);
      std::vector<int64_t> shuffled_per_step;  // layers shuffled at each step (0: the prefill)
      auto step = [&](const std::vector<Chunk>& ch) {
        const int64_t before = engine.shuffle_counts().shuffled;
        Tensor logits = engine.step(ch);
        shuffled_per_step.push_back(engine.shuffle_counts().shuffled - before);
        return logits;
      };
      auto cache = [&] { return engine.new_cache(96); };
      const auto reference = run_sequences(prompts, mine, 3, V, step, cache);
      engine.set_token_shuffling(tables.good, {.automatic = true, .seconds_per_batch = 2e-5, .seconds_per_row = 1e-9});
      ASSERT_TRUE(engine.token_shuffling_automatic());
      shuffled_per_step.clear();
      const auto automatic = run_sequences(prompts, mine, 3, V, step, cache);
      expect_same_traces(automatic, reference, what + ", shuffled where the planner chose");
      const bool rows_here = !mine.empty();
      const int64_t good_prefill = shuffled_per_step[0];
      const int64_t good_decode = std::accumulate(shuffled_per_step.begin() + 1, shuffled_per_step.end(), int64_t{0});
      if (W == 1) {
        EXPECT_EQ(engine.shuffle_counts().shuffled, 0) << what << ": one rank has no all-to-all to save";
      }
      if (tp == W && W > 1 && rows_here) {
        EXPECT_EQ(good_prefill, L) << what << ": the prefill's every layer; " << engine.shuffle_explanation(1);
        EXPECT_EQ(good_decode, 0) << what << ": decode steps; " << engine.shuffle_explanation(1);
        const auto [in_place, shuffled] = engine.shuffle_local_shares(1);
        EXPECT_GT(shuffled, in_place + 0.1) << what;
      }
      // Misleading tables: the first prefills shuffle (the seed trusts the
      // tables), what they reach turns the planner, and it stays turned.
      engine.set_token_shuffling(tables.wrong, {.automatic = true, .seconds_per_batch = 2e-5, .seconds_per_row = 1e-9});
      const double seeded = engine.shuffle_local_shares(1).second;
      std::vector<int64_t> prefill_shuffled;
      for (int round = 0; round < 4; ++round) {
        shuffled_per_step.clear();
        const auto misled = run_sequences(prompts, mine, 3, V, step, cache);
        expect_same_traces(misled, reference, what + ", misled round " + std::to_string(round));
        prefill_shuffled.push_back(shuffled_per_step[0]);
      }
      if (tp == W && W > 1 && rows_here) {
        EXPECT_GT(prefill_shuffled[0], 0) << what;
        EXPECT_EQ(prefill_shuffled.back(), 0) << what << "; " << engine.shuffle_explanation(1);
        // Learned down from the tables' word (it stops learning once it stops shuffling: not below in place).
        EXPECT_LT(engine.shuffle_local_shares(1).second, seeded - 0.1) << what;
      }
      if (R == 0)
        std::printf("[tp %d on %d ranks] automatic shuffling: %lld of %d prefill layers, %lld decode layers; misled "
                    "prefills %lld then %lld\n", tp, W, static_cast<long long>(good_prefill), L,
                    static_cast<long long>(good_decode), static_cast<long long>(prefill_shuffled.front()),
                    static_cast<long long>(prefill_shuffled.back()));
    }
  }, Milliseconds(60000));
}

TEST(Engine, TensorParallelGroupWithDifferentInputsFailsTogether) {
  for_each_rank([](Communicator& world, uint64_t) {
    if (world.size() % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
    Model model(kDraft, world.shared_from_this());
    InferenceEngine engine(model, LayerSchedule::tensor_parallel(model.config().layers, world.size(), 2));
    engine.set_check_replicas(true);
    KVCache cache = engine.new_cache(16);
    std::vector<Chunk> chunks = {{&cache, {65 + world.rank()}}};
    EXPECT_THROW(engine.step(chunks), InvalidArgument);
  });
}

// Greedy speculative decoding is plain greedy decoding of the base, token for
// token, for any gamma and schedule: verification chunks give the logits a
// one-token step would (bit for bit), and each sequence keeps its own count.
TEST(Engine, SpeculativeGreedyEqualsPlainGreedyForEveryGamma) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size(), R = world.rank();
    const auto prompts = random_prompts(seed + 11, 5, 1, 17);
    const int steps = 12;
    Model ref(kBase, one_rank());
    const auto want = reference_traces(ref, prompts, steps - 1);  // steps tokens per sequence
    Model base(kBase, world.shared_from_this()), draft(kDraft, world.shared_from_this());
    for (const char* mode : {"replicated", "dp", "tp"}) {
      const int tp = std::string(mode) == "tp" ? W : 1;  // one group of every rank
      if (base.config().heads % tp != 0 || draft.config().heads % tp != 0) continue;
      InferenceEngine be(base, LayerSchedule::make({.attention = mode, .tp = tp}, base.config().layers, W));
      InferenceEngine de(draft, LayerSchedule::make({.attention = mode, .tp = tp}, draft.config().layers, W));
      std::vector<int> mine;
      std::vector<std::vector<int>> my_prompts;
      for (int s = 0; s < 5; ++s)
        if (s % be.schedule().token_groups() == be.token_group()) mine.push_back(s), my_prompts.push_back(prompts[static_cast<size_t>(s)]);
      // tp's logits are not one rank's bits: its own plain greedy decoding is the reference.
      const auto plain = tp == 1 ? want
                                 : run_sequences(prompts, mine, steps - 1, base.config().vocab_size,
                                                 [&](const std::vector<Chunk>& c) { return be.step(c); },
                                                 [&] { return be.new_cache(64); });
      for (int gamma : {1, 3, 6}) {
        SpeculativeStats st;
        const auto out = speculative_generate(be, de, my_prompts, steps, {.gamma = gamma}, &st);
        ASSERT_EQ(out.size(), mine.size());
        for (size_t i = 0; i < mine.size(); ++i)
          EXPECT_EQ(out[i], plain.at(mine[i]).tokens) << mode << ", gamma " << gamma << ", sequence " << mine[i];
        if (!mine.empty()) {
          EXPECT_EQ(st.generated, static_cast<int64_t>(mine.size()) * steps);
          EXPECT_LE(st.accepted, st.proposed);
          EXPECT_GE(st.tokens_per_round(), 1.0);
          if (mine.size() == 5) {
            EXPECT_GT(st.tokens_per_round(), 1.0) << "the draft agrees with the base on some tokens";
          }
        }
        if (R == 0 && W == 1)
          std::printf("[speculative %s gamma %d] acceptance %.2f, %.2f tokens per round, %lld base forwards\n", mode,
                      gamma, st.acceptance(), st.tokens_per_round(), static_cast<long long>(st.rounds));
      }
      // The whole draft on every rank (its MoE layers local, no all-to-all): the same proposals, the same output.
      Model local_draft(kDraft, one_rank());
      InferenceEngine le(local_draft, LayerSchedule::replicated(local_draft.config().layers, W), world.shared_from_this());
      SpeculativeStats spread_stats, local_stats;
      const auto spread = speculative_generate(be, de, my_prompts, steps, {.gamma = 3}, &spread_stats);
      const auto local = speculative_generate(be, le, my_prompts, steps, {.gamma = 3}, &local_stats);
      EXPECT_EQ(local, spread) << mode;
      EXPECT_EQ(local_stats.accepted, spread_stats.accepted) << mode << ": the draft's logits are its own bits either way";
      // Gamma chosen per sequence and round from its acceptance: still plain greedy decoding.
      const auto adaptive = speculative_generate(be, de, my_prompts, steps, {.gamma = 6, .adaptive_gamma = true});
      for (size_t i = 0; i < mine.size(); ++i)
        EXPECT_EQ(adaptive[i], plain.at(mine[i]).tokens) << mode << ", adaptive gamma, sequence " << mine[i];
    }
  }, Milliseconds(30000));
}

// EasySpec: the draft's middle layers in groups of N run their attention at
// once (fuzzy), with or without bonus calibration; the output is still plain
// greedy decoding of the base (whose logits are one rank's, bit for bit).
TEST(Engine, EasySpecGreedyEqualsPlainGreedyForEveryGroupingAndGamma) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size();
    const auto prompts = random_prompts(seed + 13, 3, 1, 15);
    const int steps = 10;
    Model ref(kBase, one_rank());
    const auto want = reference_traces(ref, prompts, steps - 1);
    Model base(kBase, world.shared_from_this()), draft(kDraft, world.shared_from_this());
    InferenceEngine be(base, LayerSchedule::replicated(base.config().layers, W));
    for (int n : {1, 2, 3, 4}) {
      if (n > W) continue;
      InferenceEngine de(draft, LayerSchedule::layer_parallel(draft.config().layers, W, n));
      de.set_check_replicas(true);
      std::map<Calibration, SpeculativeStats> at_gamma3;
      for (int gamma : {1, 3, 6})
        for (Calibration c : {Calibration::every, Calibration::never}) {
          if (c == Calibration::never && gamma != 3) continue;
          SpeculativeStats st;
          const auto out = speculative_generate(be, de, prompts, steps, {.gamma = gamma, .calibration = c}, &st);
          if (gamma == 3) at_gamma3[c] = st;
          for (size_t i = 0; i < prompts.size(); ++i)
            EXPECT_EQ(out[i], want.at(static_cast<int>(i)).tokens)
                << "lp " << n << ", gamma " << gamma << ", calibration " << calibration_name(c) << ", sequence " << i;
          if (world.rank() == 0)
            std::printf("[easyspec lp %d gamma %d calibration %s on %d ranks] acceptance %.2f, %.2f tokens per round\n", n,
                        gamma, calibration_name(c), W, st.acceptance(), st.tokens_per_round());
        }
      if (n == 1) {  // an exact draft proposes the same with or without calibration: its KV was exact already
        EXPECT_EQ(at_gamma3[Calibration::every].accepted, at_gamma3[Calibration::never].accepted);
        EXPECT_EQ(at_gamma3[Calibration::every].proposed, at_gamma3[Calibration::never].proposed);
        EXPECT_GT(at_gamma3[Calibration::every].calibrations, 0);
      }
    }
  }, Milliseconds(30000));
}

// A fuzzy step leaves some rank's KV of a grouped layer inexact; cropping to
// the exact prefix and one exact pass over the rest gives the KV of a fresh
// exact prefill, bit for bit, on every rank and layer.
TEST(Engine, CalibrationMakesTheDraftKvAFreshExactPrefill) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size();
    if (W < 2) GTEST_SKIP() << "layer groups need two ranks";
    const std::vector<int> tokens = random_prompts(seed + 17, 1, 14, 14)[0];
    Model draft(kDraft, world.shared_from_this());
    InferenceEngine de(draft, LayerSchedule::layer_parallel(draft.config().layers, W, std::min(W, 4)));
    const std::vector<int> prefix(tokens.begin(), tokens.begin() + 10);
    KVCache cache = de.new_cache(32), fresh = de.new_cache(32);
    de.step_exact({{&cache, prefix}});
    for (int i = 10; i < 14; ++i) de.step({{&cache, {tokens[static_cast<size_t>(i)]}}});  // fuzzy
    de.step_exact({{&fresh, tokens}});
    auto differing = [&](const KVCache& a) {
      int64_t n = 0;
      for (int l = 0; l < draft.config().layers; ++l) {
        const LayerKV& x = a.layer(l);
        const LayerKV& y = fresh.layer(l);
        for (int p = 0; p < 14; ++p)
          for (int j = 0; j < x.width(); ++j)
            n += x.key_dim(j)[p] != y.key_dim(j)[p] || x.values(p)[j] != y.values(p)[j];
      }
      return n;
    };
    Tensor any = Tensor::empty({1}, DType::f64);
    any.data_as<double>()[0] = static_cast<double>(differing(cache));
    world.allreduce(any, any).wait();
    EXPECT_GT(any.data_as<double>()[0], 0) << "fuzzy drafting left every KV exact: the test would prove nothing";
    cache.crop(10);
    de.step_exact({{&cache, std::vector<int>(tokens.begin() + 10, tokens.end())}});
    EXPECT_EQ(differing(cache), 0) << "rank " << world.rank();
  }, Milliseconds(20000));
}

TEST(Engine, ReplicatedRanksWithDifferentInputsFailTogether) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    if (world.size() == 1) GTEST_SKIP() << "needs two ranks";
    Model model(kDraft, world.shared_from_this());
    InferenceEngine engine(model, LayerSchedule::replicated(model.config().layers, world.size()));
    engine.set_check_replicas(true);
    KVCache cache = engine.new_cache(16);
    std::vector<Chunk> chunks = {{&cache, {65 + world.rank()}}};
    EXPECT_THROW(engine.step(chunks), InvalidArgument);
  });
}

// Requests with different prompt and output lengths, some greedy, some sampled from their own seeds.
std::vector<Request> mixed_requests(uint64_t seed, int n) {
  const auto prompts = random_prompts(seed + 1, n, 1, 23);
  std::vector<Request> r(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    r[i].id = 100 + i;
    r[i].prompt = prompts[static_cast<size_t>(i)];
    r[i].max_new_tokens = 1 + (i * 5 + static_cast<int>(seed % 7)) % 9;
    if (i % 2) r[i].sampling = {.temperature = 0.9, .top_k = 20, .top_p = 0.95, .seed = seed + 17 * i};
  }
  return r;
}

// One request at a time on one rank: the definition of its output.
std::vector<int> alone(Model& ref, const Request& r) { return generate(ref, {r.prompt}, r.max_new_tokens, r.sampling)[0]; }

// Every result this rank got equals the request run alone; the ranks together served each request once.
void expect_served(Communicator& world, const InferenceEngine& engine, const std::vector<Request>& requests,
                   const std::vector<RequestResult>& results, Model& ref, const std::string& what) {
  std::map<int64_t, const Request*> by_id;
  for (const Request& r : requests) by_id[r.id] = &r;
  for (const RequestResult& res : results) {
    const Request& r = *by_id.at(res.id);
    EXPECT_EQ(res.tokens, alone(ref, r)) << what << ": request " << res.id;
    EXPECT_GE(res.first_token, res.arrival) << what;
    EXPECT_GE(res.finish, res.first_token) << what;
  }
  Tensor n = Tensor::empty({1}, DType::f64);
  n.data_as<double>()[0] = engine.speaks_for_group() ? static_cast<double>(results.size()) : 0;
  world.allreduce(n, n).wait();
  EXPECT_EQ(n.data_as<double>()[0], static_cast<double>(requests.size())) << what << ": requests served in all";
}

TEST(Engine, ServedRequestsEqualEachRequestAlone) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    Model ref(kDraft, one_rank());
    Model model(kDraft, world.shared_from_this());
    const auto requests = mixed_requests(seed, 7);
    for (const char* mode : {"replicated", "dp"}) {
      InferenceEngine engine(model, LayerSchedule::make({.attention = mode}, model.config().layers, world.size()));
      RoundRobinScheduler rr;
      ServingOptions o;
      o.max_batch = 3;  // sequences leave and join between steps
      o.check_replicas = true;
      ServingStats st;
      const auto results = serve(engine, requests, rr, o, &st);
      expect_served(world, engine, requests, results, ref, mode);
      EXPECT_LE(st.peak_batch, 3);
      if (engine.schedule().attention() == AttentionMode::replicated) {
        EXPECT_EQ(results.size(), requests.size());
      }
    }
  }, Milliseconds(20000));
}

// Sem-MoE's request scheduling under dp: each request still gets exactly the
// tokens it gets alone; every W consecutive requests cover all W ranks; a
// request whose tokens' experts sit on one rank goes there.
TEST(Engine, AffinitySchedulerServesEveryRequestAsAloneAndCoversEveryRankPerWindow) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size();
    const RoutingTrace trace = RoutingTrace::load(std::string(SWITCHYARD_SOURCE_DIR) +
                                                  "/examples/tiny_lm/trace/draft_heldout.safetensors");
    std::vector<std::vector<int>> grouped;
    for (const ExpertGrouping& g : group_experts(trace, W)) grouped.push_back(g.rank_of_expert);
    const auto tables = std::make_shared<const AffinityTables>(AffinityTables::build(trace, W, grouped, 2, 256));
    Model ref(kDraft, one_rank());
    Model model(kDraft, world.shared_from_this(), {.placements = tables->placements()});
    const auto requests = mixed_requests(seed, 7);
    InferenceEngine engine(model, LayerSchedule::make({.attention = "dp"}, model.config().layers, W));
    AffinityScheduler by_affinity(tables);
    ServingOptions o;
    o.max_batch = 3;
    const auto results = serve(engine, requests, by_affinity, o);
    expect_served(world, engine, requests, results, ref, "affinity-scheduled dp");
    // The window mask, asked directly: W consecutive assignments are a permutation of the groups.
    AffinityScheduler fresh(tables);
    GroupLoad load{std::vector<int64_t>(static_cast<size_t>(W), 0), std::vector<int64_t>(static_cast<size_t>(W), 0)};
    for (int window = 0; window < 3; ++window) {
      std::vector<int> seen(static_cast<size_t>(W), 0);
      for (int i = 0; i < W; ++i) ++seen[static_cast<size_t>(fresh.assign(requests[static_cast<size_t>((window * W + i) % requests.size())], load))];
      EXPECT_EQ(seen, std::vector<int>(static_cast<size_t>(W), 1)) << "window " << window;
    }
    // A prompt of one byte whose experts the tables put on the last rank goes there when it leads a window.
    if (W > 1) {
      RoutingTrace planted = trace;
      for (int64_t i = 0; i < planted.size(); ++i)
        if (planted.tokens[static_cast<size_t>(i)] == 'q')
          for (int l = 0; l < planted.layers; ++l)
            for (int j = 0; j < planted.k; ++j) {
              int e = 0;
              while (grouped[static_cast<size_t>(l)][static_cast<size_t>(e)] != W - 1) ++e;
              planted.choices[static_cast<size_t>(l)][static_cast<size_t>(i * planted.k + j)] = e;
            }
      AffinityScheduler leaning(std::make_shared<const AffinityTables>(AffinityTables::build(planted, W, grouped, 0, 256)));
      EXPECT_EQ(leaning.assign({.id = 0, .prompt = {'q', 'q'}}, load), W - 1);
      GroupLoad three{std::vector<int64_t>(static_cast<size_t>(W + 1), 0), {}};
      EXPECT_THROW(leaning.assign({.id = 1, .prompt = {'q'}}, three), InvalidArgument);
    }
  }, Milliseconds(20000));
}

// Serving with redundant experts re-placed every few steps (EPLB from the
// loads the requests routed) serves every request as it would alone, and
// each rebalance is heard on every rank after the same step.
TEST(Engine, ServingRebalancesRedundantExpertsWithoutChangingAnyToken) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size();
    Model ref(kDraft, one_rank());
    Model model(kDraft, world.shared_from_this());
    const auto requests = mixed_requests(seed + 3, 6);
    InferenceEngine engine(model, LayerSchedule::make({.attention = "dp"}, model.config().layers, W));
    RoundRobinScheduler rr;
    ServingOptions o;
    o.max_batch = 2;
    o.redundant_experts = W;  // E + W physical experts
    o.rebalance_every = 3;
    std::vector<int64_t> heard;
    std::string placement;
    o.on_rebalance = [&](int64_t step, const Model::Rebalance& r, double seconds) {
      heard.push_back(step);
      placement = r.placement;
      EXPECT_GE(seconds, 0.0);
    };
    ServingStats st;
    const auto results = serve(engine, requests, rr, o, &st);
    expect_served(world, engine, requests, results, ref, "rebalanced every 3 steps");
    ASSERT_GE(st.steps, 3) << "too few steps to rebalance";
    EXPECT_EQ(st.rebalances, st.steps / 3);
    ASSERT_EQ(heard.size(), static_cast<size_t>(st.rebalances));
    for (size_t i = 0; i < heard.size(); ++i) EXPECT_EQ(heard[i], 3 * static_cast<int64_t>(i + 1));
    EXPECT_NE(placement.find(std::to_string(W) + " extra replicas"), std::string::npos) << placement;
    // Bad settings are refused before any step, naming the fields.
    o.redundant_experts = 0;
    EXPECT_THROW(serve(engine, requests, rr, o), InvalidArgument);
    o.redundant_experts = W + 1;  // E + W + 1 does not divide over W > 1 ranks
    if (W > 1) {
      EXPECT_THROW(serve(engine, requests, rr, o), InvalidArgument);
    }
  }, Milliseconds(20000));
}

// Everything to token group 0: the other ranks compute nothing but join every step.
class FirstGroupOnly : public RequestScheduler {
 public:
  int assign(const Request&, const GroupLoad&) override { return 0; }
};

TEST(Engine, SchedulerThatLeavesRanksEmpty) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    Model ref(kDraft, one_rank());
    Model model(kDraft, world.shared_from_this());
    InferenceEngine engine(model, LayerSchedule::data_parallel(model.config().layers, world.size()));
    const auto requests = mixed_requests(seed, 4);
    FirstGroupOnly first;
    ServingStats st;
    const auto results = serve(engine, requests, first, {}, &st);
    expect_served(world, engine, requests, results, ref, "all on group 0");
    if (world.rank() == 0) {
      EXPECT_EQ(results.size(), requests.size());
    } else {
      EXPECT_TRUE(results.empty());
      EXPECT_EQ(st.rows, 0);
      EXPECT_EQ(st.idle_steps, st.steps);
    }
    // Every rank ran the same number of steps (they are collective).
    Tensor s = Tensor::empty({2}, DType::f64);
    s.data_as<double>()[0] = static_cast<double>(st.steps), s.data_as<double>()[1] = -static_cast<double>(st.steps);
    world.allreduce(s, s, {.op = ReduceOp::max}).wait();
    EXPECT_EQ(s.data_as<double>()[0], -s.data_as<double>()[1]);
  }, Milliseconds(20000));
}

TEST(Engine, RequestTokensDoNotDependOnTheBatchArrivalsChunkingOrBudget) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    Model ref(kDraft, one_rank());
    Model model(kDraft, world.shared_from_this());
    auto requests = mixed_requests(seed, 8);
    const auto arrivals = poisson_arrivals(8, 400.0, seed);  // about 20 ms in all
    for (size_t i = 0; i < requests.size(); ++i) requests[i].arrival = arrivals[i];
    int64_t most = 0;
    for (const Request& r : requests) most = std::max<int64_t>(most, static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens);
    struct Case {
      const char* what;
      int prefill_chunk;
      int64_t kv_budget;
      int max_batch;
    };
    for (const char* mode : {"dp", "replicated"})
    for (const Case c : {Case{"unchunked", 0, 0, 64}, Case{"prefill chunks of 3", 3, 0, 64},
                         Case{"KV budget of one request", 2, most, 64}, Case{"batch of 2", 5, 0, 2}}) {
      InferenceEngine engine(model, LayerSchedule::make({.attention = mode}, model.config().layers, world.size()));
      RoundRobinScheduler rr;
      ServingOptions o;
      o.prefill_chunk = c.prefill_chunk;
      o.kv_budget = c.kv_budget;
      o.max_batch = c.max_batch;
      ServingStats st;
      const auto results = serve(engine, requests, rr, o, &st);
      const std::string what = std::string(mode) + ", " + c.what;
      expect_served(world, engine, requests, results, ref, what);
      if (c.kv_budget > 0) {
        EXPECT_LE(st.peak_kv, c.kv_budget) << what;
      }
      EXPECT_LE(st.peak_batch, c.max_batch) << what;
      if (c.prefill_chunk > 0) {
        EXPECT_LE(st.peak_prefill_rows, c.prefill_chunk) << what;
      }
      if (c.prefill_chunk == 0) {
        // Unchunked: some step took a whole prompt, so the peak is at least this rank's longest one.
        size_t longest = 0;
        for (const RequestResult& res : results)
          for (const Request& r : requests)
            if (r.id == res.id) longest = std::max(longest, r.prompt.size());
        EXPECT_GE(st.peak_prefill_rows, static_cast<int64_t>(longest)) << what << ": whole prompts";
      }
    }
  }, Milliseconds(30000));
}

TEST(Engine, RanksGivenDifferentRequestsFailTogether) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    if (world.size() == 1) GTEST_SKIP() << "needs two ranks";
    Model model(kDraft, world.shared_from_this());
    InferenceEngine engine(model, LayerSchedule::data_parallel(model.config().layers, world.size()));
    auto requests = mixed_requests(seed, 3);
    if (world.rank() == 1) requests[2].max_new_tokens += 1;
    RoundRobinScheduler rr;
    EXPECT_THROW(serve(engine, requests, rr, {}), InvalidArgument);
  });
}


// ---- attention-FFN disaggregation (LayerSchedule::disaggregated) ----

// Every split of the world into A attention and W - A FFN ranks, every
// ping-pong depth (more micro-batches than a rank has sequences included):
// the logits are one rank's model's, bit for bit, and the attention ranks
// hold no experts, the FFN ranks no attention or KV.
TEST(Engine, DisaggregatedEqualsOneRankBitForBitForEverySplitAndDepth) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size(), R = world.rank();
    if (W < 2) return;
    const auto prompts = random_prompts(seed, 5, 1, 19);
    Model ref(kDraft, one_rank());
    const auto want = reference_traces(ref, prompts, 5);
    std::vector<std::string> splits;
    for (int A = 1; A < W; ++A) splits.push_back(std::to_string(A) + ":" + std::to_string(W - A));
    if (W == 4) splits.push_back("[1,3]:[0,2]");  // interleaved roles, an FFN rank first
    for (const std::string& split : splits) {
      const RoleSplit roles = RoleSplit::parse(split, W);
      const int A = static_cast<int>(roles.attention.size());
      Model model(kDraft, world.shared_from_this(), {.roles = roles});
      const int V = model.config().vocab_size;
      InferenceEngine engine(model, LayerSchedule::disaggregated(model.config().layers, roles));
      const bool attention = roles.is_attention(R);
      EXPECT_EQ(model.holds_attention(), attention);
      EXPECT_EQ(model.moe(0).layout().slots(R) > 0, !attention) << "rank " << R << " of " << roles.name();
      EXPECT_EQ(engine.kv_floats_per_position() > 0, attention);
      EXPECT_EQ(engine.token_group(), roles.attention_index(R));
      for (int m : {1, 2, 3, 0}) {  // 0: automatic, from the last step's measured times
        engine.set_microbatches(m);
        std::vector<int> mine;
        for (int s = 0; s < 5 && attention; ++s)
          if (s % A == engine.token_group()) mine.push_back(s);
        const auto got = run_sequences(prompts, mine, 5, V, [&](const std::vector<Chunk>& c) { return engine.step(c); },
                                       [&] { return engine.new_cache(64); });
        EXPECT_EQ(got.size(), mine.size());
        expect_same_traces(got, want, roles.name() + ", m = " + std::to_string(m) + ", rank " + std::to_string(R));
        const int used = engine.last_microbatches();
        EXPECT_TRUE(m > 0 ? used == m : used >= 1 && used <= std::max(1, (5 + A - 1) / A)) << "m " << m << " used " << used;
        EXPECT_TRUE(same_on_every_rank(world, static_cast<uint64_t>(used))) << "ranks used different depths";
      }
      // The depth may change from step to step and differ between ranks (the largest is used).
      int step = 0;
      std::vector<int> mine;
      for (int s = 0; s < 5 && attention; ++s)
        if (s % A == engine.token_group()) mine.push_back(s);
      const auto got = run_sequences(prompts, mine, 5, V,
                                     [&](const std::vector<Chunk>& c) {
                                       engine.set_microbatches(1 + (step++ + R) % 3);
                                       return engine.step(c);
                                     },
                                     [&] { return engine.new_cache(64); });
      expect_same_traces(got, want, roles.name() + ", m changing per step, rank " + std::to_string(R));
      EXPECT_GT(engine.step_times().steps, 0);
      EXPECT_LE(engine.step_times().waiting, engine.step_times().seconds);
      if (!attention) EXPECT_GT(engine.step_times().waiting, 0.0) << "an FFN rank never waited for the attention ranks";
    }
  }, Milliseconds(20000));
}

TEST(Engine, DisaggregatedServingEqualsEachRequestAlone) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    const int W = world.size();
    if (W < 2) return;
    const RoleSplit roles = RoleSplit::parse(std::to_string(W / 2) + ":" + std::to_string(W - W / 2), W);
    Model ref(kDraft, one_rank());
    Model model(kDraft, world.shared_from_this(), {.roles = roles});
    InferenceEngine engine(model, LayerSchedule::disaggregated(model.config().layers, roles));
    engine.set_microbatches(2);
    const auto requests = mixed_requests(seed, 7);
    RoundRobinScheduler rr;
    ServingOptions o;
    o.max_batch = 3;
    ServingStats st;
    const auto results = serve(engine, requests, rr, o, &st);
    expect_served(world, engine, requests, results, ref, roles.name());
    if (!roles.is_attention(world.rank())) {
      EXPECT_TRUE(results.empty());
      EXPECT_EQ(st.rows, 0);
    }
  }, Milliseconds(20000));
}

TEST(Engine, DisaggregatedRoleSplitsThatDoNotFitAreClearErrors) {
  auto error_of = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of([] { RoleSplit::parse("2:3", 4); }).find("--afd = '2:3': 2 attention + 3 FFN ranks = 5, but the world has 4"),
            std::string::npos);
  EXPECT_NE(error_of([] { RoleSplit::parse("0:4", 4); }).find("expected A:F"), std::string::npos);
  EXPECT_NE(error_of([] { RoleSplit::parse("2", 2); }).find("expected A:F"), std::string::npos);
  EXPECT_NE(error_of([] { RoleSplit::parse("1:x", 2); }).find("expected A:F"), std::string::npos);
  EXPECT_NE(error_of([] { RoleSplit::of({0, 1}, {1}, 2); }).find("rank 1 is given two roles"), std::string::npos);
  EXPECT_NE(error_of([] { RoleSplit::of({0}, {2}, 3); }).find("rank 1 of the world of 3 has no role"), std::string::npos);
  EXPECT_NE(error_of([] { RoleSplit::of({0}, {5}, 2); }).find("rank 5 is outside the world"), std::string::npos);
  EXPECT_NE(error_of([] {
              LayerSchedule::make({.attention = "tp", .tp = 2, .afd = "1:1", .afd_field = "--afd"}, 2, 2);
            }).find("model.attention = tp with --afd = 1:1; expected dp"),
            std::string::npos);
  EXPECT_NE(error_of([] { RoleSplit::parse("[0,x]:[1]", 3); }).find("'x' is not a rank"), std::string::npos);
  EXPECT_NE(error_of([] { RoleSplit::parse("[0,1]:[1]", 2); }).find("rank 1 is given two roles"), std::string::npos);
  const RoleSplit lists = RoleSplit::parse("[3,1]:0,2", 4);
  EXPECT_EQ(lists.attention, (std::vector<int>{1, 3}));
  EXPECT_EQ(lists.ffn, (std::vector<int>{0, 2}));
  EXPECT_EQ(LayerSchedule::disaggregated(2, lists).group_leader(0), 1);
  const RoleSplit roles = RoleSplit::parse("1:3", 4);
  EXPECT_EQ(roles.name(), "1A3F");
  EXPECT_EQ(roles.attention_index(0), 0);
  EXPECT_EQ(roles.attention_index(2), -1);
  const LayerSchedule s = LayerSchedule::disaggregated(3, roles);
  EXPECT_EQ(s.token_groups(), 1);
  EXPECT_EQ(s.token_group_of(3), -1);
  EXPECT_TRUE(s.owned_layers(1).empty());
  EXPECT_EQ(s.owned_layers(0).size(), 3u);
}

// A model loaded without roles under a disaggregated schedule, an FFN rank
// given sequences, and an attention rank given a chunk its cache cannot
// hold: errors on every rank alike (agreed at the step's start, so no rank
// is left in a collective).
TEST(Engine, DisaggregatedMisuseFailsOnEveryRank) {
  for_each_rank([](Communicator& world, uint64_t) {
    const int W = world.size();
    if (W < 2) return;
    const RoleSplit roles = RoleSplit::parse("1:" + std::to_string(W - 1), W);
    Model colocated(kDraft, world.shared_from_this());
    EXPECT_THROW(InferenceEngine(colocated, LayerSchedule::disaggregated(colocated.config().layers, roles)),
                 InvalidArgument);
    Model model(kDraft, world.shared_from_this(), {.roles = roles});
    InferenceEngine engine(model, LayerSchedule::disaggregated(model.config().layers, roles));
    KVCache cache = model.new_cache(16, {});
    std::vector<Chunk> chunks;
    if (world.rank() == W - 1) chunks.push_back({&cache, {65}});  // an FFN rank with a sequence
    try {
      engine.step(chunks);
      ADD_FAILURE() << "no error";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("an FFN rank of 1A"), std::string::npos) << e.what();
    }
    // Rank 0 (attention) overflows its cache: it names the chunk, the others name rank 0.
    KVCache small = engine.new_cache(2);
    std::vector<Chunk> over;
    if (world.rank() == 0) over.push_back({&small, {65, 66, 67}});
    try {
      engine.step(over);
      ADD_FAILURE() << "no error";
    } catch (const InvalidArgument& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(world.rank() == 0 ? "3 token(s) at position 0 of a cache of 2" : "rank 0 was given"),
                std::string::npos) << m;
    }
  }, Milliseconds(20000));
}

// The ping-pong overlaps on an emulated cluster: while an FFN rank computes
// micro-batch 0 of a layer, the attention rank runs micro-batch 1's
// attention (their busy spans intersect in virtual time); with the results
// collected right after posting (a serialised pipeline) they would not.
TEST(Engine, DisaggregatedMicroBatchesOverlapInVirtualTime) {
  for_each_rank([](Communicator& world, uint64_t seed) {
    if (world.size() != 2) return;  // 1A1F
    LinkModel link;
    link.intra = {2e-6, 100e9};
    link.inter = link.intra;
    link.ranks_per_node = 2;
    auto emulated = make_emulated_communicator(world.shared_from_this(), link);
    auto device = std::make_shared<DeviceModel>();
    device->gemm_flops_f32 = 1e12, device->memory_bandwidth = 1e12;
    const RoleSplit roles = RoleSplit::parse("1:1", 2);
    Model model(kDraft, emulated, {.device = device, .roles = roles});
    InferenceEngine engine(model, LayerSchedule::disaggregated(model.config().layers, roles));
    engine.set_microbatches(2);
    const auto prompts = random_prompts(seed, 8, 4, 8);
    std::vector<KVCache> caches;
    caches.reserve(8);
    std::vector<Chunk> chunks;
    for (int s = 0; s < 8 && world.rank() == 0; ++s) {
      caches.push_back(engine.new_cache(16));
      chunks.push_back({&caches.back(), prompts[static_cast<size_t>(s)]});
    }
    engine.record_timeline(true);
    engine.step(chunks);
    // Every rank's spans (side, layer, micro-batch, start, end) to every rank.
    std::vector<double> mine;
    for (const auto& sp : engine.timeline())
      for (double v : {sp.attention ? 1.0 : 0.0, double(sp.layer), double(sp.microbatch), sp.start, sp.end}) mine.push_back(v);
    Tensor n = Tensor::zeros({2}, DType::f64);
    n.data_as<double>()[world.rank()] = static_cast<double>(mine.size());
    world.allreduce(n, n).wait();
    const std::vector<int64_t> counts = {static_cast<int64_t>(n.data_as<double>()[0]), static_cast<int64_t>(n.data_as<double>()[1])};
    Tensor all = Tensor::empty({counts[0] + counts[1]}, DType::f64);
    world.allgatherv(TensorView(mine.data(), DType::f64, {static_cast<int64_t>(mine.size())}), all, counts).wait();
    const double* v = all.data_as<double>();
    const int L = model.config().layers;
    ASSERT_EQ(counts[0] + counts[1], int64_t{2 * 2 * L * 5});  // both sides, every layer and micro-batch
    int overlapping = 0;
    for (int64_t i = 0; i < counts[0] + counts[1]; i += 5)
      for (int64_t j = 0; j < counts[0] + counts[1]; j += 5)
        if (v[i] == 0 && v[j] == 1 && v[i + 1] == v[j + 1] && v[i + 2] == 0 && v[j + 2] == 1 &&
            std::min(v[i + 4], v[j + 4]) > std::max(v[i + 3], v[j + 3]))
          ++overlapping;  // FFN (l, 0) and attention (l, 1) busy at once
    EXPECT_GE(overlapping, L - 1) << "the FFN rank's experts of micro-batch 0 never ran beside the attention of micro-batch 1";
    // The FFN rank waited for the attention rank at some point: its bubble is not zero.
    if (world.rank() == 1) EXPECT_GT(engine.step_times().virtual_waiting, 0.0);
  }, Milliseconds(20000));
}

// A dead FFN rank: the attention ranks fail with a timeout naming the op and
// the peer, within the op timeout, instead of waiting for ever.
TEST(Engine, DisaggregatedFfnRankThatStopsMakesTheAttentionRanksFail) {
  if (!testing::harness_is_threads() || testing::harness_config().ranks < 2) GTEST_SKIP() << "needs >= 2 thread-ranks";
  const auto start = std::chrono::steady_clock::now();
  try {
    for_each_rank([](Communicator& world, uint64_t) {
      const int W = world.size();
      const RoleSplit roles = RoleSplit::parse(std::to_string(W - 1) + ":1", W);
      Model model(kDraft, world.shared_from_this(), {.roles = roles});
      InferenceEngine engine(model, LayerSchedule::disaggregated(model.config().layers, roles));
      engine.set_microbatches(2);
      KVCache cache = engine.new_cache(32);
      std::vector<Chunk> chunks;
      if (roles.is_attention(world.rank())) chunks.push_back({&cache, {65, 66, 67}});
      engine.step(chunks);
      if (roles.is_ffn(world.rank())) return;  // the FFN rank goes away after one step
      for (Chunk& c : chunks) c.tokens = {68};
      engine.step(chunks);
    }, Milliseconds(1500));
    FAIL() << "no error";
  } catch (const TimeoutError& e) {
    EXPECT_NE(std::string(e.what()).find("timed out waiting for"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}


// Payloads (A->F rows in bf16 or fp8, as Step-3 sends them, F->A results in
// bf16): AFD gives the logits of a colocated run with the same payloads, bit
// for bit, for every split and m; they differ from f32's and stay close.
TEST(Engine, DisaggregatedPayloadsEqualColocatedWithTheSamePayloads) {
  for (DType rows_dtype : {DType::bf16, DType::fp8_e4m3})
  for_each_rank([&](Communicator& world, uint64_t seed) {
    const int W = world.size(), R = world.rank();
    if (W < 2) return;
    const auto prompts = random_prompts(seed, 4, 2, 12);
    ModelOptions bf16;
    bf16.dispatch_payload = rows_dtype;
    bf16.combine_payload = DType::bf16;
    Model colocated(kDraft, world.shared_from_this(), bf16);
    const int V = colocated.config().vocab_size;
    // The colocated reference: dp attention, every sequence on rank s mod W, every rank's rows gathered.
    InferenceEngine dp(colocated, LayerSchedule::data_parallel(colocated.config().layers, W));
    std::vector<int> mine_dp;
    for (int s = 0; s < 4; ++s)
      if (s % W == R) mine_dp.push_back(s);
    auto local = run_sequences(prompts, mine_dp, 4, V, [&](const std::vector<Chunk>& c) { return dp.step(c); },
                               [&] { return dp.new_cache(64); });
    // Every sequence's trace to every rank (sequence s from rank s mod W), for comparing under any split.
    const size_t per = 5 * static_cast<size_t>(V);  // prefill's last row + 4 decode rows
    Tensor all = Tensor::zeros({4 * static_cast<int64_t>(per)}, DType::f32);
    for (const auto& [s, t] : local)
      for (size_t i = 0; i < t.rows.size(); ++i)
        std::memcpy(all.data_as<float>() + s * per + i * V, t.rows[i].data(), V * sizeof(float));
    world.allreduce(all, all).wait();
    std::map<int, Trace> want;
    for (int s = 0; s < 4; ++s)
      for (size_t i = 0; i < 5; ++i) {
        const float* r = all.data_as<float>() + s * per + i * V;
        want[s].rows.emplace_back(r, r + V);
        want[s].tokens.push_back(argmax(r, V));
      }
    Model ref(kDraft, one_rank());
    const auto exact = reference_traces(ref, prompts, 4);
    double worst = 0;
    bool differs = false;
    for (int s = 0; s < 4; ++s)
      for (size_t i = 0; i < 5 && want[s].tokens == exact.at(s).tokens; ++i) {
        const auto& a = want[s].rows[i];
        const auto& b = exact.at(s).rows[i];
        double scale = 0;
        for (int v = 0; v < V; ++v) scale = std::max(scale, std::fabs(static_cast<double>(b[v])));
        for (int v = 0; v < V; ++v) {
          worst = std::max(worst, std::fabs(static_cast<double>(a[v]) - b[v]) / scale);
          differs = differs || a[v] != b[v];
        }
      }
    EXPECT_TRUE(differs) << dtype_name(rows_dtype) << " payloads gave f32's logits: nothing was rounded";
    const double bound = rows_dtype == DType::bf16 ? 0.05 : 0.25;  // fp8 keeps 3 mantissa bits
    EXPECT_LT(worst, bound) << dtype_name(rows_dtype) << " payloads moved a logit by more than " << bound
                            << " of its row's largest";
    for (int A = 1; A < W; ++A) {
      const RoleSplit roles = RoleSplit::parse(std::to_string(A) + ":" + std::to_string(W - A), W);
      ModelOptions o = bf16;
      o.roles = roles;
      Model model(kDraft, world.shared_from_this(), o);
      InferenceEngine engine(model, LayerSchedule::disaggregated(model.config().layers, roles));
      for (int m : {1, 2}) {
        engine.set_microbatches(m);
        std::vector<int> mine;
        for (int s = 0; s < 4 && roles.is_attention(R); ++s)
          if (s % A == engine.token_group()) mine.push_back(s);
        const auto got = run_sequences(prompts, mine, 4, V, [&](const std::vector<Chunk>& c) { return engine.step(c); },
                                       [&] { return engine.new_cache(64); });
        expect_same_traces(got, want, roles.name() + " " + std::string(dtype_name(rows_dtype)) + ", m = " + std::to_string(m) +
                                          ", rank " + std::to_string(R));
      }
    }
  }, Milliseconds(20000));
}

}  // namespace
}  // namespace switchyard
