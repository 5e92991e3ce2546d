// `switchyard trace stats FILE`: what a routing trace says about expert load
// and about how predictable a token's experts are from its id alone (the
// premise of speculative token shuffling and expert grouping).
//
// Trace format (examples/tiny_lm/README.md): a safetensors file with
// "tokens" [N] i32, "positions" [N] i32, and per MoE layer i
// "layer<i>.experts" [N, k] i32 (logical experts, best first) and
// "layer<i>.weights" [N, k] f32; metadata "format" =
// "switchyard-routing-trace-v1", "layers", "k", "experts".
#pragma once

#include "core/safetensors.h"

#include <string>
#include <vector>

namespace switchyard {

struct TraceLayerStats {
  int layer = 0;
  std::vector<int64_t> load;    // choices per expert
  double max_over_mean = 0;     // load skew: the busiest expert's load over the mean
  double coefficient_of_variation = 0;
  // Hit rate on the scoring part (the last 80%): the share of a token's k
  // choices found among its id's k most frequent experts in the first 20%
  // (ids unseen there fall back to the layer's k most frequent experts).
  double token_id_hit_rate = 0;
  double global_top_k_hit_rate = 0;  // predicting the layer's k most frequent experts for every token
  double random_hit_rate = 0;        // k / E
  // Sending a token once per destination rank (E / W experts per rank, expert
  // e on rank e / (E / W)): the share of its k rows saved, per world size W.
  std::vector<std::pair<int, double>> rows_saved_once_per_rank;
};

struct TraceStats {
  std::string path, model;
  int64_t tokens = 0;
  int layers = 0, k = 0, experts = 0;
  int64_t build_tokens = 0;  // the first 20%
  std::vector<TraceLayerStats> per_layer;
};

// Reads and checks a trace (errors name the file, the tensor and what was expected).
TraceStats trace_stats(const std::string& path, double build_share = 0.2);
// The same from an opened file (its path() names it in errors).
TraceStats trace_stats(const SafetensorsFile& file, double build_share = 0.2);
// The table `switchyard trace stats` prints.
std::string format_trace_stats(const TraceStats& s);

}  // namespace switchyard
