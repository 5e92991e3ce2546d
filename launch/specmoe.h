// Speculative MoE tools (moe/affinity.h, moe/expert_grouping.h):
//   switchyard trace record --model DIR -o FILE     routing trace of the held-out fortunes, by the C++ model
//   switchyard affinity build TRACE --ranks W -o F  tables (+ expert grouping) from a trace's build part
//   switchyard bench specmoe --model DIR            LAR of vanilla, grouping, shuffling and both per W
// Traces are split by document, never by position: document j builds the
// tables iff j % build_every == 0, the rest is scored.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/routing_trace.h"

namespace switchyard {

class Model;

// The model (on this rank alone) over documents, each cut into windows of at
// most the model's max_seq tokens; tokens until max_tokens (0: all).
// sequences = the document's index. Prints progress when `progress`.
RoutingTrace record_routing_trace(Model& model, const std::vector<std::string>& documents, int64_t max_tokens,
                                  bool progress);

struct TraceRecordOptions {
  std::string model, out;
  std::string corpus = "/usr/share/games/fortunes";
  int64_t max_tokens = 0;  // 0: every held-out fortune
};
int run_trace_record(const TraceRecordOptions& options);

struct AffinityBuildOptions {
  std::string trace, out;
  std::string model;  // optional: unseen tokens borrow their nearest neighbour's rows in its embedding
  int ranks = 4;
  int lookback = 2;
  bool grouping = true;
  double balance_weight = 0.3;  // grouping: weight of the busiest rank's expert load against locality
  int build_every = 5;  // 1: build on the whole trace (tables for use; the LAR printed is in-sample)
  int64_t batch_tokens = 2048;
};
int run_affinity_build(const AffinityBuildOptions& options);

struct BenchSpecMoeOptions {
  std::string model;
  std::string trace;  // optional: else the held-out fortunes are recorded through the model
  std::string corpus = "/usr/share/games/fortunes";
  std::vector<int> ranks = {4, 8};
  int lookback = 2;
  double balance_weight = 0.3;
  int build_every = 5;
  int64_t batch_tokens = 2048;
  int64_t max_tokens = 0;
  std::string csv, png;
  // MoE-layer time: the scored batches' routing replayed through a timing-only
  // MoE layer on an emulated cluster of W ranks, at these shapes (defaults:
  // Mixtral 8x7B's, whose 8 experts and top-2 the tiny models share).
  std::string emulate;
  int64_t layer_model_dim = 4096, layer_hidden = 14336;
  int layer_batches = 4;  // scored batches timed (each through every layer)
  int nodes = 0;          // the emulated ranks in this many nodes (0: the preset's ranks per node)
};
int run_bench_specmoe(const BenchSpecMoeOptions& options);

}  // namespace switchyard
