#include "launch/trace_stats.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <unordered_map>
#include <sstream>

#include "core/error.h"
#include "core/safetensors.h"
#include "moe/routing_trace.h"

namespace switchyard {
namespace {

// The k most frequent experts of a count vector; ties to the lower expert.
std::vector<int> top_k(const std::vector<int64_t>& counts, int k) {
  std::vector<int> order(counts.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return counts[a] > counts[b]; });
  order.resize(static_cast<size_t>(std::min<int>(k, static_cast<int>(order.size()))));
  return order;
}

// top_k of the dense counts these sparse ones stand for: the most frequent first, ties and the
// experts never counted (count 0) to the lower id.
std::vector<int> top_k_sparse(const std::map<int, int64_t>& counts, int k, int experts) {
  std::vector<std::pair<int64_t, int>> by_count;
  for (const auto& [expert, n] : counts) by_count.emplace_back(-n, expert);
  std::sort(by_count.begin(), by_count.end());
  std::vector<int> out;
  for (const auto& [n, expert] : by_count) {
    if (static_cast<int>(out.size()) == k) break;
    out.push_back(expert);
  }
  for (int expert = 0; static_cast<int>(out.size()) < k && expert < experts; ++expert)
    if (!counts.count(expert)) out.push_back(expert);
  return out;
}

}  // namespace

TraceStats trace_stats(const std::string& path, double build_share) {
  return trace_stats(SafetensorsFile::open(path), build_share);
}

TraceStats trace_stats(const SafetensorsFile& f, double build_share) {
  const RoutingTrace trace = RoutingTrace::load(f);
  TraceStats s;
  s.path = trace.path;
  s.model = trace.model;
  s.tokens = trace.size();
  s.layers = trace.layers;
  s.k = trace.k;
  s.experts = trace.experts;
  s.build_tokens = static_cast<int64_t>(std::floor(build_share * static_cast<double>(s.tokens)));
  const int32_t* tok = trace.tokens.data();
  const int E = s.experts, k = s.k;
  for (int l = 0; l < s.layers; ++l) {
    const int32_t* e = trace.choices[static_cast<size_t>(l)].data();
    TraceLayerStats t;
    t.layer = l;
    t.load.assign(static_cast<size_t>(E), 0);
    for (int64_t i = 0; i < s.tokens * k; ++i) ++t.load[static_cast<size_t>(e[i])];
    const double mean = static_cast<double>(s.tokens * k) / E;
    double var = 0;
    for (int64_t n : t.load) var += (n - mean) * (n - mean);
    t.max_over_mean = mean > 0 ? static_cast<double>(*std::max_element(t.load.begin(), t.load.end())) / mean : 0;
    t.coefficient_of_variation = mean > 0 ? std::sqrt(var / E) / mean : 0;
    // Predictors from the build part: counts per token id kept sparse, so memory follows the
    // choices in the file, not vocab x experts.
    std::unordered_map<int32_t, std::map<int, int64_t>> per_token;
    std::vector<int64_t> overall(static_cast<size_t>(E), 0);
    for (int64_t i = 0; i < s.build_tokens; ++i) {
      auto& c = per_token[tok[i]];
      for (int j = 0; j < k; ++j) {
        ++c[e[i * k + j]];
        ++overall[static_cast<size_t>(e[i * k + j])];
      }
    }
    const std::vector<int> global = top_k(overall, k);
    std::unordered_map<int32_t, std::vector<int>> predicted;
    for (const auto& [id, counts] : per_token) predicted[id] = top_k_sparse(counts, k, E);
    int64_t hits = 0, global_hits = 0, scored = 0;
    for (int64_t i = s.build_tokens; i < s.tokens; ++i) {
      const auto found = predicted.find(tok[i]);
      const auto& p = found == predicted.end() ? global : found->second;
      for (int j = 0; j < k; ++j) {
        const int chosen = e[i * k + j];
        hits += std::find(p.begin(), p.end(), chosen) != p.end();
        global_hits += std::find(global.begin(), global.end(), chosen) != global.end();
        ++scored;
      }
    }
    t.token_id_hit_rate = scored ? static_cast<double>(hits) / scored : 0;
    t.global_top_k_hit_rate = scored ? static_cast<double>(global_hits) / scored : 0;
    t.random_hit_rate = static_cast<double>(k) / E;
    for (int W = 2; W <= E / 2; W *= 2) {
      if (E % W != 0) continue;
      const int per_rank = E / W;
      int64_t distinct = 0;
      std::vector<int> ranks(static_cast<size_t>(k));
      for (int64_t i = 0; i < s.tokens; ++i) {
        for (int j = 0; j < k; ++j) ranks[static_cast<size_t>(j)] = e[i * k + j] / per_rank;
        std::sort(ranks.begin(), ranks.end());
        distinct += std::unique(ranks.begin(), ranks.end()) - ranks.begin();
      }
      const double rows = static_cast<double>(s.tokens * k);
      t.rows_saved_once_per_rank.emplace_back(W, rows > 0 ? 1.0 - static_cast<double>(distinct) / rows : 0.0);
    }
    s.per_layer.push_back(std::move(t));
  }
  return s;
}

std::string format_trace_stats(const TraceStats& s) {
  std::ostringstream o;
  char line[256];
  std::snprintf(line, sizeof line, "trace %s (model %s): %lld tokens, %d layers, %d experts, top-%d\n", s.path.c_str(),
                s.model.c_str(), static_cast<long long>(s.tokens), s.layers, s.experts, s.k);
  o << line;
  std::snprintf(line, sizeof line,
                "hit rate: share of a token's %d choices among its id's %d most frequent experts, built on the first "
                "%lld tokens (20%%), scored on the rest\n",
                s.k, s.k, static_cast<long long>(s.build_tokens));
  o << line;
  std::snprintf(line, sizeof line, "%5s  %9s  %6s  %13s  %15s  %11s  %s\n", "layer", "max/mean", "cv", "token-id hit",
                "global-top hit", "random hit", "load per expert");
  o << line;
  for (const TraceLayerStats& t : s.per_layer) {
    std::string loads;
    for (int64_t n : t.load) loads += std::to_string(n) + " ";
    std::snprintf(line, sizeof line, "%5d  %9.2f  %6.2f  %13.3f  %15.3f  %11.3f  %s\n", t.layer, t.max_over_mean,
                  t.coefficient_of_variation, t.token_id_hit_rate, t.global_top_k_hit_rate, t.random_hit_rate,
                  loads.c_str());
    o << line;
  }
  if (!s.per_layer.empty() && !s.per_layer.front().rows_saved_once_per_rank.empty()) {
    o << "rows saved by sending a token once per destination rank (E/W experts per rank), per layer:";
    for (const auto& [W, share] : s.per_layer.front().rows_saved_once_per_rank) o << "  W=" << W;
    o << "\n";
    for (const TraceLayerStats& t : s.per_layer) {
      o << "  layer " << t.layer << ":";
      for (const auto& [W, share] : t.rows_saved_once_per_rank) {
        std::snprintf(line, sizeof line, "  %5.1f%%", 100.0 * share);
        o << line;
      }
      o << "\n";
    }
  }
  return o.str();
}

}  // namespace switchyard
