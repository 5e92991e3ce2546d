#include "launch/specmoe.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <fstream>
#include <functional>
#include <optional>
#include <numeric>

#include "comm/backends/emulated/emulated_backend.h"
#include "comm/virtual_time.h"
#include "core/error.h"
#include "launch/cluster_presets.h"
#include "launch/plot.h"
#include "model/lm_train.h"
#include "model/model.h"
#include "moe/affinity.h"
#include "moe/expert_grouping.h"
#include "moe/moe_layer.h"
#include "moe/planner.h"
#include "parallel/runtime.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The model on one thread-rank of this process (routing does not depend on the world size).
void with_model(const std::string& dir, const std::function<void(Model&)>& fn) {
  RuntimeOptions ro;
  ro.backend = "threads";
  ro.ranks = 1;
  run_ranks(ro, [&](Runtime& rt) {
    Model model(dir, rt.world_ptr());
    fn(model);
  });
}

struct Split {
  RoutingTrace build, scored;
};

Split split_by_document(const RoutingTrace& trace, int build_every) {
  if (build_every < 2) SY_THROW(InvalidArgument, "--build_every = ", build_every, ", expected >= 2 (one document in N builds)");
  if (!trace.has_documents)
    std::printf("# trace %s names no documents (no \"sequences\"): split by window, so a document may fall in both "
                "parts (switchyard trace record writes documents)\n", trace.path.c_str());
  Split s{trace.select_sequences([&](int64_t j) { return j % build_every == 0; }),
          trace.select_sequences([&](int64_t j) { return j % build_every != 0; })};
  if (s.build.size() == 0 || s.scored.size() == 0)
    SY_THROW(InvalidArgument, "trace ", trace.path, ": ", s.build.size(), " tokens to build on and ", s.scored.size(),
             " to score (documents j % ", build_every, " == 0 build); expected some of both (a longer trace)");
  return s;
}

int vocab_of(const RoutingTrace& a, const RoutingTrace& b) {
  int v = 1;
  for (int32_t t : a.tokens) v = std::max(v, t + 1);
  for (int32_t t : b.tokens) v = std::max(v, t + 1);
  return v;
}

struct Embedding {
  std::vector<float> rows;
  int64_t vocab = 0, dim = 0;
};

// One configuration's result on the scored part.
struct Row {
  int W = 0;
  std::string config, predictor;
  LocalActivation la;
  bool comparison = false;  // the token-id predictor beside the look-back one
  double layer_seconds = 0;  // virtual MoE-layer time per (batch, layer); 0: not timed
  double exchange_share = 0;  // of it, rank 0's waits in the dispatch and combine all-to-alls
  bool automatic = false;     // the planner chose per (batch, layer): timed only, no LAR of its own scoring
  double shuffled_share = 0;  // timed: the (batch, layer)s that shuffled
  double timed_lar = 0;       // timed: the local share of the timed batches' choices
  double host_seconds = 0;    // timed: of layer_seconds, the shuffle's host cost
};

// What a timed configuration reached.
struct LayerTimes {
  double seconds = 0, exchange_share = 0, shuffled_share = 0, lar = 0;
  double host_seconds = 0;  // of `seconds`: the shuffle's host cost charged, per (batch, layer)
};

// The mean virtual seconds of one MoE layer's forward per (batch, layer):
// each of the first `batches` scored batches through every layer, each rank
// holding the rows this configuration puts on it (in place or shuffled),
// their recorded choices replayed (MoELayer::replay_routing) through a
// timing-only dropless f32 layer under the tables' placement on `cluster`.
// A shuffled batch also pays the shuffle's host cost (measured here, the
// slowest rank's). automatic: each (batch, layer) shuffles when the
// ShufflePlanner says it pays, learning from the batches before it.
LayerTimes time_moe_layer(const RoutingTrace& scored, const AffinityTables& tables, const ShuffleOptions& so,
                          bool automatic, const ClusterModel& cluster, int64_t d, int64_t H, int batches, int nodes) {
  const int W = tables.ranks(), k = scored.k;
  const std::vector<ExpertPlacement> placements = tables.placements();
  double total = 0, exchange = 0, shuffled = 0, decided = 0, local = 0, choices = 0, host = 0;
  int64_t samples = 0;
  RuntimeOptions ro;
  ro.backend = "threads";
  ro.ranks = W;
  run_ranks(ro, [&](Runtime& rt) {
    LinkModel link = cluster.link;
    link.ranks_per_node = nodes > 0 ? W / nodes : std::min(W, link.ranks_per_node);
    link.ranks_per_nic = std::gcd(link.ranks_per_nic, link.ranks_per_node);
    const std::shared_ptr<Communicator> group = make_emulated_communicator(rt.world_ptr(), link, true);
    const int me = group->rank();
    Tensor agreed = Tensor::zeros({2}, DType::f64);
    const ShuffleCost measured = measure_shuffle_cost(tables, so.predictor, W);
    agreed.data_as<double>()[0] = measured.per_batch, agreed.data_as<double>()[1] = measured.per_row;
    group->allreduce(agreed, agreed, {.op = ReduceOp::max}).wait();
    const ShuffleCost cost{agreed.data_as<double>()[0], agreed.data_as<double>()[1]};
    std::unique_ptr<ShufflePlanner> planner;
    for (int l = 0; l < scored.layers; ++l) {
      MoEConfig c;
      c.model_dim = d;
      c.hidden_dim = H;
      c.router.experts = scored.experts;
      c.router.k = k;
      c.router.capacity_factor = 0.0;
      c.plan.exchange = ExchangeMode::dropless;
      c.device_model = std::make_shared<DeviceModel>(cluster.device);
      c.skip_compute = true;
      c.node_size = link.ranks_per_node;
      c.placement = placements[static_cast<size_t>(l)];
      MoELayer layer(c, group);
      if (automatic && !planner)  // the preset's device and links: what calibrating the emulated cluster gives
        planner = std::make_unique<ShufflePlanner>(layer, cluster.device, link, tables, 0, W, cost);
      const std::vector<int>& rank_of_expert = tables.layer(l).rank_of_expert;
      for (int b = 0; b < batches; ++b) {
        const int64_t b0 = static_cast<int64_t>(b) * so.batch_tokens;
        if (b0 >= scored.size()) break;
        const int64_t T = std::min(so.batch_tokens, scored.size() - b0);
        ShuffleOptions batch_options = so;
        if (automatic) batch_options.shuffle = planner->decide(l, equal_chunks(T, W));
        const std::vector<int> rank = batch_ranks(scored, tables, batch_options, b0, T, l);
        std::vector<int64_t> mine;
        double batch_local = 0;
        for (int64_t r = 0; r < T; ++r) {
          if (rank[static_cast<size_t>(r)] == me) mine.push_back(b0 + r);
          for (int j = 0; j < k; ++j)
            batch_local += rank_of_expert[static_cast<size_t>(scored.expert(l, b0 + r, j))] == rank[static_cast<size_t>(r)];
        }
        if (automatic) planner->observe(l, batch_options.shuffle, static_cast<double>(T * k), batch_local);
        const int64_t n = static_cast<int64_t>(mine.size());
        Tensor x = Tensor::zeros({n, d}, DType::f32);
        Tensor experts = Tensor::empty({n, k}, DType::i32), weights = Tensor::empty({n, k}, DType::f32);
        for (int64_t i = 0; i < n; ++i)
          for (int j = 0; j < k; ++j) {
            experts.data_as<int32_t>()[i * k + j] = scored.expert(l, mine[static_cast<size_t>(i)], j);
            weights.data_as<float>()[i * k + j] = scored.weight(l, mine[static_cast<size_t>(i)], j);
          }
        layer.replay_routing(std::move(experts), std::move(weights));
        group->barrier().wait();
        const double start = virtual_time::now();
        if (batch_options.shuffle) virtual_time::charge(cost.seconds(T));  // every rank predicts the batch's rows
        layer.forward(x);
        group->barrier().wait();
        if (me == 0) {
          total += virtual_time::now() - start, ++samples;
          decided += 1, shuffled += batch_options.shuffle, local += batch_local, choices += static_cast<double>(T * k);
          host += batch_options.shuffle ? cost.seconds(T) : 0.0;
        }
      }
      if (me == 0) {
        const MoEPhaseTimes& p = layer.virtual_phase_times();
        exchange += p.dispatch_a2a + p.combine_a2a;
      }
    }
  });
  LayerTimes out;
  out.seconds = samples ? total / static_cast<double>(samples) : 0.0;
  out.exchange_share = total > 0 ? exchange / total : 0.0;
  out.shuffled_share = decided > 0 ? shuffled / decided : 0.0;
  out.lar = choices > 0 ? local / choices : 0.0;
  out.host_seconds = samples ? host / static_cast<double>(samples) : 0.0;
  return out;
}

struct Evaluation {
  std::vector<Row> rows;
  double grouping_objective = 0, identity_objective = 0;  // the solver's expected local share (build part)
  std::vector<std::vector<int>> grouped;
};

std::vector<std::vector<int>> grouped_placement(const RoutingTrace& build, int W, double balance_weight, Evaluation* ev) {
  GroupingOptions go;
  go.balance_weight = balance_weight;
  const std::vector<ExpertGrouping> g = group_experts(build, W, go);
  std::vector<std::vector<int>> out;
  for (const ExpertGrouping& layer : g) {
    out.push_back(layer.rank_of_expert);
    if (ev) {
      ev->grouping_objective += layer.local_share / static_cast<double>(g.size());
      ev->identity_objective += layer.identity_local_share / static_cast<double>(g.size());
    }
  }
  return out;
}

AffinityTables tables_for(const RoutingTrace& build, int W, const std::vector<std::vector<int>>& placement, int lookback,
                          int vocab, const Embedding* emb) {
  AffinityTables t = AffinityTables::build(build, W, placement, lookback, vocab);
  if (emb && !emb->rows.empty()) t.borrow_unseen(emb->rows.data(), emb->vocab, emb->dim);
  return t;
}

void check_ranks(int W, int experts, int lookback, const char* what) {
  if (W < 1 || experts % W != 0)
    SY_THROW(InvalidArgument, what, " --ranks ", W, ": ", experts, " experts cannot be spread evenly (expected a divisor of ",
             experts, ")");
  if (lookback < 0 || lookback > 2) SY_THROW(InvalidArgument, what, " --lookback = ", lookback, ", expected 0, 1 or 2");
  if (lookback > 0 && W > kAffinityMaxMaskRanks)
    SY_THROW(InvalidArgument, what, " --ranks ", W, " with --lookback ", lookback, ": look-back keys hold at most ",
             kAffinityMaxMaskRanks, " ranks (use --lookback 0)");
}

struct LayerTiming {
  const ClusterModel* cluster = nullptr;  // null: not timed
  int64_t d = 0, H = 0;
  int batches = 0, nodes = 0;
};



Evaluation evaluate(const Split& s, int W, int lookback, int64_t batch, const Embedding* emb, const LayerTiming& timing,
                    double balance_weight) {
  const RoutingTrace& build = s.build;
  if (W < 1 || build.experts % W != 0)
    SY_THROW(InvalidArgument, "--ranks ", W, ": ", build.experts, " experts cannot be spread evenly (expected a divisor)");
  const int vocab = std::max<int>(vocab_of(build, s.scored), emb ? static_cast<int>(emb->vocab) : 0);
  Evaluation ev;
  ev.grouped = grouped_placement(build, W, balance_weight, &ev);
  const AffinityTables plain = tables_for(build, W, AffinityTables::identity_placement(build.layers, build.experts, W),
                                          lookback, vocab, emb);
  const AffinityTables grouped = tables_for(build, W, ev.grouped, lookback, vocab, emb);
  const AffinityPredictor best = lookback > 0 ? AffinityPredictor::joint : AffinityPredictor::token;
  auto run = [&](const char* config, const AffinityTables& t, bool shuffle, AffinityPredictor p, bool comparison = false,
                 bool automatic = false) {
    ShuffleOptions so;
    so.shuffle = shuffle;
    so.predictor = p;
    so.batch_tokens = batch;
    Row row{W, config, shuffle || automatic ? predictor_name(p) : "-", {}, comparison};
    if (!automatic) row.la = score_local_activation(s.scored, t, so);
    row.automatic = automatic;
    if (timing.cluster && !comparison) {
      const LayerTimes lt =
          time_moe_layer(s.scored, t, so, automatic, *timing.cluster, timing.d, timing.H, timing.batches, timing.nodes);
      row.layer_seconds = lt.seconds, row.exchange_share = lt.exchange_share;
      row.shuffled_share = lt.shuffled_share, row.timed_lar = lt.lar, row.host_seconds = lt.host_seconds;
    }
    ev.rows.push_back(std::move(row));
  };
  run("vanilla", plain, false, best);
  run("grouping", grouped, false, best);
  run("shuffling", plain, true, best);
  run("both", grouped, true, best);
  // The planner's per-batch switch on the grouped placement: timed only (it has nothing to score without the layer).
  if (timing.cluster) run("auto", grouped, false, best, false, true);
  if (lookback > 0) {  // what the look-back adds: the same with the token-id table alone
    run("shuffling", plain, true, AffinityPredictor::token, true);
    run("both", grouped, true, AffinityPredictor::token, true);
  }
  return ev;
}

std::string human(double v) {
  char b[32];
  if (v >= 1e9) std::snprintf(b, sizeof b, "%.2f G", v / 1e9);
  else if (v >= 1e6) std::snprintf(b, sizeof b, "%.2f M", v / 1e6);
  else if (v >= 1e3) std::snprintf(b, sizeof b, "%.1f k", v / 1e3);
  else std::snprintf(b, sizeof b, "%.0f", v);
  return b;
}

void print_rows(const Evaluation& ev, double row_bytes) {
  const LocalActivation& vanilla = ev.rows.front().la;
  const double vanilla_seconds = ev.rows.front().layer_seconds;
  for (const Row& r : ev.rows) {
    if (r.automatic) {
      if (r.layer_seconds > 0)
        std::printf("MoE layer %s W=%d: %.3f ms virtual per layer and batch (%.2fx vanilla's; all-to-all waits %.0f%% of "
                    "it); the planner shuffled %.0f%% of the timed (batch, layer)s, LAR %.3f over them\n",
                    r.config.c_str(), r.W, r.layer_seconds * 1e3,
                    vanilla_seconds > 0 ? r.layer_seconds / vanilla_seconds : 0.0, 100.0 * r.exchange_share,
                    100.0 * r.shuffled_share, r.timed_lar);
      continue;
    }
    const double bytes = static_cast<double>(r.la.remote_rows) * row_bytes;
    const double saved = vanilla.remote_rows ? 1.0 - static_cast<double>(r.la.remote_rows) / vanilla.remote_rows : 0.0;
    std::printf("%sLAR %s W=%d: %.3f  (predictor %s; all-to-all rows %s, %+.1f%% vs vanilla, %sB at d_model f32; "
                "once per rank %s; busiest rank's expert load / median %.2f%s)\n",
                r.comparison ? "# " : "", r.config.c_str(), r.W, r.la.lar(), r.predictor.c_str(), human(static_cast<double>(r.la.remote_rows)).c_str(),
                -100.0 * saved, human(bytes).c_str(), human(static_cast<double>(r.la.remote_rows_once)).c_str(),
                r.la.rank_load_max_over_median,
                r.predictor == "joint" ? (", look-back key known for " + std::to_string(static_cast<int>(100 * r.la.predicted_share + 0.5)) + "% of rows").c_str() : "");
    if (r.layer_seconds > 0)
      std::printf("MoE layer %s W=%d: %.3f ms virtual per layer and batch (%.2fx vanilla's; all-to-all waits %.0f%% of it%s)\n",
                  r.config.c_str(), r.W, r.layer_seconds * 1e3, vanilla_seconds > 0 ? r.layer_seconds / vanilla_seconds : 0.0,
                  100.0 * r.exchange_share,
                  r.host_seconds > 0 ? detail::make_string(", the shuffle's host work ", r.host_seconds * 1e3, " ms").c_str() : "");
  }
}

void write_csv_and_plot(const std::vector<Row>& rows, double row_bytes, const std::string& csv, const std::string& png,
                        const std::string& title) {
  if (csv.empty()) return;
  std::ofstream out(csv);
  if (!out) SY_THROW(IoError, "cannot write --csv ", csv);
  out << "ranks,config,predictor,lar,remote_rows,remote_rows_once_per_rank,remote_bytes,rank_load_max_over_median,"
         "expert_load_max_over_median,lookback_known_share,moe_layer_ms_virtual,timed_shuffled_share\n";
  // auto is timed only: its LAR is over the timed batches, its counters empty.
  for (const Row& r : rows)
    out << r.W << "," << r.config << "," << r.predictor << "," << (r.automatic ? r.timed_lar : r.la.lar()) << ","
        << r.la.remote_rows << ","
        << r.la.remote_rows_once << "," << static_cast<double>(r.la.remote_rows) * row_bytes << ","
        << r.la.rank_load_max_over_median << "," << r.la.expert_load_max_over_median << "," << r.la.predicted_share << ","
        << r.layer_seconds * 1e3 << "," << r.shuffled_share << "\n";
  out.close();
  std::printf("# wrote %s\n", csv.c_str());
  if (png.empty()) return;
  // Bars: LAR per configuration (the best predictor's), one cluster per W.
  std::string data = "config";
  std::vector<int> Ws;
  for (const Row& r : rows)
    if (std::find(Ws.begin(), Ws.end(), r.W) == Ws.end()) Ws.push_back(r.W);
  for (int W : Ws) data += " W=" + std::to_string(W);
  data += "\n";
  for (const char* config : {"vanilla", "grouping", "shuffling", "both"}) {
    data += config;
    for (int W : Ws)
      for (const Row& r : rows)
        if (r.W == W && r.config == config && !r.comparison) {
          data += " " + std::to_string(r.la.lar());
          break;
        }
    data += "\n";
  }
  std::string plot = "plot $d using 2:xtic(1) title columnheader(2)";
  for (size_t i = 1; i < Ws.size(); ++i) plot += ", '' using " + std::to_string(i + 2) + " title columnheader(" + std::to_string(i + 2) + ")";
  plot_png(png, "set style data histograms\nset style fill solid 0.8\nset grid y\nset yrange [0:1]\nset ylabel 'local "
                "activation rate'\nset title '" + title + "'\n$d << EOD\n" + data + "EOD\n" + plot + "\n");
}

}  // namespace

RoutingTrace record_routing_trace(Model& model, const std::vector<std::string>& documents, int64_t max_tokens, bool progress) {
  const ModelConfig& c = model.config();
  RoutingTrace t;
  t.model = c.name;
  t.layers = c.layers, t.k = c.k, t.experts = c.experts;
  t.choices.resize(static_cast<size_t>(c.layers));
  t.weights.resize(static_cast<size_t>(c.layers));
  int64_t total = 0;
  for (const std::string& d : documents) total += static_cast<int64_t>(d.size());
  if (max_tokens > 0) total = std::min(total, max_tokens);
  constexpr int64_t kBatchTokens = 4096;  // windows per forward: enough rows to keep the GEMMs busy
  std::deque<KVCache> caches;
  std::vector<Chunk> chunks;
  std::vector<int32_t> chunk_sequence;
  int64_t batched = 0, next_report = total / 10;
  const auto start = Clock::now();
  auto flush = [&] {
    if (chunks.empty()) return;
    model.forward(chunks);
    for (size_t i = 0; i < chunks.size(); ++i)
      for (size_t p = 0; p < chunks[i].tokens.size(); ++p) {
        t.tokens.push_back(chunks[i].tokens[p]);
        t.positions.push_back(static_cast<int32_t>(p));
        t.sequences.push_back(chunk_sequence[i]);
      }
    for (int l = 0; l < c.layers; ++l) {
      const Routing& r = model.moe(l).last_routing();
      const int64_t n = r.experts.numel();
      SY_CHECK(n == static_cast<int64_t>(t.tokens.size() - t.choices[static_cast<size_t>(l)].size() / static_cast<size_t>(c.k)) * c.k);
      t.choices[static_cast<size_t>(l)].insert(t.choices[static_cast<size_t>(l)].end(), r.experts.data_as<int32_t>(),
                                               r.experts.data_as<int32_t>() + n);
      t.weights[static_cast<size_t>(l)].insert(t.weights[static_cast<size_t>(l)].end(), r.weights.data_as<float>(),
                                               r.weights.data_as<float>() + n);
    }
    chunks.clear(), caches.clear(), chunk_sequence.clear();
    batched = 0;
    if (progress && t.size() >= next_report) {
      std::printf("# recorded %lld of %lld tokens (%.0f s)\n", static_cast<long long>(t.size()),
                  static_cast<long long>(total), seconds_since(start));
      std::fflush(stdout);
      next_report = t.size() + total / 10;
    }
  };
  int64_t taken = 0;
  for (size_t j = 0; j < documents.size() && taken < total; ++j) {
    const std::string& d = documents[j];
    for (size_t at = 0; at < d.size() && taken < total; at += static_cast<size_t>(c.max_seq)) {
      const int64_t n = std::min<int64_t>({static_cast<int64_t>(d.size() - at), c.max_seq, total - taken});
      Chunk ch;
      ch.cache = &caches.emplace_back(model.new_cache(static_cast<int>(n)));
      for (int64_t i = 0; i < n; ++i) ch.tokens.push_back(static_cast<unsigned char>(d[at + static_cast<size_t>(i)]));
      chunks.push_back(std::move(ch));
      chunk_sequence.push_back(static_cast<int32_t>(j));
      batched += n, taken += n;
      if (batched >= kBatchTokens) flush();
    }
  }
  flush();
  if (t.size() == 0) SY_THROW(InvalidArgument, "trace record: no tokens (no documents, or --max_tokens = 0)");
  return t;
}

int run_trace_record(const TraceRecordOptions& o) {
  if (o.out.empty()) SY_THROW(InvalidArgument, "trace record: -o FILE is required");
  if (o.max_tokens < 0) SY_THROW(InvalidArgument, "trace record: --max_tokens = ", o.max_tokens, ", expected >= 0 (0: all)");
  const TextCorpus corpus = TextCorpus::fortunes(o.corpus);
  with_model(o.model, [&](Model& model) {
    const auto start = Clock::now();
    const RoutingTrace t = record_routing_trace(model, corpus.held_out_documents, o.max_tokens, true);
    t.save(o.out, {{"text", "held-out fortunes (every 10th fortune of " + o.corpus + "), one sequence per fortune, "
                            "windows of at most max_seq"},
                   {"source", "switchyard trace record --model " + o.model}});
    std::printf("wrote %s: %lld tokens of %d held-out fortunes x %d layers (%.1f s)\n", o.out.c_str(),
                static_cast<long long>(t.size()), t.sequences.empty() ? 0 : t.sequences.back() + 1, t.layers,
                seconds_since(start));
  });
  return 0;
}

int run_affinity_build(const AffinityBuildOptions& o) {
  if (o.out.empty()) SY_THROW(InvalidArgument, "affinity build: -o FILE is required");
  if (o.build_every < 1) SY_THROW(InvalidArgument, "affinity build: --build_every = ", o.build_every, ", expected >= 1");
  const RoutingTrace trace = RoutingTrace::load(o.trace);
  check_ranks(o.ranks, trace.experts, o.lookback, "affinity build:");
  // --build_every 1: tables from the whole trace (for use), scored in sample.
  const Split s = o.build_every == 1 ? Split{trace, trace} : split_by_document(trace, o.build_every);
  Embedding emb;
  if (!o.model.empty())
    with_model(o.model, [&](Model& m) {
      const Tensor& e = m.embedding();
      emb.vocab = e.shape()[0], emb.dim = e.shape()[1];
      emb.rows.assign(e.data_as<float>(), e.data_as<float>() + e.numel());
    });
  const int vocab = std::max<int>(vocab_of(s.build, s.scored), static_cast<int>(emb.vocab));
  Evaluation ev;
  const std::vector<std::vector<int>> placement =
      o.grouping ? grouped_placement(s.build, o.ranks, o.balance_weight, &ev)
                 : AffinityTables::identity_placement(trace.layers, trace.experts, o.ranks);
  const AffinityTables t = tables_for(s.build, o.ranks, placement, o.lookback, vocab, emb.rows.empty() ? nullptr : &emb);
  t.save(o.out);
  int borrowed = 0;
  for (int b : t.borrowed_from()) borrowed += b >= 0;
  std::printf("wrote %s: %d layers x %d experts on %d ranks (%s placement), look-back %d, built on %lld tokens "
              "(documents j %% %d == 0)%s\n",
              o.out.c_str(), t.layers(), t.experts(), t.ranks(), o.grouping ? "grouped" : "identity", o.lookback,
              static_cast<long long>(s.build.size()), o.build_every,
              emb.rows.empty() ? "" : (", " + std::to_string(borrowed) + " unseen tokens borrow a neighbour's rows").c_str());
  if (o.grouping)
    std::printf("# grouping objective (build part, tokens split evenly): expected local share %.3f, identity placement %.3f\n",
                ev.grouping_objective, ev.identity_objective);
  for (int l = 0; l < t.layers(); ++l) {
    std::printf("# layer %d ranks of experts:", l);
    for (int r : t.layer(l).rank_of_expert) std::printf(" %d", r);
    std::printf("\n");
  }
  // Held-out: these tables with the rows left in place and shuffled.
  for (bool shuffle : {false, true}) {
    ShuffleOptions so;
    so.shuffle = shuffle;
    so.predictor = o.lookback > 0 ? AffinityPredictor::joint : AffinityPredictor::token;
    so.batch_tokens = o.batch_tokens;
    const LocalActivation la = score_local_activation(s.scored, t, so);
    std::printf("%s LAR (%lld tokens, batches of %lld in equal chunks), %s: %.3f\n",
                o.build_every == 1 ? "in-sample" : "held-out", static_cast<long long>(s.scored.size()),
                static_cast<long long>(o.batch_tokens),
                shuffle ? "tokens shuffled to their predicted ranks" : "tokens left in place", la.lar());
  }
  return 0;
}

int run_bench_specmoe(const BenchSpecMoeOptions& o) {
  if (o.ranks.empty()) SY_THROW(InvalidArgument, "bench specmoe: --ranks is empty");
  if (o.batch_tokens < 1) SY_THROW(InvalidArgument, "bench specmoe: --batch_tokens = ", o.batch_tokens, ", expected >= 1");
  if (!o.png.empty() && o.csv.empty()) SY_THROW(InvalidArgument, "bench specmoe: --png needs --csv");
  if (o.max_tokens < 0) SY_THROW(InvalidArgument, "bench specmoe: --max_tokens = ", o.max_tokens, ", expected >= 0 (0: all)");
  if (o.max_tokens > 0 && !o.trace.empty())
    SY_THROW(InvalidArgument, "bench specmoe: --max_tokens limits the recording, and --trace gives a recorded trace; "
             "expected one of them");
  RoutingTrace trace;
  Embedding emb;
  int64_t d_model = 0;
  std::string model_name;
  with_model(o.model, [&](Model& m) {
    d_model = m.config().d_model;
    model_name = m.config().name;
    const Tensor& e = m.embedding();
    emb.vocab = e.shape()[0], emb.dim = e.shape()[1];
    emb.rows.assign(e.data_as<float>(), e.data_as<float>() + e.numel());
    if (o.trace.empty()) {
      const TextCorpus corpus = TextCorpus::fortunes(o.corpus);
      std::printf("# recording the routing of %zu held-out fortunes through %s\n", corpus.held_out_documents.size(),
                  model_name.c_str());
      trace = record_routing_trace(m, corpus.held_out_documents, o.max_tokens, true);
      trace.path = "held-out fortunes";
    }
  });
  if (!o.trace.empty()) trace = RoutingTrace::load(o.trace);
  for (int W : o.ranks) check_ranks(W, trace.experts, o.lookback, "bench specmoe:");
  if (trace.model != model_name && trace.model != "?")
    std::printf("# note: the trace was recorded from model '%s', --model is '%s' (its embedding lends unseen tokens "
                "their rows)\n", trace.model.c_str(), model_name.c_str());
  const Split s = split_by_document(trace, o.build_every);
  std::printf("# specmoe: %s (%d layers, %d experts, top-%d) on %s: %lld tokens; tables from documents j %% %d == 0 "
              "(%lld tokens), scored on the rest (%lld), batches of %lld tokens in equal chunks per rank, look-back %d\n",
              model_name.c_str(), trace.layers, trace.experts, trace.k, trace.path.c_str(), static_cast<long long>(trace.size()),
              o.build_every, static_cast<long long>(s.build.size()), static_cast<long long>(s.scored.size()),
              static_cast<long long>(o.batch_tokens), o.lookback);
  std::printf("# LAR: the share of (token, choice) pairs whose expert is on the token's rank; all-to-all rows: one "
              "per remote choice (\"once per rank\": one per token and remote rank)\n");
  const double row_bytes = static_cast<double>(d_model) * sizeof(float);
  std::optional<ClusterModel> cluster;
  LayerTiming timing;
  if (!o.emulate.empty()) {
    if (o.layer_model_dim < 1 || o.layer_hidden < 1 || o.layer_batches < 1)
      SY_THROW(InvalidArgument, "bench specmoe: --layer_model_dim, --layer_hidden and --layer_batches must be >= 1");
    cluster = load_cluster_preset(o.emulate);
    for (int W : o.ranks)
      if (o.nodes < 0 || (o.nodes > 0 && W % o.nodes != 0))
        SY_THROW(InvalidArgument, "bench specmoe: --nodes = ", o.nodes, " does not divide --ranks ", W);
    timing = {&*cluster, o.layer_model_dim, o.layer_hidden, o.layer_batches, o.nodes};
    std::printf("# MoE layer time: the first %d scored batches' routing replayed through every layer, a timing-only "
                "dropless f32 layer of d_model %lld, hidden %lld on emulated %s (virtual time: device and link models; "
                "a shuffled batch also pays the host's prediction and assignment of its rows, measured here; the "
                "rows themselves move inside tensor-parallel attention's reduce-scatter, no extra bytes)\n",
                o.layer_batches, static_cast<long long>(o.layer_model_dim), static_cast<long long>(o.layer_hidden),
                cluster->name.c_str());
  }
  std::vector<Row> all;
  for (int W : o.ranks) {
    const auto start = Clock::now();
    const Evaluation ev = evaluate(s, W, o.lookback, o.batch_tokens, &emb, timing, o.balance_weight);
    print_rows(ev, row_bytes);
    std::printf("# W=%d: grouping objective (build part) %.3f against %.3f for the identity placement; %.1f s\n", W,
                ev.grouping_objective, ev.identity_objective, seconds_since(start));
    all.insert(all.end(), ev.rows.begin(), ev.rows.end());
  }
  write_csv_and_plot(all, row_bytes, o.csv, o.png, "bench specmoe: " + model_name + ", held-out LAR per configuration");
  return 0;
}

}  // namespace switchyard
